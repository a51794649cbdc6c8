"""A real multi-hop rig on loopback: client -> A -> B -> C (three uvicorn instances).

Every service runs FidelityMiddleware; A calls B and B calls C through FidelityTransport
(B balances C's instances, addressed as the logical host `c`). All addresses are
loopback, inside `trusted_peers`, so the protocol headers go between the hops.

Faults are switched on the shared `Faults` object (the servers run in threads of this
process): per instance of C a mode (`500`, `503`, `hang`, `slow`, `429`; `_hops39` adds
`503ra` and `reset`, `Knobs`), optionally only
on one route. Each hop keeps, per request id (`x-hop-id`, passed down by the handlers),
who decided its answer, from the decision context (an observer).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from _loopback import LoopbackServer
from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)

ATTEMPTS = 3
OPEN_MIN_S = 0.2
OPEN_S = 0.4  # the longest open period of any breaker in the chain
HANG_S = 30.0
SLOW_S = 0.15
ATTEMPT_TIMEOUT_MS = 1000  # slack for a busy machine; a hang costs this
ROUTES = ("ok", "bad")


@dataclass
class HopRecord:
    hop: str
    rid: str
    status: int | None
    decided_by: str | None
    outcome: str | None
    decisions: list[Any]


@dataclass
class Seen:
    lock: threading.Lock = field(default_factory=threading.Lock)
    records: list[HopRecord] = field(default_factory=list)
    c_calls: Counter[tuple[int, str]] = field(default_factory=Counter)  # (instance, route)
    c_calls_by_rid: Counter[str] = field(default_factory=Counter)

    def by(self, hop: str) -> list[HopRecord]:
        with self.lock:
            return [r for r in self.records if r.hop == hop]


class Recorder:
    def __init__(self, hop: str, seen: Seen) -> None:
        self.hop = hop
        self.seen = seen

    def start(self, ctx: Any, scope: Any) -> Any:
        for name, value in scope.get("headers") or ():
            if name == b"x-hop-id":
                return value.decode()
        return "?"

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        with self.seen.lock:
            self.seen.records.append(
                HopRecord(
                    self.hop, token, ctx.status, ctx.decided_by, ctx.outcome, list(ctx.decisions)
                )
            )


class Faults:
    """Per instance of C (0, 1, 2): a mode, and the route it is limited to ("" = all)."""

    def __init__(self) -> None:
        self.mode: dict[int, str] = {}
        self.route: dict[int, str] = {}

    def set(self, instance: int, mode: str, route: str = "") -> None:
        self.route[instance] = route
        self.mode[instance] = mode

    def clear(self) -> None:
        self.mode.clear()
        self.route.clear()

    def on(self, instance: int, route: str) -> str:
        mode = self.mode.get(instance, "")
        wanted = self.route.get(instance, "")
        return mode if mode and (not wanted or wanted == route) else ""


def breaker() -> BreakerConfig:
    return BreakerConfig(
        failure_ratio=0.5, min_calls=6, window_s=5.0, open_s=OPEN_S, open_min_s=OPEN_MIN_S,
        open_jitter=0.0, half_open_probes=1, consecutive_failures=4,
    )  # fmt: skip


def policy(
    instances: tuple[str, ...] = (),
    limits: tuple[RateLimit, ...] = (),
    route_breaker: BreakerConfig | None = None,
) -> Policy:
    retry = RetryConfig(attempts=ATTEMPTS, base_ms=2, max_ms=5, retry_after_max_s=2.0)
    upstreams = [UpstreamConfig(host="*", retry=retry, breaker=breaker())]
    if instances:
        upstreams.insert(
            0,
            UpstreamConfig(
                host="c",
                instances=instances,
                retry=retry,
                breaker=breaker(),
                attempt_timeout_ms=ATTEMPT_TIMEOUT_MS,
                shared_budget=True,
            ),
        )
    return Policy(
        rate_limits=limits,
        breaker=route_breaker if route_breaker is not None else breaker(),
        upstreams=tuple(upstreams),
    )


@dataclass
class Knobs:
    """C's fault modes' settings (`_hops39` sets them per scenario)."""

    slow_s: float = SLOW_S
    retry_after: int = 5  # `503ra`'s Retry-After
    decided: str = ""  # `503ra` marked `x-fidelity-decided-by: <decided>`
    # `hang` until the caller goes away (a C without the middleware, which no deadline
    # cancels: a hang kept to the server's shutdown makes it wait), else HANG_S
    hang_until_gone: bool = False


def c_handler(index: int, faults: Faults, seen: Seen, knobs: Knobs | None = None) -> Any:
    """Instance `index` of C: counts the call, then answers as its fault mode says."""
    knobs = knobs or Knobs()

    async def handler(request: Request) -> Response:
        route = request.url.path.rsplit("/", 1)[-1]
        with seen.lock:
            seen.c_calls[(index, route)] += 1
            seen.c_calls_by_rid[request.headers.get("x-hop-id", "?")] += 1
        mode = faults.on(index, route)
        if mode == "500":
            return Response(b"broken", 500)
        if mode == "503":
            return Response(b"busy", 503)
        if mode == "503ra":
            headers = {"retry-after": str(knobs.retry_after)}
            if knobs.decided:
                headers["x-fidelity-decided-by"] = knobs.decided
            return Response(b"busy", 503, headers=headers)
        if mode == "429":
            return Response(b"slow down", 429, headers={"retry-after": "1"})
        if mode == "reset":

            async def body() -> AsyncIterator[bytes]:
                yield b"first chunk;"
                await asyncio.sleep(0.02)
                raise RuntimeError("C breaks mid-body")  # uvicorn drops the connection

            return StreamingResponse(body())
        if mode == "hang":
            if not knobs.hang_until_gone:
                await asyncio.sleep(HANG_S)
            else:
                for _ in range(int(HANG_S / 0.05)):
                    if await request.is_disconnected():
                        break
                    await asyncio.sleep(0.05)
                return Response(b"late", 200)
        if mode == "slow":
            await asyncio.sleep(knobs.slow_s)
        return Response(f"c{index}:{route}".encode())

    return handler


def c_app(index: int, faults: Faults, seen: Seen, limits: tuple[RateLimit, ...]) -> Any:
    handler = c_handler(index, faults, seen)
    # one route template per route: each has its own route breaker
    app = Starlette(routes=[Route(f"/c/{route}", handler) for route in ROUTES])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy(limits=limits),
        observer=Recorder(f"C{index}", seen),
        telemetry=False,
    )
    return app


def hop_app(
    name: str,
    next_url: str,
    seen: Seen,
    style: str,
    instances: tuple[str, ...] = (),
    limits: tuple[RateLimit, ...] = (),
) -> Any:
    """A service whose route /x/{route} calls `next_url` + route. `style`: "raise"
    (raise_for_status, the middleware answers what escapes) or "map" (502 for a 5xx
    or an error, the upstream's 4xx passed on)."""
    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False), timeout=5.0)
    handler = hop_handler(name, client, next_url, style)
    app = Starlette(routes=[Route(f"/x/{route}", handler) for route in ROUTES])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy(instances, limits),
        observer=Recorder(name, seen),
        telemetry=False,
    )
    return app


def hop_handler(name: str, client: httpx.AsyncClient, next_url: str, style: str) -> Any:
    """A hop's /x/{route}: calls `next_url` + route through `client`. `style`: "raise"
    (raise_for_status, the middleware answers what escapes), "map" (502 for a 5xx or an
    error, the upstream's 4xx passed on) or "stream" (the upstream's body read as a
    stream, through `client.stream`, and passed on whole)."""

    async def handler(request: Request) -> Response:
        route = request.url.path.rsplit("/", 1)[-1]
        headers = {"x-hop-id": request.headers.get("x-hop-id", "?")}
        if style == "stream":
            async with client.stream("GET", next_url + route, headers=headers) as upstream:
                upstream.raise_for_status()
                body = b"".join([chunk async for chunk in upstream.aiter_bytes()])
            return Response(body)
        if style == "raise":
            upstream = await client.get(next_url + route, headers=headers)
            upstream.raise_for_status()
            return Response(upstream.content)
        try:
            upstream = await client.get(next_url + route, headers=headers)
        except httpx.HTTPError as exc:
            return Response(f"{name}: {type(exc).__name__}".encode(), 502)
        if upstream.status_code >= 500:
            return Response(b"upstream failed", 502)
        return Response(upstream.content, upstream.status_code)

    return handler


@dataclass
class Chain:
    faults: Faults
    seen: Seen
    url: str  # A's base: url + "/x/<route>"
    c_hosts: tuple[str, ...]  # C's instances, host:port, by index


@contextmanager
def chain(
    style: str = "raise",
    a_limits: tuple[RateLimit, ...] = (),
    c_limits: tuple[RateLimit, ...] = (),
) -> Iterator[Chain]:
    faults = Faults()
    seen = Seen()
    with ExitStack() as stack:
        urls = tuple(
            stack.enter_context(LoopbackServer(c_app(i, faults, seen, c_limits))).url
            for i in range(3)
        )
        b = stack.enter_context(
            LoopbackServer(hop_app("B", "http://c/c/", seen, style, instances=urls))
        )
        a = stack.enter_context(
            LoopbackServer(hop_app("A", b.url + "/x/", seen, style, limits=a_limits))
        )
        yield Chain(faults, seen, a.url, tuple(u.removeprefix("http://") for u in urls))


@dataclass
class Answer:
    rid: str
    route: str
    status: int
    headers: dict[str, str]
    phase: str


def send(client: httpx.Client, rig: Chain, rid: str, route: str, phase: str) -> Answer:
    response = client.get(f"{rig.url}/x/{route}", headers={"x-hop-id": rid})
    return Answer(rid, route, response.status_code, dict(response.headers), phase)


def summary(answers: list[Answer]) -> dict[str, Counter[tuple[int, str | None]]]:
    out: dict[str, Counter[tuple[int, str | None]]] = defaultdict(Counter)
    for a in answers:
        out[a.phase][(a.status, a.headers.get("x-fidelity-decided-by"))] += 1
    return out


def admissible(seen: Seen) -> Counter[int]:
    """How many of C's instances B's balancer found admissible (not ejected), per pick."""
    counts: Counter[int] = Counter()
    for rec in seen.by("B"):
        for d in rec.decisions:
            if d.layer == "lb" and d.details:
                counts[int(d.details.get("admissible", -1))] += 1
    return counts


def breaker_opens(seen: Seen, hop: str) -> Counter[str]:
    """The subjects of the breakers the hop's outbound layer found (or made) open."""
    opened: Counter[str] = Counter()
    for rec in seen.by(hop):
        for d in rec.decisions:
            if d.layer == "breaker" and d.reason == "breaker_open":
                opened[d.subject] += 1
    return opened
