"""Outbound defects left alone by the last review, and a 429/503's Retry-After scoped to
the instance that sent it (out19): each test failed before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    FidelityMiddleware,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    current,
)
from fidelity_mw.context import DecisionContext
from fidelity_mw.decide.balance import InstanceView, choose
from fidelity_mw.decide.breaker import FAILURE, HALF_OPEN, IGNORED, OPEN, SUCCESS, Gate
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.decisions import GIVE_UP_EXTENSION
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    HedgeConfig,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.state.base import LATE_ANSWER
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

# (`record_now` stays: the middleware's route breakers need it; without a gate of its own
# the transport finds no in-process operations)
_IN_PROCESS = frozenset(
    ("outbound_gate_now", "outbound_begin_now", "breakers_open_until_now", "budget_refund_now")
)


class Remote:
    """A memory store without its in-process outbound operations (as Redis is): the loop
    awaits every gate and record. `hold(args)` runs before a gate when set (the reply is late)."""

    def __init__(self, hold: Callable[[tuple[Any, ...]], Awaitable[None]] | None = None) -> None:
        self.inner = MemoryStore()
        self.hold = hold

    def __getattr__(self, name: str) -> Any:
        if name in _IN_PROCESS:
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def outbound_gate(self, *args: Any) -> Any:
        if self.hold is not None:
            await self.hold(args)
        return await self.inner.outbound_gate(*args)


# ------------------------------------- 1. a hedged call and another call at once


def _gather_app(
    store: Any, budget: RetryConfig, b_done: asyncio.Event
) -> tuple[Starlette, list[Any]]:
    """One request makes two calls at once (`asyncio.gather`): a hedged call to `svc`,
    whose attempts answer 200 once the other call is over, and a call to `down`, which
    fails to connect every time: retried, given up (`attempts`), its error let out of
    the app (the middleware answers it 502, marked exhausted)."""
    seen: list[Any] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            raise httpx.ConnectError("refused", request=request)
        await b_done.wait()
        for _ in range(5):  # (the hedge's gate, answered, is acted on first)
            await asyncio.sleep(0)
        return httpx.Response(200)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def call_down() -> httpx.Response:
        try:
            return await outbound.get("http://down/x")
        finally:
            b_done.set()

    async def handler(request: Request) -> Response:
        seen.append(current())
        results = await asyncio.gather(
            outbound.get("http://svc/x"), call_down(), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        upstreams=(
            UpstreamConfig(host="svc", retry=budget, hedge=HedgeConfig(after_ms=50)),
            UpstreamConfig(host="down", retry=RetryConfig(attempts=3, base_ms=1, max_ms=1)),
        ),
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=FakeClock(), store=store, telemetry=False
    )
    return app, seen


async def _answer(app: Starlette) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/")


def _the_other_calls_give_up_stands(response: httpx.Response, ctx: DecisionContext) -> None:
    assert ctx.upstream_exhausted is True
    give_ups = [(d.subject, d.layer, d.reason) for d in ctx.decisions if d.verdict == "give_up"]
    assert ("down", "retry", "attempts") in give_ups
    assert response.status_code == 502
    assert response.headers["x-fidelity-retry"] == "exhausted"


async def test_a_refused_hedge_on_a_remote_store_keeps_another_calls_records() -> None:
    """Before: the hedge's gate marked the request's records, awaited the store, and on
    the budget's refusal deleted every record after the mark and set the flags back:
    the other call's give-up, recorded while the gate was in flight, went with them,
    and its connect error escaped the app as a bare 500 (no `exhausted` marker)."""
    b_done = asyncio.Event()

    async def hold(args: tuple[Any, ...]) -> None:
        if args[4] and args[2] == "budget:svc":  # the hedge's gate: answered late
            await b_done.wait()

    store = Remote(hold)
    # no retry (so no hedge) in svc's budget: the hedge is refused
    no_budget = RetryConfig(attempts=3, base_ms=1, max_ms=1, budget_ratio=0.0, budget_min_per_s=0.0)
    app, seen = _gather_app(store, no_budget, b_done)
    response = await _answer(app)
    ctx = seen[0]
    refused = [d for d in ctx.decisions if d.reason == "no_hedge"]
    assert [(d.layer, d.details["why"]) for d in refused] == [("budget", "budget")]
    _the_other_calls_give_up_stands(response, ctx)


async def test_a_hedged_calls_good_answer_keeps_another_calls_exhausted_flag() -> None:
    """Before: a hedged call ended by a good answer set the request's flags back to what
    they were when it began, taking the mark of a call that gave up meanwhile."""
    b_done = asyncio.Event()
    budget = RetryConfig(attempts=3, base_ms=1, max_ms=1)
    app, seen = _gather_app(MemoryStore(), budget, b_done)
    response = await _answer(app)
    ctx = seen[0]
    assert any(d.verdict == "hedge" for d in ctx.decisions)  # raced, and answered well
    _the_other_calls_give_up_stands(response, ctx)


# ------------------------------------- 2. a give-back through a second raw cancel


PROBING = BreakerConfig(
    consecutive_failures=1, open_s=0.01, open_jitter=0.0, half_open_probes=1, probe_lease_s=30.0
)


class LateGate(Remote):
    """A remote store whose next gate is answered only after its caller was cancelled
    (the answer rides on the cancellation, `LATE_ANSWER`, as the Redis store's does), and
    whose give-back (`ignored`) is held until `release_record` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.late = False
        self.in_gate = asyncio.Event()
        self.in_record = asyncio.Event()
        self.release_record = asyncio.Event()
        self.given_back: list[str] = []

    async def outbound_gate(self, *args: Any) -> Any:
        answer = await self.inner.outbound_gate(*args)  # the script ran
        if self.late:
            self.late = False
            self.in_gate.set()
            try:
                await asyncio.Event().wait()  # the reply is on its way
            except asyncio.CancelledError as cancel:
                setattr(cancel, LATE_ANSWER, answer)
                raise
        return answer

    async def record(self, *args: Any) -> Any:
        if args[3] == IGNORED:
            self.in_record.set()
            await self.release_record.wait()
        state = await self.inner.record(*args)
        if args[3] == IGNORED:
            self.given_back.append(args[0])
        return state


async def test_a_give_back_survives_a_second_raw_cancel() -> None:
    """Before: the probe slot a cancelled call's late gate answer took was given back by
    awaiting the store directly, which an anyio shield does not hold against a raw
    `task.cancel()`: a second one (a caller's `wait_for` and then its own timeout, a task
    group cancelled twice) dropped the give-back, and the half-open breaker refused
    every call for the probe lease (30 s)."""
    clock = FakeClock()
    store = LateGate()
    policy = Policy(
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=PROBING),)
    )
    engine = Engine(policy, clock=clock, store=store)  # type: ignore[arg-type]
    answers = iter([503, 200])
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))), engine=engine, telemetry=False
    )
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get("http://svc/x")).status_code == 503  # opens the breaker
        clock.advance(0.02)  # half-open: one probe slot
        store.late = True
        task = asyncio.create_task(client.get("http://svc/x"))
        await store.in_gate.wait()
        task.cancel()  # the gate's answer (the probe slot) comes on the cancellation
        await store.in_record.wait()
        task.cancel()  # again, while the slot is being given back
        with pytest.raises(asyncio.CancelledError):
            await task
        store.release_record.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert store.given_back == ["upstream:svc"]
        response = await client.get("http://svc/x")  # the slot is free: this is the probe
    assert response.status_code == 200
    assert ("breaker", "probe") in {(d.layer, d.verdict) for d in context(response).decisions}


def context(response: httpx.Response) -> DecisionContext:
    ctx = response.extensions["fidelity_context"]
    assert isinstance(ctx, DecisionContext)
    return ctx


class _Never:
    """A store call that never answers (its caller is cancelled)."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def __call__(self, *args: Any) -> Any:
        self.called.set()
        await asyncio.Event().wait()

    async def aclose(self, wait_s: float = 0.0) -> None:  # (as the store's coalescer)
        return None

    def __getattr__(self, name: str) -> Any:  # (as the store's coalescer: `call`)
        if name == "call":
            return self
        raise AttributeError(name)


@pytest.mark.parametrize("coalesce", [True, False])
async def test_a_cancelled_record_counts_what_it_dropped(
    coalesce: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a record whose caller was cancelled dropped its outcome and the deferred
    successes it took along, and `dropped_records` did not count them (a lost reply's
    are)."""
    store = RedisStore(
        config=StateConfig(url="redis://127.0.0.1:1/0"), rng=seeded_random(1), clock=FakeClock()
    )
    store.coalesce = coalesce
    never = _Never()
    monkeypatch.setattr(store, "call", never)
    monkeypatch.setattr(store, "coalescer", never)
    breaker = BreakerConfig()
    try:
        for _ in range(3):  # plain successes: deferred, they ride on the next call
            store.record_now("upstream:svc", breaker, Gate("allow", "closed", 1, 0.0), SUCCESS,
                             False, 0.0)  # fmt: skip
        failure = asyncio.create_task(
            store.record(
                "upstream:svc", breaker, Gate("allow", "closed", 1, 0.0), FAILURE, False, 0.0
            )
        )
        await never.called.wait()
        failure.cancel()
        with pytest.raises(asyncio.CancelledError):
            await failure
        assert store.stats.dropped_records == 1 + 3
    finally:
        await store.aclose()


async def test_a_cancelled_gate_without_its_reply_counts_the_successes_it_took(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for a gate cancelled before its reply was read (a reply read late says
    the script ran: nothing dropped)."""
    store = RedisStore(
        config=StateConfig(url="redis://127.0.0.1:1/0"), rng=seeded_random(1), clock=FakeClock()
    )
    never = _Never()
    monkeypatch.setattr(store, "call", never)
    breaker = BreakerConfig()
    try:
        for _ in range(2):
            store.record_now("upstream:svc", breaker, Gate("allow", "closed", 1, 0.0), SUCCESS,
                             False, 0.0)  # fmt: skip
        gate = asyncio.create_task(
            store.outbound_gate("upstream:svc", breaker, "budget:svc", RetryConfig(), False, 0.0)
        )
        await never.called.wait()
        gate.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gate
        assert store.stats.dropped_records == 2
    finally:
        await store.aclose()


# ------------------------------------- 3. a request sent again: no old give-up mark


def _resend_app(seen: list[int]) -> Starlette:
    """The handler sends one request twice: given up on (503 three times), then answered
    200; then it raises for a 503 of its own, built with that request."""
    answers = iter([503, 503, 503, 200])

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers))

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def handler(request: Request) -> Response:
        call = outbound.build_request("GET", "http://payments.internal/x")
        seen.append((await outbound.send(call)).status_code)
        seen.append((await outbound.send(call)).status_code)  # the shortcut's call
        httpx.Response(503, request=call).raise_for_status()  # the app's own 503
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    policy = Policy(
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=3, base_ms=1, max_ms=1)),)
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_a_request_sent_again_drops_its_old_give_up_mark() -> None:
    """Before: the give-up mark a request carried from its first send stayed through a
    second send that the shortcut answered 200, so the app's own 503 built with that
    request was answered as the outbound give-up (502, `x-fidelity-retry: exhausted`)."""
    seen: list[int] = []
    response = await _answer(_resend_app(seen))
    assert seen == [503, 200]
    assert response.status_code == 500  # the app's failure, not an upstream give-up
    assert "x-fidelity-retry" not in response.headers


@pytest.mark.parametrize("second", [200, 500])
def test_a_sync_request_sent_again_drops_its_old_give_up_mark(second: int) -> None:
    """The same for the sync transport's first attempt (`first_attempt`), and for a call
    that goes on in the loop (a 500 it does not retry)."""
    answers = iter([503, 503, 503, second])
    policy = Policy(
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=3, base_ms=1, max_ms=1)),)
    )
    engine = Engine(policy, clock=FakeClock(), store=MemoryStore())
    t = FidelitySyncTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))), engine=engine, telemetry=False
    )
    with httpx.Client(transport=t) as client:
        call = client.build_request("GET", "http://payments.internal/x")
        assert client.send(call).status_code == 503
        assert GIVE_UP_EXTENSION in call.extensions
        again = client.send(call)
    assert again.status_code == second
    assert GIVE_UP_EXTENSION not in call.extensions
    assert GIVE_UP_EXTENSION not in again.extensions


# ------------------------------------- 5. every instance to be avoided: not a paused one

TWO = ("http://10.0.0.1:8001", "http://10.0.0.2:8002")


def test_the_fallback_pick_prefers_an_unpaused_instance_then_the_pause_that_ends_first() -> None:
    """Before: with every instance to be avoided (tried, or paused by a 429), the pick fell
    back on all of them by cost alone, and the cheaper paused one won."""
    now = 100.0
    tried_busy = InstanceView(2, 0.01, 0.0, 0.0)  # tried, and costlier
    paused_idle = InstanceView(0, 0.01, 0.0, 0.0, paused_until=now + 5.0)
    for seed in range(20):
        pick = choose([tried_busy, paused_idle], [0, 1], now, seeded_random(seed))
        assert pick.chosen == 0
    # a pause that ends before the retry goes out is no pause for it
    pick = choose([tried_busy, paused_idle], [0, 1], now, seeded_random(0), paused_at=now + 6.0)
    assert pick.chosen == 1
    # all paused: the pause that ends first
    views = [
        InstanceView(0, 0.01, 0.0, 0.0, paused_until=now + 9.0),
        InstanceView(3, 0.01, 0.0, 0.0, paused_until=now + 2.0),
        InstanceView(0, 0.01, 0.0, 0.0, paused_until=now + 4.0),
    ]
    for seed in range(20):
        assert choose(views, [0, 1, 2], now, seeded_random(seed)).chosen == 1


async def test_a_hedge_does_not_go_to_an_instance_a_429_paused() -> None:
    """A service of two; a 429 with `Retry-After: 10` paused the second for retries and
    hedges. A call's first attempt goes to the first (and hangs): its hedge must avoid
    both, and went to the paused one (idle, so cheaper). Now it goes to the first again,
    whose pause is none."""
    clock = FakeClock()
    release = asyncio.Event()
    seen: list[str] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}")
        if len(seen) == 1:  # the first attempt: answers once the hedge has
            await release.wait()
        else:
            release.set()
        return httpx.Response(200)

    cfg = UpstreamConfig(
        host="payments",
        instances=TWO,
        retry=RetryConfig(attempts=2, base_ms=1, max_ms=1),
        hedge=HedgeConfig(after_ms=50),
    )
    engine = Engine(
        Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(3), store=MemoryStore()
    )
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    up = t.upstream(engine, httpx.URL("http://payments/"))
    first, second = up.instances or ()
    up.pause(second, clock.monotonic() + 10.0)  # (what a 429's planned retry does)
    # The first attempt goes to the first instance (cheaper while idle), and the hedge's
    # fallback finds the paused one cheaper (the first one is busy with that attempt).
    first.latency_s, second.latency_s = 0.01, 0.015
    first.latency_at = second.latency_at = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/b")
    assert response.status_code == 200
    assert seen == ["10.0.0.1:8001", "10.0.0.1:8001"]  # the hedge, to the first again
    assert any(d.verdict == "hedge" for d in context(response).decisions)


# ------------------------------------- 4. Retry-After scoped to the instance that sent it

STEADY = BreakerConfig(
    consecutive_failures=100, half_open_probes=1, open_jitter=0.0, probe_lease_s=30.0
)
BUSY, OTHER = "10.0.0.1:8001", "10.0.0.2:8002"


def _two(
    status: int, retry_after: str, breaker: BreakerConfig | None = None
) -> tuple[FidelityTransport, MemoryStore, FakeClock, list[str]]:
    """A service of two; the first (faster) instance answers `status` with `retry_after`
    the first time, the rest answer 200."""
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}")
        if len(seen) == 1:
            return httpx.Response(status, headers={"retry-after": retry_after})
        return httpx.Response(200)

    clock = FakeClock()
    store = MemoryStore(rng=seeded_random(3))
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(host="payments", instances=TWO, retry=retry, breaker=breaker)
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(7), store=store)
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    instances = t.upstream(engine, httpx.URL("http://payments/")).instances or ()
    for instance, latency in zip(instances, (0.001, 0.002), strict=True):
        instance.latency_s, instance.latency_at = latency, clock.monotonic()
    return t, store, clock, seen


def _retried(response: httpx.Response) -> Any:
    (retried,) = [d for d in context(response).decisions if d.verdict == "retry"]
    return retried


@pytest.mark.parametrize("status", [429, 503])
async def test_an_instances_retry_after_pauses_it_and_the_retry_goes_elsewhere_at_once(
    status: int,
) -> None:
    """Before: a `Retry-After` the call could wait (5 s) was waited before the retry went
    to the other instance, which had said nothing. Now (as Envoy does) it pauses only
    the instance that sent it, and the retry goes to the other after the plain backoff;
    the retry's record says so."""
    t, _, clock, seen = _two(status, "5")
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert seen == [BUSY, OTHER]
    retried = _retried(response)
    assert retried.details["delay_ms"] <= 2.0  # the backoff (max_ms), not the 5 s
    assert retried.details["retry_after_s"] == 5.0
    assert retried.details["retry_after_scope"] == "instance"
    assert clock.monotonic() - start < 1.0
    busy, _ = t.upstream(t.engine, httpx.URL("http://payments/")).instances or ()
    assert busy.paused_until == pytest.approx(start + 5.0)  # that instance only
    assert t.upstream(t.engine, httpx.URL("http://payments/")).paused_until == 0.0


async def test_a_single_hosts_retry_after_is_waited_and_the_record_says_so() -> None:
    seen: list[float] = []
    clock = FakeClock()

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(clock.monotonic())
        if len(seen) == 1:
            return httpx.Response(429, headers={"retry-after": "2"})
        return httpx.Response(200)

    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)
    engine = Engine(
        Policy(upstreams=(UpstreamConfig(host="*", retry=retry),)),
        clock=clock,
        store=MemoryStore(),
    )
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments.internal/pay")
    assert response.status_code == 200
    assert seen[1] - seen[0] >= 2.0
    retried = _retried(response)
    assert (retried.details["retry_after_s"], retried.details["retry_after_scope"]) == (
        2.0,
        "call",
    )


async def test_with_the_other_instance_known_open_the_retry_after_is_waited() -> None:
    """No other instance may take the retry (the other's breaker is known open): the
    call waits the Retry-After and goes back to the instance that sent it."""
    t, store, clock, seen = _two(503, "5", STEADY)
    store.breaker_state("upstream:" + OTHER, STEADY).force(
        OPEN, clock.monotonic(), seeded_random(0)
    )
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert seen == [BUSY, BUSY]
    retried = _retried(response)
    assert retried.details["delay_ms"] >= 5000.0
    assert retried.details["retry_after_scope"] == "call"
    assert clock.monotonic() - start >= 5.0


async def test_when_the_other_instance_refuses_the_retry_it_waits_for_the_paused_one() -> None:
    """The other instance looked free (its breaker half-open, not known open) but its
    gate refuses the retry (its one probe is out): the retry goes back to the instance
    that said `Retry-After: 5`, after those 5 s (the call could wait them), rather than
    give up as `retry_after_too_long` (that instance's pause would refuse it) or not
    wait at all."""
    t, store, clock, seen = _two(503, "5", STEADY)
    other = "upstream:" + OTHER
    store.breaker_state(other, STEADY).force(HALF_OPEN, clock.monotonic(), seeded_random(0))
    store.outbound_gate_now(other, STEADY, None, None, False, clock.monotonic())  # the probe
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert seen == [BUSY, BUSY]
    retried = _retried(response)
    assert retried.details["delay_ms"] >= 5000.0
    assert retried.details["retry_after_scope"] == "call"
    assert clock.monotonic() - start >= 5.0
    assert not context(response).upstream_exhausted
