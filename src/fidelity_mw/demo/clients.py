"""The client population: open-loop clients, each below its own rate limit, retrying
as typical clients do (429 / 503 / timeouts; `Retry-After` honoured up to a cap).

The schedule (which client sends when) is drawn from the seed alone, so both
variants receive the same requests at the same offsets.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx

from .records import ClientRequest, RunClock
from .scenario import FaultScript, ScenarioConfig

_RETRY_STATUSES = (429, 503)
_MAX_REQUESTS_PER_CLIENT = 10_000


@dataclass(frozen=True, slots=True)
class Arrival:
    client: str
    seq: int
    at: float
    jitter_seed: int


def schedule(cfg: ScenarioConfig) -> list[Arrival]:
    """Poisson arrivals per client over the load phase; bounded per client."""
    arrivals: list[Arrival] = []
    for c in range(cfg.clients):
        rng = random.Random(f"{cfg.seed}-client-{c}")
        rate = rng.uniform(cfg.client_rate_min, cfg.client_rate_max)
        name = f"c{c:02d}"
        t = rng.expovariate(rate)
        seq = 0
        while t < cfg.load_s and seq < _MAX_REQUESTS_PER_CLIENT:
            seq += 1
            arrivals.append(Arrival(name, seq, t, rng.getrandbits(32)))
            t += rng.expovariate(rate)
    arrivals.sort(key=lambda a: a.at)
    return arrivals


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    return None


class Population:
    """Drives the schedule against one front URL; records one `ClientRequest` per arrival."""

    def __init__(self, cfg: ScenarioConfig, url: str, clock: RunClock, script: FaultScript) -> None:
        self.cfg = cfg
        self.url = url.rstrip("/") + "/work"
        self.clock = clock
        self.script = script
        self.arrivals = schedule(cfg)
        self.requests: list[ClientRequest] = []
        self.in_flight = 0
        self.http = httpx.AsyncClient(
            timeout=cfg.client_attempt_timeout_s,
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )

    async def _one(self, arrival: Arrival, req: ClientRequest) -> None:
        cfg = self.cfg
        rng = random.Random(arrival.jitter_seed)
        clock = self.clock
        req.started = clock.now()
        deadline = req.started + cfg.client_total_timeout_s
        self.in_flight += 1
        try:
            for attempt in range(1, cfg.client_attempts + 1):
                remaining = deadline - clock.now()
                if remaining <= 0.05:
                    break
                timeout = min(cfg.client_attempt_timeout_s, remaining)
                req.attempts = attempt
                wait: float | None = None
                try:
                    async with asyncio.timeout(timeout):  # httpx's is per phase, not total
                        response = await self.http.get(
                            self.url,
                            headers={
                                "x-client-id": arrival.client,
                                "x-client-attempt": str(attempt),
                                "x-request-timeout-ms": str(int(timeout * 1000)),
                            },
                            timeout=timeout,
                        )
                except (httpx.TransportError, TimeoutError):
                    req.statuses.append(0)
                else:
                    status = response.status_code
                    req.statuses.append(status)
                    if status == 200:
                        req.success = True
                        break
                    if status not in _RETRY_STATUSES:
                        break
                    wait = _retry_after(response)
                if wait is not None:
                    wait = min(wait, cfg.client_retry_after_cap_s)
                else:  # exponential backoff with full jitter
                    wait = rng.uniform(0.0, cfg.client_backoff_base_s * 2 ** (attempt - 1))
                if attempt == cfg.client_attempts or clock.now() + wait >= deadline:
                    break
                await asyncio.sleep(wait)
        finally:
            req.finished = clock.now()
            self.in_flight -= 1

    async def run(self) -> None:
        """Issue every arrival on time; wait for the stragglers (bounded), then close."""
        tasks: set[asyncio.Task[None]] = set()
        clock = self.clock
        try:
            for arrival in self.arrivals:
                delay = arrival.at - clock.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                req = ClientRequest(
                    arrival.client,
                    arrival.seq,
                    arrival.at,
                    self.script.healthy_path(arrival.at),
                )
                self.requests.append(req)
                task = asyncio.create_task(self._one(arrival, req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks), timeout=self.cfg.client_total_timeout_s + 2.0)
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.wait(set(tasks), timeout=2.0)
            await self.http.aclose()
