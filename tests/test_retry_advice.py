"""`Retry-After` on a 5xx that follows an outbound give-up, derived from what the
outbound layer knows (issue 13: retry amplification).

The pure derivation (outbound/advice.py), the give-up record that carries it, and
the middleware turning it into the header of the app's own 503. Fake clock and
seeded randomness throughout; the upstream is httpx.MockTransport.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router

from fidelity_mw import FidelityMiddleware, FidelityTransport, current
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.decide.specs import RandomSource
from fidelity_mw.engine import Engine
from fidelity_mw.inbound.refusals import ADVISE
from fidelity_mw.outbound.advice import (
    FROM_BREAKER,
    FROM_INSTANCES,
    FROM_PAUSE,
    FROM_UPSTREAM,
    RetryHint,
    retry_hint,
    retry_spread_s,
    spread_wait,
)
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

NOW = 100.0
INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")
KEYS = ("10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003")


# ---------------------------------------------------------------- the pure derivation


def test_a_service_waits_for_the_first_instance_breaker_to_admit_a_probe() -> None:
    hint = retry_hint(NOW, instances_open_until=[NOW + 3.0, NOW + 1.5, NOW + 7.0])
    assert hint == RetryHint(1.5, FROM_INSTANCES)


def test_one_instance_not_known_open_means_no_wait_from_the_breakers() -> None:
    assert retry_hint(NOW, instances_open_until=[NOW + 3.0, 0.0, NOW + 7.0]) is None
    assert retry_hint(NOW, instances_open_until=[NOW + 3.0, NOW - 0.1]) is None
    assert retry_hint(NOW, instances_open_until=[]) is None


def test_open_instances_still_in_rotation_cap_the_instances_wait() -> None:
    opens = [NOW + 3.0, NOW + 5.0]
    assert retry_hint(NOW, instances_open_until=opens, instances_wait_cap_s=0.5) == RetryHint(
        0.5, FROM_INSTANCES
    )
    assert retry_hint(NOW, instances_open_until=opens, instances_wait_cap_s=9.0) == RetryHint(
        3.0, FROM_INSTANCES
    )
    # the cap is the instances' own: a longer wait the upstream asked for still wins
    hint = retry_hint(
        NOW, instances_open_until=opens, instances_wait_cap_s=0.5, upstream_retry_after_s=4.0
    )
    assert hint == RetryHint(4.0, FROM_UPSTREAM)


def test_a_plain_upstream_uses_its_breaker_and_instances_take_its_place() -> None:
    assert retry_hint(NOW, breaker_wait_s=2.5) == RetryHint(2.5, FROM_BREAKER)
    assert retry_hint(NOW, breaker_wait_s=0.0) is None
    # a service's breakers are its instances': a host breaker wait is not used
    assert retry_hint(NOW, instances_open_until=[0.0], breaker_wait_s=2.5) is None


def test_the_upstreams_own_retry_after_and_a_429_pause_count() -> None:
    assert retry_hint(NOW, upstream_retry_after_s=4.0) == RetryHint(4.0, FROM_UPSTREAM)
    assert retry_hint(NOW, paused_until=NOW + 0.75) == RetryHint(0.75, FROM_PAUSE)
    assert retry_hint(NOW, paused_until=NOW - 1.0) is None


def test_the_longest_known_wait_wins() -> None:
    hint = retry_hint(
        NOW,
        instances_open_until=[NOW + 2.0, NOW + 3.0],
        upstream_retry_after_s=1.0,
        paused_until=NOW + 0.5,
    )
    assert hint == RetryHint(2.0, FROM_INSTANCES)
    hint = retry_hint(NOW, instances_open_until=[NOW + 2.0], upstream_retry_after_s=9.0)
    assert hint == RetryHint(9.0, FROM_UPSTREAM)


def test_nothing_known_is_no_hint() -> None:
    assert retry_hint(NOW) is None


class Draws:
    """A random source that answers the given values in turn (and records the calls)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values.pop(0)


def test_the_spread_window_is_a_share_of_the_hint_and_at_least_the_minimum() -> None:
    assert retry_spread_s(8.0, 0.5, 1.0) == 4.0
    assert retry_spread_s(1.5, 0.5, 1.0) == 1.0  # a short hint still spreads over 1 s
    assert retry_spread_s(8.0, 0.0, 0.0) == 0.0  # both off: no spread


def test_the_advised_wait_is_never_before_the_hint_and_within_the_window() -> None:
    draws = Draws(0.0, 0.5, 0.999999)
    waits = [spread_wait(3.75, 2.0, draws) for _ in range(3)]
    assert waits == [3.75, 4.75, pytest.approx(5.75, abs=1e-5)]
    assert all(3.75 <= w < 3.75 + 2.0 for w in waits)
    # whole seconds, rounded up: 4, 5, 6 - three different instants for one burst
    assert [math.ceil(w) for w in waits] == [4, 5, 6]


def test_no_spread_uses_no_draw() -> None:
    draws = Draws()
    assert spread_wait(3.75, 0.0, draws) == 3.75
    assert draws.calls == 0


# ---------------------------------------------------------------- the give-up record


class Fleet:
    """Every instance answers `status` (with `headers`); the clock moves `step` per call."""

    def __init__(self, clock: FakeClock, status: int = 503, step: float = 0.0) -> None:
        self.clock = clock
        self.status = status
        self.step = step
        self.headers: dict[str, str] = {}
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.clock.advance(self.step)
        return httpx.Response(self.status, headers=self.headers)


BREAKER = BreakerConfig(open_s=30.0, open_min_s=4.0, open_jitter=0.0, min_calls=100)


RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2)
NO_SPREAD = RetryConfig(attempts=3, base_ms=1, max_ms=2, advice_spread=0.0, advice_spread_min_s=0.0)


def service(
    clock: FakeClock,
    rng: RandomSource | None = None,
    retry: RetryConfig = RETRY,
    breaker: BreakerConfig = BREAKER,
) -> tuple[Engine, MemoryStore]:
    store = MemoryStore(rng=seeded_random(3))
    cfg = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, breaker=breaker)
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, rng=rng or seeded_random(7), store=store)
    return engine, store


def open_all(
    store: MemoryStore,
    clock: FakeClock,
    stagger: float = 0.0,
    breaker: BreakerConfig = BREAKER,
    later_s: float = 0.0,
) -> None:
    for i, key in enumerate(KEYS):
        state = store.breaker_state("upstream:" + key, breaker)
        state.force(OPEN, clock.monotonic() + later_s + i * stagger, seeded_random(0))


async def breaker_give_up(engine: Engine, fleet: Fleet) -> Decision:
    """One call to the service, every breaker open: the ejection bound's attempt
    fails and its retry is refused; the give-up that ends the call."""
    transport = FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 503
    assert fleet.calls == 1
    ctx: DecisionContext = response.extensions["fidelity_context"]
    give_up = ctx.decisions[-1]
    assert give_up.reason == "breaker_open"
    assert give_up.details is not None
    assert give_up.details["retry_hint_from"] == FROM_INSTANCES
    return give_up


async def test_a_give_up_with_every_instance_open_carries_the_first_probe_time() -> None:
    clock = FakeClock()
    engine, store = service(clock)
    open_all(store, clock, stagger=1.0)  # open until +4, +5, +6 s
    give_up = await breaker_give_up(engine, Fleet(clock, step=0.25))
    assert give_up.details is not None
    assert give_up.details["retry_hint_s"] == pytest.approx(4.0 - 0.25)
    assert give_up.details["retry_hint_spread_s"] == pytest.approx((4.0 - 0.25) * 0.5)


async def test_open_breakers_kept_in_rotation_advise_their_shortest_open_time() -> None:
    # Each breaker's open time has grown (failed probes) to about 8 s, but the
    # ejection bound keeps two of the three in rotation: the next request is sent
    # to one of them, so the service may answer again long before 8 s.
    clock = FakeClock()
    breaker = BreakerConfig(open_s=30.0, open_min_s=0.5, open_jitter=0.0, min_calls=100)
    engine, store = service(clock, retry=NO_SPREAD, breaker=breaker)
    open_all(store, clock, breaker=breaker, later_s=7.5)  # open until about +8 s
    give_up = await breaker_give_up(engine, Fleet(clock, step=0.25))
    assert give_up.details is not None
    assert give_up.details["retry_hint_s"] == pytest.approx(0.5)  # not the breakers' ~7.75 s


async def test_retries_spent_on_closed_breakers_carry_no_hint() -> None:
    clock = FakeClock()
    engine, _ = service(clock)
    fleet = Fleet(clock)
    transport = FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://payments/pay")
    assert fleet.calls == 3
    ctx: DecisionContext = response.extensions["fidelity_context"]
    give_up = ctx.decisions[-1]
    assert give_up.reason == "attempts"
    assert give_up.details is not None
    assert "retry_hint_s" not in give_up.details  # nothing known blocks a retry: no made-up wait


async def test_the_upstreams_retry_after_is_passed_on() -> None:
    clock = FakeClock()
    fleet = Fleet(clock)
    fleet.headers = {"retry-after": "7"}
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, retry_after_max_s=5.0)
    engine = Engine(
        Policy(upstreams=(UpstreamConfig(host="plain", retry=retry, breaker=None),)),
        clock=clock,
        rng=seeded_random(7),
    )
    transport = FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://plain/pay")
    ctx: DecisionContext = response.extensions["fidelity_context"]
    give_up = ctx.decisions[-1]
    assert give_up.reason == "retry_after_too_long"
    assert give_up.details is not None
    assert give_up.details["retry_hint_from"] == FROM_UPSTREAM
    assert give_up.details["retry_hint_s"] == 7.0


# ---------------------------------------------------------------- through the middleware


class Front:
    """A Starlette route that calls the service and answers 503 itself when it fails."""

    def __init__(
        self,
        clock: FakeClock,
        fleet_step: float = 0.25,
        app_retry_after: str = "",
        rng: RandomSource | None = None,
        retry: RetryConfig = RETRY,
    ):
        self.clock = clock
        self.engine, self.store = service(clock, rng, retry)
        self.fleet = Fleet(clock, step=fleet_step)
        self.contexts: list[DecisionContext] = []
        transport = FidelityTransport(
            httpx.MockTransport(self.fleet), engine=self.engine, telemetry=False
        )
        self.http = httpx.AsyncClient(transport=transport)

        async def work(request: Request) -> Response:
            upstream = await self.http.get("http://payments/pay")
            ctx = current()
            assert ctx is not None
            self.contexts.append(ctx)
            if upstream.status_code < 500:
                return JSONResponse({"ok": True})
            headers = {"Retry-After": app_retry_after} if app_retry_after else None
            return JSONResponse({"error": "upstream unavailable"}, 503, headers=headers)

        app = Router(routes=[Route("/work", work)])
        self.app = FidelityMiddleware(app, engine=self.engine, telemetry=False)

    async def get(self) -> httpx.Response:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
            return await client.get("/work")


async def test_the_apps_503_after_exhaustion_carries_the_derived_retry_after() -> None:
    clock = FakeClock()
    front = Front(clock, retry=NO_SPREAD)
    open_all(front.store, clock, stagger=1.0)  # the first probe in 4 s
    response = await front.get()
    assert response.status_code == 503
    assert response.headers["x-fidelity-retry"] == "exhausted"
    assert response.headers["retry-after"] == "4"  # ceil(4.0 - 0.25)
    ctx = front.contexts[-1]
    advice = [d for d in ctx.decisions if d.verdict == ADVISE]
    assert len(advice) == 1
    assert advice[0].layer == "breaker"
    assert advice[0].subject == "payments"
    assert advice[0].reason == "retry_after_" + FROM_INSTANCES
    assert advice[0].details == {"retry_after_s": 4, "wait_s": 3.75, "spread_s": 0.0}
    assert ctx.decided_by == "app"  # the answer stays the app's


async def test_the_advised_retry_after_is_spread_over_a_window_from_the_hint() -> None:
    advised: list[int] = []
    for draw in (0.0, 0.5, 0.999):
        clock = FakeClock()
        front = Front(clock, rng=lambda draw=draw: draw)
        open_all(front.store, clock, stagger=1.0)  # the first probe in 4 s
        response = await front.get()
        assert response.status_code == 503
        (advice,) = [d for d in front.contexts[-1].decisions if d.verdict == ADVISE]
        assert advice.details is not None
        wait, spread = advice.details["wait_s"], advice.details["spread_s"]
        assert isinstance(wait, float)
        assert isinstance(spread, float)
        assert spread == pytest.approx(wait * 0.5, abs=1e-3)  # the default share, no minimum
        value = int(response.headers["retry-after"])
        assert advice.details["retry_after_s"] == value
        assert math.ceil(wait) <= value <= math.ceil(wait + spread)  # never before the hint
        assert value == math.ceil(wait + draw * spread)
        advised.append(value)
    assert advised == sorted(advised)
    assert len(set(advised)) == 3  # one burst's callers come back at different seconds


async def test_the_time_spent_since_the_give_up_is_taken_off() -> None:
    clock = FakeClock()
    front = Front(clock, retry=NO_SPREAD)
    open_all(front.store, clock)  # every instance open until +4 s

    real_work = front.app.app

    async def slow_after_give_up(scope: Any, receive: Any, send: Any) -> None:
        async def late_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                clock.advance(2.5)  # the app took its time before answering
            await send(message)

        await real_work(scope, receive, late_send)

    front.app.app = slow_after_give_up
    response = await front.get()
    assert response.headers["retry-after"] == "2"  # ceil(4.0 - 0.25 - 2.5)


async def test_an_app_set_retry_after_wins() -> None:
    clock = FakeClock()
    front = Front(clock, app_retry_after="17")
    open_all(front.store, clock)
    response = await front.get()
    assert response.headers.get_list("retry-after") == ["17"]
    assert response.headers["x-fidelity-retry"] == "exhausted"
    assert not [d for d in front.contexts[-1].decisions if d.verdict == ADVISE]


async def test_no_retry_after_when_nothing_blocks_a_retry() -> None:
    clock = FakeClock()
    front = Front(clock)  # every breaker closed: the 503 follows three spent attempts
    response = await front.get()
    assert response.status_code == 503
    assert response.headers["x-fidelity-retry"] == "exhausted"
    assert "retry-after" not in response.headers
    assert front.fleet.calls == 3


async def test_a_healthy_answer_gets_no_advice() -> None:
    clock = FakeClock()
    front = Front(clock)
    front.fleet.status = 200
    open_all(front.store, clock)  # the ejection bound's attempt succeeds
    response = await front.get()
    assert response.status_code == 200
    assert "retry-after" not in response.headers
    assert "x-fidelity-retry" not in response.headers


async def test_headers_given_as_any_iterable_are_read_once_and_kept() -> None:
    clock = FakeClock()
    engine, store = service(clock, retry=NO_SPREAD)
    open_all(store, clock)
    fleet = Fleet(clock, step=0.25)
    http = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    )

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        upstream = await http.get("http://payments/pay")
        headers = ((name, value) for name, value in [(b"content-type", b"text/plain")])
        await send(
            {"type": "http.response.start", "status": upstream.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": b"upstream unavailable"})

    app = FidelityMiddleware(raw, engine=engine, telemetry=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        response = await client.get("/work")
    assert response.status_code == 503
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["retry-after"] == "4"
    assert response.headers["x-fidelity-retry"] == "exhausted"
