"""The route bulkhead through the real middleware: limits, priorities, queueing, and what a
capacity shed does not cost (rate-limit quota, breaker outcomes). Fake clock throughout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import fidelity_mw
from _asgi import http_scope
from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit, RouteConfig
from fidelity_mw.context import LAYER_CONCURRENCY, QUEUED, SHED
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


class Service:
    """A route whose requests wait until released, so tests control what is in flight."""

    def __init__(self, policy: Policy, clock: FakeClock, work_s: float = 0.0) -> None:
        self.clock = clock
        self.work_s = work_s  # (a test may change it between requests)
        self.gate = asyncio.Event()
        self.entered = 0
        self.contexts: list[Any] = []
        # The event loop stays busy this long after each request (another task's CPU work)
        self.busy_after_s = 0.0

        async def work(request: Request) -> Response:
            # one route (one bulkhead): ?hold=1 keeps the request in flight until released
            self.entered += 1
            if request.query_params.get("hold"):
                await self.gate.wait()
            clock.advance(self.work_s)
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/w", work)])
        self.mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)

        async def capture(scope: Any, receive: Any, send: Any) -> None:
            await self.mw(scope, receive, send)
            if scope["type"] == "http":
                self.contexts.append(scope["state"]["fidelity"])
                # no await since the middleware returned: what is ready now waits this long
                clock.advance(self.busy_after_s)

        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=capture, client=("127.0.0.1", 5000)),
            base_url="http://svc",
        )

    async def in_flight(self, n: int) -> None:
        for _ in range(5000):
            if self.entered >= n:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"only {self.entered} of {n} requests reached the app")


def concurrency_decisions(ctx: Any) -> list[Any]:
    return [d for d in ctx.decisions if d.layer == LAYER_CONCURRENCY]


async def test_requests_over_the_limit_get_503_with_retry_after_and_a_problem_body(
    clock: FakeClock,
) -> None:
    svc = Service(Policy(breaker=None, concurrency=ConcurrencyConfig(limit=2)), clock)
    held = [asyncio.create_task(svc.client.get("/w?hold=1")) for _ in range(2)]
    await svc.in_flight(2)
    refused = await svc.client.get("/w?hold=1")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["x-fidelity-decided-by"] == "concurrency"
    body = json.loads(refused.content)
    assert body["type"] == "urn:fidelity-mw:problem:concurrency-limit"
    assert svc.entered == 2
    ctx = svc.contexts[-1]
    assert (ctx.decided_by, ctx.outcome) == ("concurrency", "shed")
    (decision,) = concurrency_decisions(ctx)
    assert (decision.verdict, decision.reason) == (SHED, "at_limit")
    assert decision.details == {"limit": 2, "in_flight": 2, "priority": "default"}
    svc.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
    # the slots came back
    assert (await svc.client.get("/w")).status_code == 200
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.in_flight == 0


async def test_a_capacity_shed_costs_no_rate_limit_quota(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1),
        rate_limits=[RateLimit(name="per-client", rate="2/min", burst=2)],
    )
    svc = Service(policy, clock)
    held = asyncio.create_task(svc.client.get("/w?hold=1"))  # unit 1 of 2
    await svc.in_flight(1)
    for _ in range(3):
        assert (await svc.client.get("/w?hold=1")).status_code == 503  # shed: no units spent
    svc.gate.set()
    assert (await held).status_code == 200
    assert (await svc.client.get("/w")).status_code == 200  # unit 2 of 2
    assert (await svc.client.get("/w")).status_code == 429  # and now the quota is gone


async def test_a_capacity_shed_is_no_breaker_outcome(clock: FakeClock) -> None:
    breaker = BreakerConfig(consecutive_failures=1, min_calls=1)
    svc = Service(Policy(breaker=breaker, concurrency=ConcurrencyConfig(limit=1)), clock)
    held = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    for _ in range(5):
        assert (await svc.client.get("/w?hold=1")).status_code == 503
    svc.gate.set()
    assert (await held).status_code == 200
    # Every shed left the breaker alone: the next request is served, not shed by it.
    assert (await svc.client.get("/w")).status_code == 200
    sheds = [ctx for ctx in svc.contexts if ctx.outcome == "shed"]
    assert len(sheds) == 5
    assert all(d.layer == LAYER_CONCURRENCY for ctx in sheds for d in ctx.decisions)


async def test_sheddable_requests_are_shed_first_and_trusted_headers_set_the_class(
    clock: FakeClock,
) -> None:
    policy = Policy(
        breaker=None,
        priority_header="x-priority",
        concurrency=ConcurrencyConfig(limit=4, default_share=0.75, sheddable_share=0.5),
    )
    svc = Service(policy, clock)
    held = [asyncio.create_task(svc.client.get("/w?hold=1")) for _ in range(2)]
    await svc.in_flight(2)
    # 2 of 4 in flight: sheddable (share 0.5 -> 2 slots) is refused, default still admitted
    shed = await svc.client.get("/w", headers={"x-priority": "sheddable"})
    assert shed.status_code == 503
    (decision,) = concurrency_decisions(svc.contexts[-1])
    assert (decision.reason, decision.details["priority"]) == ("priority_share", "sheddable")
    held.append(asyncio.create_task(svc.client.get("/w?hold=1")))  # default: 3 of 4
    await svc.in_flight(3)
    assert (await svc.client.get("/w")).status_code == 503  # default share is 3
    critical = await svc.client.get("/w", headers={"x-priority": "critical"})
    assert critical.status_code == 200  # critical may fill the limit
    svc.gate.set()
    assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]


async def test_priority_header_from_an_untrusted_peer_is_ignored(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None,
        priority_header="x-priority",
        trusted_peers=("10.0.0.0/8",),
        concurrency=ConcurrencyConfig(limit=2, default_share=0.5, sheddable_share=0.5),
        routes=[RouteConfig(match="/w", priority="sheddable")],
    )
    svc = Service(policy, clock)
    held = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    # 127.0.0.1 is not trusted here: its "critical" does not lift the route's class
    refused = await svc.client.get("/w", headers={"x-priority": "critical"})
    assert refused.status_code == 503
    assert concurrency_decisions(svc.contexts[-1])[0].details["priority"] == "sheddable"
    svc.gate.set()
    await held


async def test_a_queued_request_takes_the_freed_slot(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=60_000)
    )
    svc = Service(policy, clock)
    first = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    queued = asyncio.create_task(svc.client.get("/w"))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not queued.done()
    # the queue is full: a third request is refused at once
    assert (await svc.client.get("/w")).status_code == 503
    svc.gate.set()
    assert (await first).status_code == 200
    assert (await queued).status_code == 200
    queued_ctx = next(
        c
        for c in svc.contexts
        if c.method == "GET" and c.status == 200 and concurrency_decisions(c)[0].verdict == QUEUED
    )
    assert concurrency_decisions(queued_ctx)[0].reason == "slot_freed"
    assert svc.mw.engine.bulkheads["/w"].in_flight == 0


async def test_a_queued_request_says_how_long_it_waited_for_its_slot(clock: FakeClock) -> None:
    """The `queued` decision carries the time spent in the queue (`queued_ms`): without it
    a trace showed that a request queued, not for how long."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=60_000)
    )
    svc = Service(policy, clock)
    first = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    queued = asyncio.create_task(svc.client.get("/w"))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not queued.done()
    clock.advance(2.5)
    svc.gate.set()
    assert (await first).status_code == 200
    assert (await queued).status_code == 200
    decisions = [concurrency_decisions(c)[0] for c in svc.contexts]
    waited = [d.details.get("queued_ms") for d in decisions if d.verdict == QUEUED]
    assert waited == [2500.0]
    assert all("queued_ms" not in d.details for d in decisions if d.verdict != QUEUED)


async def test_a_queued_request_whose_deadline_passed_is_refused_not_run(
    clock: FakeClock,
) -> None:
    """A slot handed over after the request's deadline would only run an app that the
    deadline cuts at once: the slot goes on to the next, the request gets the deadline's
    504 (its wait is bounded by its deadline too), and the app never sees it."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=1, queue_timeout_ms=60_000)
    )
    svc = Service(policy, clock)
    first = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    queued = asyncio.create_task(svc.client.get("/w", headers={"x-request-timeout-ms": "100"}))
    limiter = svc.mw.engine.bulkheads["/w"]
    for _ in range(500):
        if limiter.waiting:
            break
        await asyncio.sleep(0)
    assert limiter.waiting == 1
    clock.advance(1.0)  # past the queued request's deadline
    svc.gate.set()
    assert (await first).status_code == 200
    refused = await queued
    assert refused.status_code == 504
    assert svc.entered == 1
    ctx = next(c for c in svc.contexts if c.status == 504)
    assert ctx.decisions[-1].reason == "expired_in_queue"
    assert limiter.in_flight == 0
    assert (await svc.client.get("/w")).status_code == 200  # the slot came back


async def test_a_queued_request_is_refused_when_its_wait_runs_out(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=1)
    )
    svc = Service(policy, clock)
    held = asyncio.create_task(svc.client.get("/w?hold=1"))
    await svc.in_flight(1)
    refused = await svc.client.get("/w")
    assert refused.status_code == 503
    assert concurrency_decisions(svc.contexts[-1])[0].reason == "queue_timeout"
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.waiting == 0
    svc.gate.set()
    await held
    assert limiter.in_flight == 0


async def test_admitted_requests_feed_the_adaptive_limit_their_latency(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=10, adaptive=True, max_limit=100)
    )
    svc = Service(policy, clock, work_s=0.025)
    assert (await svc.client.get("/w")).status_code == 200
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.estimate is not None
    # The first 20 served requests measure the floor (the limit held at 4 meanwhile).
    for _ in range(19):
        assert limiter.limit == 4
        assert (await svc.client.get("/w")).status_code == 200
    assert limiter.estimate.baseline_s == pytest.approx(0.025)
    assert limiter.limit == 10
    assert limiter.in_flight == 0


async def test_a_busy_event_loop_shrinks_the_adaptive_limit(clock: FakeClock) -> None:
    """Requests served at their floor, but the loop stays busy after each: a request
    arriving then waits before the middleware sees it, and the limit must shrink."""
    policy = Policy(
        breaker=None, concurrency=ConcurrencyConfig(limit=10, adaptive=True, max_limit=100)
    )
    svc = Service(policy, clock, work_s=0.01)
    for _ in range(20):  # the floor: 10 ms
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    limiter = svc.mw.engine.bulkheads["/w"]
    for _ in range(10):  # an idle loop: the limit stays (an idle route does not grow it)
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    assert limiter.limit == 10
    svc.busy_after_s = 0.05
    for _ in range(10):
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)  # a server yields to its loop between requests
    assert limiter.limit <= 5
    assert limiter.estimate is not None
    assert limiter.estimate.baseline_s == pytest.approx(0.01)


def test_the_lag_probe_measures_afresh_on_a_new_event_loop() -> None:
    """A probe armed on a loop that closed before it ran must not freeze the lag."""
    from fidelity_mw.inbound.bulkhead import LagProbe

    now = [0.0]
    probe = LagProbe(lambda: now[0])
    old_loop = asyncio.new_event_loop()
    try:
        old_loop.call_soon(probe.arm)  # armed there; that loop never runs again
        old_loop.call_soon(old_loop.stop)
        old_loop.run_forever()
    finally:
        old_loop.close()
    probe.lag_s = 5.0  # what it last measured there
    assert probe.pending

    async def serve_again() -> None:
        probe.arm()
        now[0] += 0.02  # the loop stays busy before the probe's callback runs
        await asyncio.sleep(0)

    asyncio.run(serve_again())
    assert probe.lag_s == pytest.approx(0.02)
    assert not probe.pending


async def test_routes_without_a_bulkhead_record_no_concurrency_decision(clock: FakeClock) -> None:
    svc = Service(Policy(breaker=None), clock)
    assert (await svc.client.get("/w")).status_code == 200
    assert concurrency_decisions(svc.contexts[-1]) == []
    assert fidelity_mw.current() is None


def test_the_map_describes_each_bulkhead_and_where_its_state_lives() -> None:
    from fidelity_mw.tools.statemap import from_policy

    policy = Policy.from_dict(
        {
            "concurrency": {"limit": 10, "adaptive": True, "shed_stale": True},
            "route": [{"match": "/x*", "name": "x", "concurrency": {"limit": 3, "max_queue": 2}}],
        }
    )
    rows = [row for row in from_policy(policy, "t").layers if row.layer == "concurrency"]
    assert [(row.subject, row.config) for row in rows] == [
        ("route x", "route[0].concurrency"),
        ("every other route", "concurrency"),
    ]
    assert "at most 3 in flight; up to 2 wait 50 ms" in rows[0].data
    assert "adaptive limit from 1 to 1000" in rows[1].data
    assert "sheds requests that waited over 0.5x the floor" in rows[1].data
    assert "sheds" not in rows[0].data
    assert all(row.state.startswith("process memory") for row in rows)


async def _raw_get(
    mw: FidelityMiddleware, path: str, headers: dict[bytes, bytes] | None = None
) -> tuple[int, Any]:
    """One GET straight into the middleware (no client in between: it enters in the
    turn its task first runs)."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    path, _, query = path.partition("?")
    scope = http_scope(
        path,
        query_string=query.encode(),
        headers=[(b"host", b"svc"), *(headers or {}).items()],
        server=("svc", 80),
    )
    await mw(scope, receive, send)
    return statuses[0], scope["state"]["fidelity"]


@pytest.mark.parametrize("busy_s", [0.0, 0.008])
async def test_a_lagging_loop_lets_one_more_request_in_per_turn(
    clock: FakeClock, busy_s: float
) -> None:
    """Requests arriving in one turn of a loop that lags (its CPU is the bottleneck):
    one is admitted beside the one in flight, the rest are shed (`paced`); the next
    turn admits one more. A loop that keeps up admits them all, up to the limit.
    (First come, first served: `newest_first = false`; the default holds the turn.)"""
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_limit=100, newest_first=False),
    )
    svc = Service(policy, clock, work_s=0.01)
    svc.busy_after_s = busy_s
    for _ in range(21):  # the floor, then one more so the lag is reported
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.limit == 4
    assert limiter.pacing is (busy_s > 0)
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(22)
    clock.advance(0.002)  # past the first one's pacing turn (PACE_S)
    batch = [asyncio.create_task(_raw_get(svc.mw, "/w?hold=1")) for _ in range(3)]
    await asyncio.sleep(0)  # the batch's turn
    if busy_s:
        assert limiter.in_flight == 2
        shed = [await t for t in batch if t.done()]
        assert [status for status, _ctx in shed] == [503, 503]
        for _status, ctx in shed:
            assert [d.reason for d in concurrency_decisions(ctx)] == ["paced"]
        await asyncio.sleep(0)  # a loop turn later...
        clock.advance(0.0005)  # ...but within PACE_S of the admission
        early = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
        assert (await early)[0] == 503
        clock.advance(0.0006)
        late = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
        await svc.in_flight(24)
        assert limiter.in_flight == 3
        batch.append(late)
    else:
        assert limiter.in_flight == 4
    svc.gate.set()
    served = [await t for t in [first, *batch] if not t.done() or t.result()[0] == 200]
    assert [status for status, _ctx in served] == [200] * (3 if busy_s else 4)
    assert limiter.in_flight == 0


class _HandClock:
    """A LoopClock whose heartbeat the test drives by hand (its own timer never fires)."""

    @staticmethod
    def make(now: list[float]) -> Any:
        from fidelity_mw.inbound.bulkhead import LoopClock

        class Hand(LoopClock):
            TICK_S = 3600.0

        return Hand(lambda: now[0])


async def test_the_loop_clock_bounds_how_long_a_request_waited_to_be_read() -> None:
    """The bound is the time since the last tick before the I/O phase that read the
    request: the tick before the latest while the latest ran in this turn (the request
    was read just before it), else the latest."""
    now = [0.0]
    clock = _HandClock.make(now)
    loop = asyncio.get_running_loop()
    assert clock.waited(0.0) is None  # the heartbeat starts: nothing known yet
    now[0] = 0.001
    clock._tick(loop)
    assert clock.waited(0.0011) is None  # read before the first tick: unknown
    await asyncio.sleep(0)  # the next turn: read after the tick
    assert clock.waited(0.0015) == pytest.approx(0.0005)
    now[0] = 0.002
    clock._tick(loop)  # on time: the loop was waiting for I/O
    await asyncio.sleep(0)
    now[0] = 0.0101  # an 8 ms CPU step held the loop; then its I/O phase and the tick
    clock._tick(loop)
    read_during_the_step = clock.waited(0.0102)
    assert read_during_the_step == pytest.approx(0.0082)
    await asyncio.sleep(0)
    assert clock.waited(0.0105) == pytest.approx(0.0004)  # read once the loop was free


async def test_the_loop_clock_stops_when_requests_stop_and_restarts_unknown() -> None:
    now = [0.0]
    clock = _HandClock.make(now)
    loop = asyncio.get_running_loop()
    clock.waited(0.0)
    now[0] = 0.05
    clock._tick(loop)
    assert clock._handle is not None
    now[0] = 0.2  # no request for IDLE_S: the heartbeat stops
    clock._tick(loop)
    assert clock._handle is None
    assert clock.waited(0.3) is None  # restarted: unknown until it ticks again


@pytest.mark.parametrize("max_queue", [0, 2])
async def test_a_request_read_after_a_long_cpu_step_is_shed_as_stale_beside_one_in_flight(
    clock: FakeClock, max_queue: int
) -> None:
    """shed_stale: while the loop is the bottleneck, a request that waited past the
    tolerance to be read is not queued behind the one in flight (503, `stale`, with its
    bound in the decision; nor put in the route's queue, where it would only grow
    staler); a fresh one is; critical ones never."""
    policy = Policy(
        breaker=None,
        priority_header="x-priority",
        trusted_peers=("127.0.0.1",),
        concurrency=ConcurrencyConfig(
            limit=4, adaptive=True, max_limit=100, shed_stale=True, max_queue=max_queue
        ),
    )
    svc = Service(policy, clock, work_s=0.01)
    svc.busy_after_s = 0.008
    now = [0.0]
    hand = _HandClock.make(now)
    svc.mw._bulkheads._clock = hand
    for _ in range(21):  # the floor (10 ms), then one more so the lag is reported
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    limiter = svc.mw.engine.bulkheads["/w"]
    assert limiter.pacing
    assert limiter.stale_after_s == pytest.approx(0.005)
    first = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(22)
    loop = asyncio.get_running_loop()
    now[0] = clock.monotonic() - 0.009  # the tick before a 9 ms CPU step
    hand._tick(loop)
    await asyncio.sleep(0)
    now[0] = clock.monotonic()
    hand._tick(loop)  # the step ended; this turn's requests were read just before it
    clock.advance(0.002)  # past the first one's pacing turn
    status, ctx = await _raw_get(svc.mw, "/w")  # (not held: admitted, it would just finish)
    assert status == 503
    [decision] = concurrency_decisions(ctx)
    assert (decision.verdict, decision.reason) == (SHED, "stale")
    assert decision.details is not None
    assert decision.details["waited_ms"] == pytest.approx(11.0)
    assert limiter.in_flight == 1
    critical = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1", {b"x-priority": b"critical"}))
    await svc.in_flight(23)
    assert limiter.in_flight == 2
    await asyncio.sleep(0)  # a later turn: read after the tick, 2 ms ago
    clock.advance(0.0005)
    fresh = asyncio.create_task(_raw_get(svc.mw, "/w?hold=1"))
    await svc.in_flight(24)
    assert limiter.in_flight == 3
    svc.gate.set()
    served = [await t for t in (first, critical, fresh)]
    assert [status for status, _ctx in served] == [200, 200, 200]
    assert [d.details["waited_ms"] for d in concurrency_decisions(served[2][1])] == [
        pytest.approx(2.5)
    ]


async def test_the_loop_heartbeat_runs_only_while_a_stale_shedding_route_is_pacing(
    clock: FakeClock,
) -> None:
    """A service that keeps up is never woken every millisecond for the loop clock."""
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, max_limit=100, shed_stale=True),
    )
    svc = Service(policy, clock, work_s=0.01)
    for _ in range(25):
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    limiter = svc.mw.engine.bulkheads["/w"]
    assert not limiter.pacing
    assert svc.mw._bulkheads.loop_clock()._handle is None
    svc.busy_after_s = 0.008  # now the loop lags: pacing, and the heartbeat starts
    for _ in range(3):
        assert (await svc.client.get("/w")).status_code == 200
        await asyncio.sleep(0)
    assert limiter.pacing
    assert svc.mw._bulkheads.loop_clock()._handle is not None
    svc.mw._bulkheads.loop_clock()._handle.cancel()


def test_the_map_names_the_routes_that_opted_out_of_the_policys_bulkhead() -> None:
    """`concurrency = false` on a route takes it out of `[concurrency]`: the map's row for
    the policy-wide bulkhead says so rather than claim every other route."""
    from fidelity_mw.tools.statemap import from_policy

    policy = Policy.from_dict(
        {
            "concurrency": {"limit": 10},
            "route": [
                {"match": "/health", "name": "health", "concurrency": False},
                {"match": "/x*", "name": "x", "concurrency": {"limit": 3}},
            ],
        }
    )
    rows = [row for row in from_policy(policy, "t").layers if row.layer == "concurrency"]
    assert [(row.subject, row.config) for row in rows] == [
        ("route x", "route[1].concurrency"),
        ("every other route except route health", "concurrency"),
    ]
