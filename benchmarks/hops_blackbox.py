"""A chain client -> A -> B -> C (three instances), measured from outside.

Does a healthy request still fail by a decision of ours? Every service is a real uvicorn
server on loopback (a thread each, in this process); B balances C's three instances. The
client sends a fixed schedule of requests (no retries of its own) while one fault runs for
a bounded time, and every answer is judged against the fault timeline: a request is
*healthy* when a healthy instance of C existed for its whole life (sent after an outage
ended, or while at least one instance was fine), and a healthy request that was not
answered 200 was failed by the chain.

Three variants of A and B, the same C and the same schedule:

- `none`: plain httpx, no retries; B picks C's instance round-robin.
- `naive`: a tenacity-like loop at A and at B (3 attempts, exponential backoff with full
  jitter, on transport errors and 5xx), each attempt to B's next instance round-robin.
- `ours`: FidelityMiddleware on A, B and C, FidelityTransport at A and B, C as one
  `[[upstream]]` with its three `instances`.

Faults (`--scenarios`):

- `one_down`: instance 0's server stopped (connections refused), then started again;
- `one_slow`: instance 0 answers after 1.5 s (B's attempt timeout is 0.5 s);
- `one_503ra`: instance 0 answers 503 with `Retry-After: 2`;
- `all_503`: every instance answers 503 (C's own route breakers then shed with their
  Retry-After), then healthy;
- `all_503_tight`: `all_503` with review 38's rig's breakers (every hop: 4 consecutive
  failures, open 0.2 to 0.4 s) and B waiting a Retry-After up to 2 s;
- `all_down`: every instance's server stopped, then started again;
- `b_limited`: no fault at C; B limits its caller (A, one address) to 15 requests a second
  while the client sends ~40 (does A multiply B's refusals? is the client throttled at A
  for refusals it did not cause?).

For `ours` the hops' decision records say which layer decided each failure. Prints only
(nothing is written to RESULTS.md):

    .venv/bin/python benchmarks/hops_blackbox.py [--scenarios a,b] [--variants ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import (
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)

SCENARIOS = (
    "one_down", "one_slow", "one_503ra", "all_503", "all_503_tight", "all_down", "b_limited"
)  # fmt: skip
VARIANTS = ("none", "naive", "ours")
ATTEMPT_TIMEOUT_S = 0.5
SLOW_S = 1.5
CLIENT_DEADLINE_MS = 5000
SENDERS = 96  # client threads (each request blocks one until answered)


# ---------------------------------------------------------------- servers


class ThreadServer:
    """uvicorn in a thread of its own; stopped and started again on the same port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = 0
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="critical",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=0,
            limit_concurrency=1000,
            backlog=512,
        )
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.002)

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.should_exit = True
        self.server.force_exit = True
        assert self.thread is not None
        assert self.sock is not None
        self.thread.join(timeout=10)
        self.sock.close()
        self.server = None


# ---------------------------------------------------------------- records


@dataclass
class Seen:
    lock: threading.Lock = field(default_factory=threading.Lock)
    c_calls: Counter[str] = field(default_factory=Counter)  # by request id
    c_by_instance: Counter[int] = field(default_factory=Counter)
    c_while_faulty: int = 0  # requests that reached an instance while it was failing
    b_calls: Counter[str] = field(default_factory=Counter)  # A's calls to B, by request id
    records: dict[tuple[str, str], list[Any]] = field(default_factory=dict)  # (hop, rid)
    # every call that reached C: (monotonic time, instance, request id, failing then)
    arrivals: list[tuple[float, int, str, bool]] = field(default_factory=list)

    def record(self, hop: str, rid: str, entry: Any) -> None:
        with self.lock:
            self.records.setdefault((hop, rid), []).append(entry)


class Recorder:
    """The hop's decision context at the end of each request, by request id."""

    def __init__(self, hop: str, seen: Seen) -> None:
        self.hop = hop
        self.seen = seen

    def start(self, ctx: Any, scope: Any) -> Any:
        for name, value in scope.get("headers") or ():
            if name == b"x-hop-id":
                return value.decode()
        return "?"

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.seen.record(
            self.hop,
            token,
            {
                "status": ctx.status,
                "decided_by": ctx.decided_by,
                "outcome": ctx.outcome,
                "decisions": [
                    (d.layer, d.verdict, d.reason, d.subject, dict(d.details or {}), d.at)
                    for d in ctx.decisions
                ],
            },
        )


class Faults:
    def __init__(self) -> None:
        self.mode: dict[int, str] = {}


# ---------------------------------------------------------------- C


def tight_policy(**kw: Any) -> Policy:
    """Review 38's rig: breakers that open on 4 consecutive failures for 0.2 to 0.4 s."""
    from fidelity_mw import BreakerConfig

    breaker = BreakerConfig(
        failure_ratio=0.5, min_calls=6, window_s=5.0, open_s=0.4, open_min_s=0.2,
        open_jitter=0.0, half_open_probes=1, consecutive_failures=4,
    )  # fmt: skip
    retry = RetryConfig(attempts=3, base_ms=2, max_ms=5, retry_after_max_s=2.0)
    upstreams = [
        UpstreamConfig(**{**u, "retry": retry, "breaker": breaker}) for u in kw.pop("upstreams", ())
    ]
    upstreams.append(UpstreamConfig(host="*", retry=retry, breaker=breaker))
    return Policy(breaker=breaker, upstreams=tuple(upstreams), **kw)


def c_app(index: int, faults: Faults, seen: Seen, fidelity: bool, tight: bool = False) -> Any:
    async def handler(request: Request) -> Response:
        mode = faults.mode.get(index, "")
        if mode == "503":
            return Response(b"busy", 503)
        if mode == "503ra":
            return Response(b"busy", 503, headers={"retry-after": "2"})
        if mode == "slow":
            await asyncio.sleep(SLOW_S)
        return Response(f"c{index}".encode())

    app = Starlette(routes=[Route("/c/work", handler)])
    if fidelity:
        app.add_middleware(
            FidelityMiddleware,
            policy=tight_policy() if tight else Policy(),
            observer=Recorder(f"C{index}", seen),
            telemetry=False,
        )

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        # every request that reached the instance, C's own middleware's refusals too
        if scope["type"] == "http":
            rid = dict(scope["headers"]).get(b"x-hop-id", b"?").decode()
            with seen.lock:
                seen.c_calls[rid] += 1
                seen.c_by_instance[index] += 1
                faulty = bool(faults.mode.get(index))
                if faulty:
                    seen.c_while_faulty += 1
                seen.arrivals.append((time.monotonic(), index, rid, faulty))
        await app(scope, receive, send)

    return counted


# ---------------------------------------------------------------- A and B


def _retryable(response: httpx.Response | None, error: BaseException | None) -> bool:
    return error is not None or (response is not None and response.status_code >= 500)


class RoundRobin:
    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.i = 0
        self.lock = threading.Lock()

    def next(self) -> str:
        with self.lock:
            self.i += 1
            return self.urls[self.i % len(self.urls)]


def plain_hop(
    name: str,
    target: RoundRobin,
    path: str,
    seen: Seen,
    attempts: int,
    seed: int,
    limits: tuple[RateLimit, ...] = (),
) -> Any:
    """A hop without fidelity_mw: one call (attempts=1) or a naive retry loop."""
    rng = random.Random(seed)
    client = httpx.AsyncClient(timeout=httpx.Timeout(ATTEMPT_TIMEOUT_S if name == "B" else 10.0))
    bucket = _Bucket(limits[0]) if limits else None

    async def handler(request: Request) -> Response:
        rid = request.headers.get("x-hop-id", "?")
        if bucket is not None and not bucket.take():
            return Response(b"limited", 429, headers={"retry-after": "1", "x-limited-at": name})
        response: httpx.Response | None = None
        for attempt in range(attempts):
            error: BaseException | None = None
            if name == "A":
                with seen.lock:
                    seen.b_calls[rid] += 1
            try:
                response = await client.get(target.next() + path, headers={"x-hop-id": rid})
            except httpx.HTTPError as exc:
                response, error = None, exc
            if not _retryable(response, error) or attempt == attempts - 1:
                break
            await asyncio.sleep(rng.uniform(0, 0.05 * 2**attempt))
        if response is None:
            return Response(b"upstream failed", 502)
        if response.status_code >= 500:
            return Response(b"upstream failed", 502)
        passed = {k: v for k, v in response.headers.items() if k == "retry-after"}
        return Response(response.content, response.status_code, headers=passed)

    return Starlette(routes=[Route("/work", handler)])


class _Bucket:
    """A token bucket for the plain variants' B (the same rate and burst as ours)."""

    def __init__(self, limit: RateLimit) -> None:
        count, _, per = limit.rate.partition("/")
        self.rate = float(count) / {"s": 1.0, "m": 60.0}[per]
        self.burst = float(limit.burst or count)
        self.tokens = self.burst
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


def ours_hop(
    name: str,
    next_url: str,
    seen: Seen,
    seed: int,
    instances: tuple[str, ...] = (),
    limits: tuple[RateLimit, ...] = (),
    tight: bool = False,
) -> Any:
    from fidelity_mw.testing import seeded_random

    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False), timeout=None)

    async def handler(request: Request) -> Response:
        rid = request.headers.get("x-hop-id", "?")
        if name == "A":
            with seen.lock:
                seen.b_calls[rid] += 1  # (first attempts only; retries are in the records)
        upstream = await client.get(next_url, headers={"x-hop-id": rid})
        upstream.raise_for_status()
        return Response(upstream.content, upstream.status_code)

    upstreams: list[dict[str, Any]] = []
    if instances:
        upstreams.append(
            {
                "host": "c",
                "instances": instances,
                "attempt_timeout_ms": int(ATTEMPT_TIMEOUT_S * 1000),
                "shared_budget": True,
            }
        )
    if tight:
        policy = tight_policy(rate_limits=limits, upstreams=upstreams)
    else:
        policy = Policy(rate_limits=limits, upstreams=tuple(UpstreamConfig(**u) for u in upstreams))
    app = Starlette(routes=[Route("/work", handler)])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        observer=Recorder(name, seen),
        rng=seeded_random(seed),
        telemetry=False,
    )
    return app


# ---------------------------------------------------------------- a run


@dataclass
class Answer:
    rid: str
    sent: float
    ended: float
    status: int
    headers: dict[str, str]


@dataclass
class Timeline:
    """When the fault ran (seconds from the schedule's start) and whom it touched."""

    start: float
    end: float
    all_instances: bool


SCHEDULE = {  # scenario: (requests, rate per second, fault start, fault end)
    "one_down": (300, 40.0, 1.5, 3.5),
    "one_slow": (240, 30.0, 1.5, 3.5),
    "one_503ra": (300, 40.0, 1.5, 3.5),
    "all_503": (300, 40.0, 1.5, 3.5),
    "all_503_tight": (300, 40.0, 1.5, 3.5),
    "all_down": (300, 40.0, 1.5, 3.5),
    "b_limited": (300, 40.0, 0.0, 0.0),
}


@contextmanager
def chain(
    variant: str, scenario: str, seed: int
) -> Iterator[tuple[str, Faults, Seen, list[ThreadServer]]]:
    faults = Faults()
    seen = Seen()
    b_limits = (
        (RateLimit(name="per-caller", rate="15/s", burst=15),) if scenario == "b_limited" else ()
    )
    # the client's own limit at A: it sends ~40 a second, within it
    # (a burst of 150: on a loaded machine the schedule falls behind and then catches up,
    # ~130 requests in one second seen at load 12, which a burst of 60 refused deservedly)
    a_limits = (RateLimit(name="per-client", rate="60/s", burst=150),)
    with ExitStack() as stack:
        tight = scenario.endswith("_tight")
        cs = [ThreadServer(c_app(i, faults, seen, variant == "ours", tight)) for i in range(3)]
        for c in cs:
            c.start()
            stack.callback(c.stop)
        if variant == "ours":
            urls = tuple(c.url for c in cs)
            b_app = ours_hop("B", "http://c/c/work", seen, seed, urls, b_limits, tight)
        else:
            attempts = 3 if variant == "naive" else 1
            b_app = plain_hop(
                "B", RoundRobin([c.url for c in cs]), "/c/work", seen, attempts, seed, b_limits
            )
        b = ThreadServer(b_app)
        b.start()
        stack.callback(b.stop)
        if variant == "ours":
            a_app = ours_hop("A", b.url + "/work", seen, seed + 1, limits=a_limits, tight=tight)
        else:
            attempts = 3 if variant == "naive" else 1
            a_app = plain_hop("A", RoundRobin([b.url]), "/work", seen, attempts, seed + 1, a_limits)
        a = ThreadServer(a_app)
        a.start()
        stack.callback(a.stop)
        yield a.url, faults, seen, cs


def run(variant: str, scenario: str, seed: int) -> dict[str, Any]:
    n, rate, f_start, f_end = SCHEDULE[scenario]
    rng = random.Random(seed)
    offsets = sorted(rng.uniform(0, n / rate) for _ in range(n))
    answers: list[Answer] = []
    lock = threading.Lock()
    marks: dict[str, float] = {}
    with chain(variant, scenario, seed) as (a_url, faults, seen, cs):
        with httpx.Client(timeout=30.0) as warm:  # connections and estimates, not counted
            for i in range(9):
                warm.get(a_url + "/work", headers={"x-hop-id": f"warm{i}"})
        # Enough senders that a slow answer does not hold up the schedule: with 16, a
        # variant whose refusals took ~1 s (a wait for a callee's Retry-After) sent half of
        # the fault's requests after it, and the rows compared other requests. (Made
        # before the schedule starts: ~50 ms each, for their TLS contexts.)
        clients = [httpx.Client(timeout=30.0) for _ in range(SENDERS)]
        t0 = time.monotonic() + 0.05

        def fault_driver() -> None:
            if scenario == "b_limited":
                return
            time.sleep(max(0.0, t0 + f_start - time.monotonic()))
            marks["fault_on"] = time.monotonic() - t0
            which = [0] if scenario.startswith("one_") else [0, 1, 2]
            for i in which:
                if scenario.endswith("down"):
                    cs[i].stop()
                else:
                    mode = {"one_slow": "slow", "one_503ra": "503ra"}.get(scenario, "503")
                    faults.mode[i] = mode
            time.sleep(max(0.0, t0 + f_end - time.monotonic()))
            for i in which:
                if scenario.endswith("down"):
                    cs[i].start()
                else:
                    faults.mode.pop(i, None)
            marks["fault_off"] = time.monotonic() - t0

        def send(k: int, client: httpx.Client) -> None:
            time.sleep(max(0.0, t0 + offsets[k] - time.monotonic()))
            rid = f"r{k}"
            sent = time.monotonic() - t0
            try:
                response = client.get(
                    a_url + "/work",
                    headers={"x-hop-id": rid, "x-request-timeout-ms": str(CLIENT_DEADLINE_MS)},
                )
                status, headers = response.status_code, dict(response.headers)
            except httpx.HTTPError as exc:
                status, headers = 0, {"error": type(exc).__name__}
            ended = time.monotonic() - t0
            with lock:
                answers.append(Answer(rid, sent, ended, status, headers))

        driver = threading.Thread(target=fault_driver, daemon=True)
        driver.start()
        with ThreadPoolExecutor(SENDERS) as pool:
            futures = [pool.submit(send, k, clients[k % SENDERS]) for k in range(n)]
            for f in futures:
                f.result()
        driver.join()
        for c in clients:
            c.close()
        time.sleep(0.2)  # the last records
        records = dict(seen.records)
        c_calls = Counter(seen.c_calls)
        b_calls = Counter(seen.b_calls)
    on = marks.get("fault_on", f_start)
    off = marks.get("fault_off", f_end)
    result = judge(variant, scenario, answers, on, off, records, c_calls, b_calls)
    # the calls C took while failing, a request sent in the fault (a request sent then
    # and served after it ends is not charged its call to the recovered C)
    in_fault = sum(1 for a in answers if on <= a.sent < off)
    result["c_calls_while_faulty_per_request"] = round(seen.c_while_faulty / max(1, in_fault), 2)
    result.update(after_outage(list(seen.arrivals), records, t0, off))
    return result


BURST_S = 0.01  # the window a burst at one instance is counted in


def after_outage(
    arrivals: list[tuple[float, int, str, bool]],
    records: dict[tuple[str, str], list[Any]],
    t0: float,
    off: float,
) -> dict[str, Any]:
    """What reached C after the fault ended: the largest burst at one instance (calls
    within `BURST_S`), and B's attempts sent then around a breaker it knew open, by
    first attempt or retry (ours)."""
    by_instance: dict[int, list[float]] = {}
    retries: dict[int, list[float]] = {}  # a request's second and later calls
    calls: Counter[str] = Counter()
    for at, index, rid, _faulty in sorted(arrivals):
        calls[rid] += 1
        if at - t0 >= off:
            by_instance.setdefault(index, []).append(at)
            if calls[rid] > 1:
                retries.setdefault(index, []).append(at)
    burst, burst_at = _burst(by_instance, t0 + off)
    retry_burst, retry_burst_at = _burst(retries, t0 + off)
    around: Counter[str] = Counter()
    for (hop, _rid), recs in records.items():
        if hop != "B":
            continue
        for rec in recs:
            picks = [d for d in rec["decisions"] if d[0] == "lb"]
            for n, d in enumerate(picks):
                if d[5] - t0 >= off and d[4].get("breaker_known_open"):
                    around["first" if n == 0 else "retry"] += 1
            for d in picks:
                if d[5] - t0 >= off:
                    around["picks"] += 1
    return {
        "c_burst_after_fault": burst,
        "c_burst_where": burst_at,
        "c_retry_burst_after_fault": retry_burst,
        "c_retry_burst_where": retry_burst_at,
        "b_around_open_after_fault": dict(around),
    }


def _burst(by_instance: dict[int, list[float]], off: float) -> tuple[int, Any]:
    """The most calls at one instance within `BURST_S`, and (instance, seconds after
    `off`) where that window began."""
    burst, where = 0, None
    for index, times in by_instance.items():
        times.sort()
        lo = 0
        for hi, at in enumerate(times):
            while at - times[lo] > BURST_S:
                lo += 1
            if hi - lo + 1 > burst:
                burst, where = hi - lo + 1, (index, round(times[lo] - off, 3))
    return burst, where


def healthy(scenario: str, a: Answer, on: float, off: float) -> bool:
    if scenario.startswith("all_"):
        # a healthy instance existed for the request's whole life: it began after the
        # outage ended, or ended before it began
        return a.sent >= off or a.ended < on
    return True


def layer_of(rid: str, records: dict[tuple[str, str], list[Any]]) -> str:
    """Which layer decided a failed request, from the hops' records (ours)."""
    for hop in ("A", "B"):
        for rec in records.get((hop, rid), [])[-1:]:
            if rec["decided_by"] not in (None, "app"):
                return f"{hop}:{rec['decided_by']}"
    for hop in ("B", "A"):
        for rec in reversed(records.get((hop, rid), [])):
            ends = [d for d in rec["decisions"] if d[1] in ("give_up", "reject")]
            if ends:
                return f"{hop}:{ends[-1][0]}/{ends[-1][2]}"
    return "?"


def judge(
    variant: str,
    scenario: str,
    answers: list[Answer],
    on: float,
    off: float,
    records: dict[tuple[str, str], list[Any]],
    c_calls: Counter[str],
    b_calls: Counter[str],
) -> dict[str, Any]:
    answers.sort(key=lambda a: a.sent)
    failed_healthy = [a for a in answers if healthy(scenario, a, on, off) and a.status != 200]
    after = [a for a in answers if a.sent >= off and scenario != "b_limited"]
    failed_after = [a for a in after if a.status != 200]
    last_fail_after = max((a.sent - off for a in failed_after), default=None)
    statuses = Counter(a.status for a in answers)
    five_hundreds = sum(1 for a in answers if a.status == 500)
    unadvised = sum(
        1
        for a in answers
        if a.status in (503, 429) and not a.headers.get("retry-after", "").isdigit()
    )
    per_req = [c_calls.get(a.rid, 0) for a in answers]
    outage = [c_calls.get(a.rid, 0) for a in answers if on <= a.sent < off]
    b_per_req = []
    for a in answers:
        tries = len(records.get(("B", a.rid), [])) if variant == "ours" else b_calls.get(a.rid, 0)
        b_per_req.append(tries)
    layers = (
        Counter(layer_of(a.rid, records) for a in failed_healthy)
        if variant == "ours"
        else Counter()
    )
    throttled_at_a = sum(
        1
        for a in answers
        if a.headers.get("x-limited-at") == "A"
        or any(r["decided_by"] == "ratelimit" for r in records.get(("A", a.rid), []))
    )
    retry_after = Counter(a.headers.get("retry-after") for a in answers if a.status != 200)
    give_ups: Counter[str] = Counter()  # every give-up of B's and A's tries, by reason
    resent_after: Counter[str] = Counter()  # B's give-up that A sent again
    for (hop, _rid), recs in records.items():
        if hop not in ("A", "B"):
            continue
        for n, rec in enumerate(recs):
            for d in rec["decisions"]:
                if d[1] in ("give_up", "reject"):
                    give_ups[f"{hop}:{d[0]}/{d[2]}"] += 1
                    if hop == "B" and n < len(recs) - 1:
                        resent_after[d[2]] += 1
    return {
        "variant": variant,
        "scenario": scenario,
        "requests": len(answers),
        "fault": [round(on, 2), round(off, 2)],
        "statuses": dict(sorted(statuses.items())),
        "healthy_failed": len(failed_healthy),
        "failed_after_fault": len(failed_after),
        "last_failure_after_fault_s": None
        if last_fail_after is None
        else round(last_fail_after, 2),
        "500s": five_hundreds,
        "refusals_without_retry_after": unadvised,
        "c_calls_per_request": round(sum(per_req) / max(1, len(per_req)), 2),
        "c_calls_max": max(per_req, default=0),
        "c_calls_per_request_in_fault": round(sum(outage) / max(1, len(outage)), 2),
        "b_tries_per_request": round(sum(b_per_req) / max(1, len(b_per_req)), 2),
        "b_tries_max": max(b_per_req, default=0),
        "throttled_at_a": throttled_at_a,
        "retry_after_on_failures": dict(retry_after),
        "deciding_layers": dict(layers.most_common()),
        "give_ups": dict(give_ups.most_common()),
        "a_resent_after_b": dict(resent_after),
        # how long a request sent during the fault waited for its answer (clean or not)
        "in_fault_mean_s": round(
            sum(a.ended - a.sent for a in answers if on <= a.sent < off)
            / max(1, sum(1 for a in answers if on <= a.sent < off)),
            3,
        ),
        "p50_s": _q([a.ended - a.sent for a in answers], 0.5),
        "p99_s": _q([a.ended - a.sent for a in answers], 0.99),
        "healthy_failed_decisions": [
            [
                (hop, [(d[0], d[1], d[2], _short(d[4])) for d in rec["decisions"]])
                for hop in ("A", "B")
                for rec in records.get((hop, a.rid), [])
            ]
            for a in failed_healthy[:3]
        ]
        if variant == "ours"
        else [],
        "healthy_failed_examples": [
            (
                a.rid,
                round(a.sent, 2),
                a.status,
                layer_of(a.rid, records) if variant == "ours" else "",
            )
            for a in failed_healthy[:6]
        ],
        "load": os.getloadavg()[0],
        "timeline": [
            (
                a.rid,
                round(a.sent, 3),
                round(a.ended - a.sent, 3),
                a.status,
                a.headers.get("retry-after"),
                a.headers.get("x-fidelity-decided-by"),
                c_calls.get(a.rid, 0),
                len(records.get(("B", a.rid), [])) or b_calls.get(a.rid, 0),
                layer_of(a.rid, records) if a.status != 200 and variant == "ours" else "",
            )
            for a in answers
        ],
    }


def _short(details: dict[str, Any]) -> dict[str, Any]:
    keep = ("instance", "admissible", "breaker_known_open", "retry_hint_s", "attempts", "delay_ms")
    return {k: v for k, v in details.items() if k in keep}


def _q(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--timeline", action="store_true", help="every request, in order")
    parser.add_argument("--no-write", action="store_true", help="(prints only, always)")
    args = parser.parse_args()
    results = []
    for scenario in args.scenarios.split(","):
        for variant in args.variants.split(","):
            result = run(variant, scenario, args.seed)
            results.append(result)
            if not args.timeline:
                del result["timeline"]
            if not args.json:
                shown = {k: v for k, v in result.items() if k not in ("timeline", "variant")}
                line = " ".join(f"{k}={v}" for k, v in shown.items())
                print(f"{scenario:13} {variant:6} {line}", flush=True)
                if args.timeline:
                    for row in result["timeline"]:
                        print("   ", *row)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
