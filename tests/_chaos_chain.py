"""A seeded chaos harness over a chain of services, in process, on one FakeClock.

    client -> A -> B -> C (one service of three instances C1, C2, C3)

Every hop runs FidelityMiddleware; A calls B and B calls C through FidelityTransport
(B's balances C's instances). The hops are chained with httpx.ASGITransport, so a
schedule of a hundred requests runs in milliseconds and time moves only when the
harness (or a slow instance) moves the clock.

A schedule is drawn from a seed: a handful of faults, each on for a window of fake
time (an instance's 503/500 burst, slow tail, refused connections, bodies reset
mid-way, 429s with a sane, huge or malformed Retry-After; B's own handler raising;
a deadline shorter than the chain; clients that disconnect), then a quiet stretch in
which every fault has ended. `run_schedule` drives it and returns what every hop saw;
`check` holds it to the invariants and returns the violations (empty: it held):

1. no 500 but the app's own (a handler raising, or letting out an upstream's error the
   outbound layer did not give up on); nothing escapes the stack;
2. every refusal of ours is named: `decided_by` on the record, the marker on the answer;
3. every request sent RECOVERY_S after the last fault ended succeeds;
4. retries at one hop: A never sends B a request again after B retried C for it and
   answered 5xx; C's calls per request stay within A's attempts plus B's (added, not
   multiplied);
5. A's breaker for B opens only on B's own faults (B's marked answers are not);
6. no hop below A refuses by its limit; with a tight limit at B, never a request the
   client's first attempts alone left room for (retries spend no quota);
7. a healthy instance keeps receiving calls while one other is faulty.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from _asgi import http_scope
from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.errors import FidelityError
from fidelity_mw.policy import HedgeConfig
from fidelity_mw.testing import FakeClock, seeded_random
from reference_model import RefBucket

B_HOST = "10.0.2.1:8080"
B_URL = f"http://{B_HOST}"
C_INSTANCES = ("http://10.0.3.1:8080", "http://10.0.3.2:8080", "http://10.0.3.3:8080")
C_HOSTS = tuple(url.removeprefix("http://") for url in C_INSTANCES)
ATTEMPTS = 3
MAX_HEDGES = 1
OPEN_S = 2.0  # the longest open time of any breaker in the chain
RECOVERY_S = 2 * OPEN_S + 1.0  # after the last fault: open time, a probe, a margin
CONSECUTIVE_FAILURES = 4
MIN_CALLS = 5
FAILURE_RATIO = 0.5
LIMIT_PER_S = 40  # every hop's per-client limit; the client sends well under it
TIGHT_PER_S = 5  # B's, in a `tight` schedule

INSTANCE_FAULTS = ("err503", "err500", "slow", "refuse", "reset", "r429")
RETRY_AFTERS = ("1", "3600", "soon", "-5", "Wed, 21 Oct 2099 07:28:00 GMT")


@dataclass(frozen=True)
class Fault:
    kind: str  # one of INSTANCE_FAULTS, "b_raise", "short_deadline", "disconnect"
    start: float  # offsets from the schedule's start, fake seconds
    end: float
    target: str = ""  # the C instance's host:port for an instance fault
    param: str = ""  # slow: seconds; r429: the Retry-After value

    def on(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class Schedule:
    seed: int
    faults: list[Fault]
    sends: list[float]  # the pause before each top-level request (fake seconds)
    concurrent: set[int]  # indexes sent together with the next one
    hedge: bool
    handler_style: str  # "map" (the app answers 502) or "raise" (raise_for_status)
    tight: bool = False  # B's per-client limit below what the client sends at times

    @property
    def faults_end(self) -> float:
        return max((f.end for f in self.faults), default=0.0)


def draw(seed: int, n_faults: int | None = None) -> Schedule:
    rnd = random.Random(seed)
    faults: list[Fault] = []
    for _ in range(n_faults if n_faults is not None else rnd.randint(1, 4)):
        kind = rnd.choice((*INSTANCE_FAULTS, "b_raise", "short_deadline", "disconnect"))
        start = round(rnd.uniform(0.0, 6.0), 3)
        end = round(start + rnd.uniform(0.2, 4.0), 3)
        target = rnd.choice(C_HOSTS) if kind in INSTANCE_FAULTS else ""
        param = ""
        if kind == "slow":
            param = str(rnd.choice((0.05, 0.3, 1.5, 40.0)))
        elif kind == "r429":
            param = rnd.choice(RETRY_AFTERS)
        elif kind == "short_deadline":
            param = str(rnd.choice((1, 5, 30, 200)))  # ms
        faults.append(Fault(kind, start, end, target, param))
    horizon = max(f.end for f in faults) + RECOVERY_S + 2.0
    sends: list[float] = []  # the pause before each request
    t = 0.0
    while t < horizon:
        gap = rnd.choice((0.01, 0.05, 0.1, 0.2))
        sends.append(gap)
        t += gap
    concurrent = {i for i in range(len(sends) - 1) if rnd.random() < 0.1}
    return Schedule(
        seed=seed,
        faults=faults,
        sends=sends,
        concurrent=concurrent,
        hedge=rnd.random() < 0.5,
        handler_style=rnd.choice(("map", "raise")),
        tight=rnd.random() < 0.4,
    )


# ---------------------------------------------------------------- what the hops saw


@dataclass
class HopRecord:
    hop: str
    rid: str
    status: int | None
    decided_by: str | None
    outcome: str | None
    decisions: list[Any]
    attempt: int


@dataclass
class Seen:
    records: list[HopRecord] = field(default_factory=list)
    # (hop that answered, rid) -> (status, headers) of each response a hop answered
    answers: list[tuple[str, str, int, dict[str, str], float]] = field(default_factory=list)
    own_raise: set[tuple[str, str]] = field(default_factory=set)
    c_calls: Counter[str] = field(default_factory=Counter)  # rid -> calls at any C
    c_calls_at: list[tuple[float, str, str]] = field(default_factory=list)  # (t, host, rid)
    top: list[tuple[int, float, str, int | None, dict[str, str]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Recorder:
    """A RequestObserver: keeps each hop's decision context by the request's chaos id."""

    def __init__(self, hop: str, seen: Seen) -> None:
        self.hop = hop
        self.seen = seen

    def start(self, ctx: Any, scope: Any) -> Any:
        return _rid(scope)

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.seen.records.append(
            HopRecord(
                self.hop,
                token,
                ctx.status,
                ctx.decided_by,
                ctx.outcome,
                list(ctx.decisions),
                ctx.inbound_attempt,
            )
        )


def _rid(scope: Any) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"x-chaos-id":
            return str(value.decode())
    return "?"


class Faults:
    def __init__(self, schedule: Schedule, clock: FakeClock, t0: float) -> None:
        self.schedule = schedule
        self.clock = clock
        self.t0 = t0

    def now(self) -> float:
        return self.clock.monotonic() - self.t0

    def active(self, kind: str, target: str = "") -> Fault | None:
        t = self.now()
        for fault in self.schedule.faults:
            if fault.kind == kind and fault.target == target and fault.on(t):
                return fault
        return None

    def instance_fault(self, target: str) -> Fault | None:
        t = self.now()
        for fault in self.schedule.faults:
            if fault.target == target and fault.on(t):
                return fault
        return None


class BrokenBody(httpx.AsyncByteStream):
    """The head came; the connection drops after the first chunk."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk[:1]
            break
        raise httpx.ReadError("connection reset by peer (chaos)")

    async def aclose(self) -> None:
        await self.inner.aclose()


class Recording(httpx.AsyncBaseTransport):
    """The inner transport of a hop's FidelityTransport: routes to the next hop's app
    (by host:port), applies the connection-level faults, and records the answers."""

    def __init__(
        self,
        hop: str,
        apps: dict[str, Any],
        seen: Seen,
        faults: Faults,
    ) -> None:
        self.hop = hop
        # (an error an app lets out is answered 500, as a server would)
        self.apps = {
            host: httpx.ASGITransport(app=app, raise_app_exceptions=False)
            for host, app in apps.items()
        }
        self.seen = seen
        self.faults = faults

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = f"{request.url.host}:{request.url.port}"
        rid = request.headers.get("x-chaos-id", "?")
        if host in C_HOSTS:
            self.seen.c_calls[rid] += 1
            self.seen.c_calls_at.append((self.faults.now(), host, rid))
        fault = self.faults.instance_fault(host)
        if fault is not None and fault.kind == "refuse":
            raise httpx.ConnectError("connection refused (chaos)", request=request)
        response = await self.apps[host].handle_async_request(request)
        self.seen.answers.append(
            (host, rid, response.status_code, dict(response.headers), self.faults.now())
        )
        if fault is not None and fault.kind == "reset" and response.status_code == 200:
            response.stream = BrokenBody(response.stream)
        return response


def hop_policy(schedule: Schedule, *, service: bool) -> Policy:
    limit = RateLimit(name="per-client", rate=f"{LIMIT_PER_S}/s", burst=LIMIT_PER_S)
    if service and schedule.tight:
        # A's calls all come from one address: B's limit for it is below what A sends
        # in a burst, so B refuses some; never one the first attempts left room for
        limit = RateLimit(name="per-client", rate=f"{TIGHT_PER_S}/s", burst=TIGHT_PER_S)
    breaker = BreakerConfig(
        failure_ratio=FAILURE_RATIO, min_calls=MIN_CALLS, window_s=5.0, open_s=OPEN_S,
        open_min_s=0.25, half_open_probes=1, consecutive_failures=CONSECUTIVE_FAILURES,
    )  # fmt: skip
    retry = RetryConfig(attempts=ATTEMPTS, base_ms=10, max_ms=100, retry_after_max_s=5.0)
    upstreams: list[UpstreamConfig] = []
    if service:
        upstreams.append(
            UpstreamConfig(
                host="c",
                instances=C_INSTANCES,
                retry=retry,
                breaker=breaker,
                attempt_timeout_ms=1_000,
                shared_budget=True,
                hedge=HedgeConfig(after_ms=200, max_hedges=MAX_HEDGES) if schedule.hedge else None,
            )
        )
    upstreams.append(UpstreamConfig(host="*", retry=retry, breaker=breaker))
    return Policy(
        rate_limits=(limit,),
        breaker=BreakerConfig(
            failure_ratio=0.5,
            min_calls=10,
            window_s=5.0,
            open_s=OPEN_S,
            open_min_s=0.25,
            half_open_probes=1,
        ),
        upstreams=tuple(upstreams),
    )


def leaf_app(host: str, faults: Faults, clock: FakeClock) -> Any:
    """One instance of C: answers 200 unless a fault of its own is on."""

    async def handler(request: Request) -> Response:
        fault = faults.instance_fault(host)
        if fault is not None:
            if fault.kind == "err503":
                return Response(b"busy", 503)
            if fault.kind == "err500":
                return Response(b"broken", 500)
            if fault.kind == "slow":
                await clock.sleep(float(fault.param))
            if fault.kind == "r429":
                return Response(b"slow down", 429, headers={"retry-after": fault.param})
        return Response(b"c:" + host.encode())

    return Starlette(routes=[Route("/c", handler)])


@dataclass
class Chain:
    clock: FakeClock
    a: Any  # A's ASGI app (with its middleware)
    seen: Seen
    faults: Faults
    a_mw: Any
    b_mw: Any


def build(schedule: Schedule) -> Chain:
    clock = FakeClock()
    seen = Seen()
    faults = Faults(schedule, clock, clock.monotonic())
    rng_seed = schedule.seed

    def middleware(app: Any, hop: str, service: bool, n: int) -> Any:
        # added as users do: inside Starlette's ServerErrorMiddleware, which would
        # otherwise answer an escaped control refusal 500 before ours sees it
        app.add_middleware(
            FidelityMiddleware,
            policy=hop_policy(schedule, service=service),
            clock=clock,
            rng=seeded_random(rng_seed * 10 + n),
            observer=Recorder(hop, seen),
            telemetry=False,
        )
        return app

    c_apps = {
        host: middleware(leaf_app(host, faults, clock), f"C{i + 1}", False, 3 + i)
        for i, host in enumerate(C_HOSTS)
    }
    to_c = httpx.AsyncClient(
        transport=FidelityTransport(
            Recording("B", c_apps, seen, faults), clock=clock, telemetry=False
        ),
        timeout=None,
    )

    async def b_handler(request: Request) -> Response:
        rid = request.headers["x-chaos-id"]
        if faults.active("b_raise") is not None:
            seen.own_raise.add(("B", rid))
            raise RuntimeError("B's own bug (chaos)")
        return await call("B", rid, to_c, "http://c/c", schedule.handler_style, seen)

    b_mw = middleware(Starlette(routes=[Route("/b", b_handler)]), "B", True, 2)
    to_b = httpx.AsyncClient(
        transport=FidelityTransport(
            Recording("A", {B_HOST: b_mw}, seen, faults), clock=clock, telemetry=False
        ),
        timeout=None,
    )

    async def a_handler(request: Request) -> Response:
        rid = request.headers["x-chaos-id"]
        return await call("A", rid, to_b, f"{B_URL}/b", schedule.handler_style, seen)

    a_mw = middleware(Starlette(routes=[Route("/a", a_handler)]), "A", False, 1)
    return Chain(clock, a_mw, seen, faults, a_mw, b_mw)


async def call(
    hop: str, rid: str, client: httpx.AsyncClient, url: str, style: str, seen: Seen
) -> Response:
    headers = {"x-chaos-id": rid}
    if style == "raise":
        # the errors escape: the middleware answers the control refusals and give-ups
        try:
            async with client.stream("GET", url, headers=headers) as upstream:
                body = await upstream.aread()
                upstream.raise_for_status()
        except Exception as exc:
            if own_error(exc):
                seen.own_raise.add((hop, rid))
            raise
        return Response(body)
    try:
        async with client.stream("GET", url, headers=headers) as upstream:
            body = await upstream.aread()
    except httpx.HTTPError as exc:
        return Response(f"{hop}: {type(exc).__name__}".encode(), 502)
    if upstream.status_code >= 400:
        return Response(b"upstream failed", 502 if upstream.status_code >= 500 else 424)
    return Response(body)


def own_error(exc: BaseException) -> bool:
    """An error that is the app's to answer (a 500 is fair), not one the outbound layer
    decided or gave up with (the middleware answers those 502/503/504)."""
    if isinstance(exc, FidelityError):
        return False
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.extensions.get("fidelity_give_up") is None
    return getattr(exc, "fidelity_give_up", None) is None


# ---------------------------------------------------------------- driving it


async def _send_disconnecting(app: Any, rid: str, seen: Seen) -> int | None:
    """A client that sends its request and goes away at once."""
    sent: list[dict[str, Any]] = []
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(
        "/a",
        headers=[(b"host", b"a"), (b"x-chaos-id", rid.encode())],
        client=("192.0.2.7", 5000),
        server=("a", 80),
    )
    try:
        await app(scope, receive, send)
    except Exception as exc:
        # Starlette's ServerErrorMiddleware re-raises what the app raised (the server
        # logs it): fair for the app's own error, not for one of ours
        if ("A", rid) not in seen.own_raise or not own_error(exc):
            raise
    for message in sent:
        if message["type"] == "http.response.start":
            return int(message["status"])
    return None


async def _send(chain: Chain, client: httpx.AsyncClient, i: int, t: float) -> None:
    schedule = chain.faults.schedule
    rid = str(i)
    headers = {"x-chaos-id": rid}
    short = chain.faults.active("short_deadline")
    if short is not None:
        headers["x-request-timeout-ms"] = short.param
    try:
        if chain.faults.active("disconnect") is not None and i % 2 == 0:
            status = await _send_disconnecting(chain.a, rid, chain.seen)
            chain.seen.top.append((i, t, "disconnect", status, {}))
            return
        response = await client.get("http://a/a", headers=headers)
        kind = "short" if short is not None else "plain"
        chain.seen.top.append((i, t, kind, response.status_code, dict(response.headers)))
    except Exception as exc:  # an exception out of the whole stack is a finding
        chain.seen.errors.append(f"request {rid} (seed {schedule.seed}): {exc!r}")
        chain.seen.top.append((i, t, "error", None, {}))


async def run_schedule(schedule: Schedule) -> Chain:
    chain = build(schedule)
    clock = chain.clock
    t0 = chain.faults.t0
    transport = httpx.ASGITransport(
        app=chain.a, raise_app_exceptions=False, client=("192.0.2.7", 5000)
    )
    async with httpx.AsyncClient(transport=transport, timeout=None) as client:
        i = 0
        sends = schedule.sends
        while i < len(sends):
            batch = [i]
            while batch[-1] in schedule.concurrent and batch[-1] + 1 < len(sends):
                batch.append(batch[-1] + 1)
            # the pauses before them (one that a slow instance held up moved the clock
            # already, and the schedule goes on from there), then they go together
            clock.advance(sum(sends[j] for j in batch))
            t = clock.monotonic() - t0
            await asyncio.gather(*(_send(chain, client, j, t) for j in batch))
            i = batch[-1] + 1
    return chain


# ---------------------------------------------------------------- the invariants


def check(chain: Chain) -> list[str]:
    schedule = chain.faults.schedule
    seen = chain.seen
    problems: list[str] = list(seen.errors)
    # B's own faults: its handler raising, or letting out an upstream's error that the
    # outbound layer did not give up on (the app's to answer: a bare 500 of B's)
    b_faulty = any(f.kind == "b_raise" for f in schedule.faults) or any(
        hop == "B" for hop, _rid in seen.own_raise
    )

    # 1. no 500 but an app's own raised error
    for host, rid, status, _headers, t in seen.answers:
        if status == 500:
            hop = "B" if host == B_HOST else f"C{C_HOSTS.index(host) + 1}"
            if hop.startswith("C"):
                fault = chain.faults.schedule.faults
                if any(f.kind == "err500" and f.target == host and f.on(t) for f in fault):
                    continue  # C's own 500 (approximately the answer's time)
                if any(f.kind == "err500" and f.target == host for f in fault):
                    continue
            if (hop, rid) not in seen.own_raise:
                problems.append(f"{hop} answered 500 to request {rid} without raising")
    for i, _t, kind, status, _headers in seen.top:
        if status == 500 and ("A", str(i)) not in seen.own_raise:
            problems.append(f"A answered 500 to request {i} ({kind})")

    # 2. every layer's refusal is named, by the header and by the record
    for rec in seen.records:
        if (
            rec.decided_by not in (None, "app")
            and rec.status not in (429, 503, 504, None, 499)
            and rec.outcome != "shed"
        ):
            problems.append(
                f"{rec.hop} request {rec.rid}: decided_by={rec.decided_by} "
                f"status={rec.status} outcome={rec.outcome}"
            )
    for host, rid, status, headers, _t in seen.answers:
        layer = headers.get("x-fidelity-decided-by")
        if layer is not None and status not in (429, 503, 504):
            problems.append(f"{host} marked a {status} to {rid} decided by {layer}")

    # 3. recovery: everything sent RECOVERY_S after the last fault ended succeeds
    limited = _limited_at_b(chain) if schedule.tight else set()
    for i, t, _kind, status, headers in seen.top:
        if str(i) in limited:
            continue  # (the client sent more than B's limit: item 6 holds that to account)
        if t >= schedule.faults_end + RECOVERY_S and status != 200:
            problems.append(
                f"request {i} sent {t - schedule.faults_end:.2f} s after the faults "
                f"ended: {status} {headers.get('x-fidelity-decided-by')}"
            )

    # 4. retries at one hop only: once B retried C for a request and answered it 5xx,
    # A does not send B that request again (B owned its retries); so the hops' retries
    # add up (A retried a B that had not), never multiply
    b_rounds: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    for rec in seen.records:
        if rec.hop == "B":
            sent = sum(
                1
                for d in rec.decisions
                if d.layer == "retry" and d.subject == "c" and d.verdict in ("allow", "retry")
            )
            b_rounds[rec.rid].append((sent, rec.status))
    for rid, rounds in b_rounds.items():
        for sent, status in rounds[:-1]:
            if sent > 1 and status is not None and status >= 500:
                problems.append(
                    f"request {rid}: A sent B the request again after B retried C and "
                    f"answered {status} (B's rounds: {rounds})"
                )
    per_hop = 2 * ATTEMPTS - 1
    bound = per_hop * (1 + MAX_HEDGES) if schedule.hedge else per_hop
    for rid, n in seen.c_calls.items():
        if n > bound:
            problems.append(f"request {rid}: {n} calls at C (bound {bound})")

    # 5. A's breaker for B never opens on a fault that B's breaker owns: B's marked
    # answers (its control layer's refusals, its give-ups) are no evidence against B,
    # so A's breaker opens only after B failed on its own, unmarked, often enough
    opened = [
        d.at - chain.faults.t0
        for rec in seen.records
        if rec.hop == "A"
        for d in rec.decisions
        if d.layer == "breaker" and d.subject == B_HOST and d.reason == "breaker_open"
    ]
    if opened:
        first_open = min(opened)
        unmarked = [
            rid
            for host, rid, status, headers, t in seen.answers
            if host == B_HOST
            and t <= first_open
            and status >= 500
            and "x-fidelity-decided-by" not in headers
            and headers.get("x-fidelity-retry") != "exhausted"
            and headers.get("x-fidelity-fault") != "upstream"
        ]
        if len(unmarked) < min(CONSECUTIVE_FAILURES, math.ceil(MIN_CALLS * FAILURE_RATIO)):
            problems.append(
                f"A's breaker for B opened at {first_open:.3f} s after only "
                f"{len(unmarked)} unmarked failures of B ({unmarked})"
            )
        if not b_faulty:
            problems.append(f"A's breaker for B opened at {first_open:.3f} s; B had no fault")

    # 6. retries never spend rate-limit quota: no hop below A refuses 429 by its limit,
    # or (a tight B) none that the first attempts alone left room for
    if schedule.tight:
        problems += _quota_problems(chain)
    else:
        for host, rid, status, headers, _t in seen.answers:
            if status == 429 and headers.get("x-fidelity-decided-by") == "ratelimit":
                problems.append(f"{host} rate-limited request {rid}")
    for i, _t, _kind, status, _headers in seen.top:
        if status == 429:
            problems.append(f"A rate-limited request {i}")

    # 7. a healthy instance keeps receiving calls while another is faulty
    problems += _share_problems(chain)
    return problems


def _limited_at_b(chain: Chain) -> set[str]:
    """The top-level requests B's limit refused (an attempt of them)."""
    return {
        rec.rid for rec in chain.seen.records if rec.hop == "B" and rec.decided_by == "ratelimit"
    }


def _quota_problems(chain: Chain) -> list[str]:
    """B's limit against a reference bucket of the same size charged with what the
    client's requests may cost there: every first attempt, and a retry after a 429 (it
    waited the Retry-After: a request again), never a retry after a failure. A request
    B refused while the reference had a token left paid for a retry."""
    ref = RefBucket(TIGHT_PER_S, 1.0, TIGHT_PER_S, chain.faults.t0)
    asked: list[tuple[float, HopRecord]] = []
    for rec in chain.seen.records:
        if rec.hop != "B":
            continue
        for d in rec.decisions:
            if d.layer == "ratelimit":
                asked.append((d.at, rec))
                break
    asked.sort(key=lambda item: item[0])
    refused_before: set[str] = set()
    problems: list[str] = []
    for at, rec in asked:
        charged = rec.attempt == 1 or rec.rid in refused_before
        if rec.decided_by == "ratelimit":
            refused_before.add(rec.rid)
            if ref.ask(at, 1).allowed == frozenset({True}):
                problems.append(
                    f"B refused request {rec.rid} (attempt {rec.attempt}) with "
                    f"{float(ref.tokens):.2f} tokens left for the first attempts"
                )
        elif charged:
            ref.refill(at)
            ref.take(1)
    return problems


def _share_problems(chain: Chain) -> list[str]:
    schedule = chain.faults.schedule
    problems: list[str] = []
    for fault in schedule.faults:
        if fault.kind not in INSTANCE_FAULTS:
            continue
        others_faulty = [
            f
            for f in schedule.faults
            if f is not fault and f.start < fault.end and fault.start < f.end
        ]
        if others_faulty:
            continue
        calls: dict[str, int] = defaultdict(int)
        for t, host, _rid in chain.seen.c_calls_at:
            if fault.on(t):
                calls[host] += 1
        if sum(calls.values()) < 20:
            continue
        for host in C_HOSTS:
            if host != fault.target and calls[host] == 0:
                problems.append(
                    f"healthy {host} got no call while {fault.target} had {fault.kind} "
                    f"({dict(calls)})"
                )
    return problems


def run_and_check(seed: int) -> tuple[Schedule, Chain, list[str]]:
    schedule = draw(seed)
    chain = asyncio.run(run_schedule(schedule))
    return schedule, chain, check(chain)
