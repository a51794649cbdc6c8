"""Review of the merged outbound changes (out19): a service instance's `Retry-After`, a
service-wide one (`retry_after_scope`), and the transport-error mapping of two calls at
once. Each test failed before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, PolicyError, current
from fidelity_mw.context import DecisionContext
from fidelity_mw.decide.breaker import HALF_OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    HedgeConfig,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

A, B = "10.0.0.1:8001", "10.0.0.2:8002"
TWO = (f"http://{A}", f"http://{B}")
RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)


class HeldClock(FakeClock):
    """Sleeps of a second or more wait until the test lets them go (then move time); the
    shorter ones (a backoff, a hedge delay) let the other tasks run first."""

    def __init__(self) -> None:
        super().__init__()
        self.held = asyncio.Event()
        self.waiting = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        if seconds >= 1.0:
            self.waiting.set()
            await self.held.wait()
        await super().sleep(seconds)


class Service:
    """Scripted instances: each answers its next scripted reply (the last one again when
    the script runs out), and every retry or hedge (`x-fidelity-attempt` > 1) that arrives
    at an instance while a `Retry-After` it sent is still on is noted in `inside`."""

    def __init__(self, clock: FakeClock, script: dict[str, list[Any]]) -> None:
        self.clock = clock
        self.script = script
        self.seen: list[str] = []
        self.until: dict[str, float] = {}
        self.inside: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        now = self.clock.monotonic()
        self.seen.append(key)
        attempt = request.headers.get("x-fidelity-attempt", "1")
        if attempt != "1" and self.until.get(key, 0.0) > now:
            self.inside.append((key, attempt))
        replies = self.script[key]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if callable(reply):
            reply = await reply()
        status, retry_after = reply if isinstance(reply, tuple) else (reply, None)
        if retry_after is None:
            return httpx.Response(status)
        self.until[key] = max(self.until.get(key, 0.0), now + float(retry_after))
        return httpx.Response(status, headers={"retry-after": retry_after})


def _transport(
    service: Service,
    clock: FakeClock,
    retry: RetryConfig = RETRY,
    instances: Sequence[str] = TWO,
    latencies: Sequence[float] = (0.001, 0.002),
    **cfg: Any,
) -> FidelityTransport:
    deadline = cfg.pop("deadline", DeadlineConfig())
    upstream = UpstreamConfig(host="payments", instances=tuple(instances), retry=retry, **cfg)
    policy = Policy(upstreams=(upstream,), deadline=deadline)
    engine = Engine(
        policy, clock=clock, rng=seeded_random(7), store=MemoryStore(rng=seeded_random(3))
    )
    t = FidelityTransport(httpx.MockTransport(service), engine=engine, telemetry=False)
    for instance, latency in zip(_instances(t), latencies, strict=True):
        instance.latency_s, instance.latency_at = latency, clock.monotonic()
    return t


def _instances(t: FidelityTransport) -> Sequence[Any]:
    return t.upstream(t.engine, httpx.URL("http://payments/")).instances or ()


def context(response: httpx.Response) -> DecisionContext:
    ctx = response.extensions["fidelity_context"]
    assert isinstance(ctx, DecisionContext)
    return ctx


def _retries(response: httpx.Response) -> list[Any]:
    return [d for d in context(response).decisions if d.verdict == "retry"]


# ------------------------------------- 1. an instance's Retry-After, whatever the call did


async def test_a_retry_after_the_call_waits_still_pauses_its_instance_for_other_calls() -> None:
    """Every instance is overloaded (503 + `Retry-After`). The first call's 503 from A
    paused A and its retry went to B; B's `Retry-After: 3` was then the call's to wait
    (no other instance left), and only that: B was not paused. A second call meanwhile,
    its first attempt refused by A, sent its retry straight to B, inside the 3 s B had
    asked for: each call hammered every instance once per backoff."""
    clock = HeldClock()
    service = Service(clock, {A: [(503, "5"), (503, "5"), 200], B: [(503, "3"), 200]})
    t = _transport(service, clock)
    async with httpx.AsyncClient(transport=t) as client:
        first = asyncio.create_task(client.get("http://payments/pay"))
        await clock.waiting.wait()  # the first call waits B's Retry-After
        second = asyncio.create_task(client.get("http://payments/pay"))
        for _ in range(50):
            await asyncio.sleep(0)
        assert service.seen == [A, B, A]  # the second call's first attempt, at A
        assert service.inside == []  # and its retry not at B while B's pause is on
        clock.held.set()
        responses = await asyncio.gather(first, second)
    assert [r.status_code for r in responses] == [200, 200]
    assert service.inside == []


@pytest.mark.parametrize("status", [429, 503])
async def test_a_retry_after_on_the_last_attempt_pauses_its_instance(status: int) -> None:
    """A call given up on (its attempts spent) on an instance's `Retry-After: 5` did not
    pause that instance: the next call's retry went there a second later."""
    clock = FakeClock()
    service = Service(clock, {A: [(status, "5"), 503, 200], B: [(status, "5"), 200]})
    retry = RetryConfig(attempts=2, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    t = _transport(service, clock, retry)
    async with httpx.AsyncClient(transport=t) as client:
        given_up = await client.get("http://payments/pay")
        assert given_up.status_code == status
        assert service.seen == [A, B]
        clock.advance(1.0)
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert service.inside == []  # no retry at B while its pause was on
    (retried,) = _retries(response)
    assert retried.details["delay_ms"] >= 3900.0  # every instance paused: waited


async def test_a_hedges_retry_after_pauses_the_instance_that_sent_it() -> None:
    """A hedge answered `429, Retry-After: 10` (the call's first attempt then answered
    200): the hedge's loop does not retry, so nothing paused that instance, and the next
    call's retry went to it at once."""
    clock = FakeClock()
    release = asyncio.Event()

    async def slow_ok() -> int:
        await release.wait()
        return 200

    async def limited() -> tuple[int, str]:
        release.set()
        return 429, "10"

    service = Service(clock, {A: [slow_ok, 503, 200], B: [limited, 200]})
    t = _transport(service, clock, hedge=HedgeConfig(after_ms=50))
    async with httpx.AsyncClient(transport=t) as client:
        raced = await client.get("http://payments/pay")
        assert raced.status_code == 200
        assert service.seen == [A, B]  # the first attempt, and the hedge
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert service.seen[2] == A
    assert service.inside == []  # the retry did not go to B inside its 10 s


# ------------------------------------- 2. the deadline shorter than the Retry-After

STEADY = BreakerConfig(
    consecutive_failures=100, half_open_probes=1, open_jitter=0.0, probe_lease_s=30.0
)


async def test_a_retry_after_past_the_deadline_gives_up_as_deadline() -> None:
    """A's `Retry-After: 5` with 3 s of deadline left: the retry went to B, whose gate
    refused it (half-open, its probe out). The call gave up as `retry_after_too_long`,
    which a plain host's same answer gives up as `deadline` (and marks exhausted)."""
    clock = FakeClock()
    service = Service(clock, {A: [(503, "5")], B: [200]})
    t = _transport(service, clock, breaker=STEADY, deadline=DeadlineConfig(default_ms=3000))
    store = t.engine.store
    assert isinstance(store, MemoryStore)
    other = "upstream:" + B
    store.breaker_state(other, STEADY).force(HALF_OPEN, clock.monotonic(), seeded_random(0))
    store.outbound_gate_now(other, STEADY, None, None, False, clock.monotonic())  # the probe
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 503
    assert service.seen == [A]
    give_ups = [(d.layer, d.reason) for d in context(response).decisions if d.verdict == "give_up"]
    assert give_ups == [("deadline", "deadline")]
    assert context(response).upstream_exhausted


# ------------------------------------- 3. a Retry-After that speaks for the whole service


@pytest.mark.parametrize("status", [429, 503])
async def test_a_service_scoped_retry_after_is_waited_and_429_pauses_the_service(
    status: int,
) -> None:
    """A 429 of a quota shared by every instance (a gateway's, a limiter on shared state):
    pausing the instance that answered and retrying at once on another one only meets
    the same quota. `retry_after_scope = "service"` takes a service's `Retry-After` as
    a plain host's: waited before the retry, and a 429's pauses every instance."""
    clock = FakeClock()
    service = Service(clock, {A: [(status, "2"), 200], B: [200]})
    t = _transport(service, clock, retry_after_scope="service")
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    (retried,) = _retries(response)
    assert retried.details["retry_after_scope"] == "call"
    assert retried.details["delay_ms"] >= 2000.0
    up = t.upstream(t.engine, httpx.URL("http://payments/"))
    assert up.paused_until == (pytest.approx(start + 2.0) if status == 429 else 0.0)
    assert [i.paused_until for i in _instances(t)] == [0.0, 0.0]  # (the service's pause)


async def test_a_service_scoped_retry_after_beyond_the_cap_gives_up() -> None:
    """... and one it cannot wait ends the call (as for a plain host), instead of going
    to another instance under the same quota."""
    clock = FakeClock()
    service = Service(clock, {A: [(429, "120")], B: [200]})
    deadline = DeadlineConfig(default_ms=300_000)  # (beyond the cap, not the deadline)
    t = _transport(service, clock, retry_after_scope="service", deadline=deadline)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 429
    assert service.seen == [A]
    give_ups = [(d.layer, d.reason) for d in context(response).decisions if d.verdict == "give_up"]
    assert give_ups == [("retry", "retry_after_too_long")]


async def test_a_service_pause_outlives_a_change_of_instances() -> None:
    """The service's pause is the service's: an instance named later is paused too."""
    clock = FakeClock()
    service = Service(clock, {A: [(429, "2"), 200], B: [200]})
    t = _transport(service, clock, retry_after_scope="service")
    start = clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        await client.get("http://payments/pay")
    up = t.upstream(t.engine, httpx.URL("http://payments/"))
    up.set_instances(t.engine, (*TWO, "http://10.0.0.3:8003"))
    assert up.paused_until == pytest.approx(start + 2.0)


def test_retry_after_scope_is_read_from_toml_and_checked(tmp_path: Any) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[[upstream]]\nhost = "payments"\ninstances = ["http://10.0.0.1:8001"]\n'
        'retry_after_scope = "service"\n'
    )
    assert Policy.from_toml(path).upstreams[0].retry_after_scope == "service"
    assert UpstreamConfig().retry_after_scope == "instance"
    with pytest.raises(PolicyError, match="retry_after_scope"):
        UpstreamConfig(retry_after_scope="global")  # type: ignore[arg-type]


# ------------------------------------- 4. two calls at once, their errors let out


def _gather_app(escapes: str, seen: list[Any]) -> Starlette:
    """One request makes two calls at once (`asyncio.gather`), each failing to connect:
    `spent`'s retry budget is empty (it gives up as `budget` at its first failure),
    `down` gives up after three attempts; `post` is a POST (not retried, no give-up).
    The app lets out the error of the call named `escapes`."""

    def upstream(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))
    calls: dict[str, Callable[[], Any]] = {
        "spent": lambda: outbound.get("http://spent/x"),
        "down": lambda: outbound.get("http://down/x"),
        "post": lambda: outbound.post("http://down/x", content=b"x"),
    }

    async def handler(request: Request) -> Response:
        seen.append(current())
        # the other call first: its give-up is recorded last (`down` backs off)
        names = [n for n in ("down", "spent") if n != escapes] + [escapes]
        if escapes == "post":
            names = ["post", "spent"]
        results = await asyncio.gather(*(calls[n]() for n in names), return_exceptions=True)
        raise results[names.index(escapes)]

    app = Starlette(routes=[Route("/", handler)])
    no_budget = RetryConfig(attempts=3, base_ms=1, max_ms=1, budget_ratio=0.0, budget_min_per_s=0.0)
    policy = Policy(
        upstreams=(
            UpstreamConfig(host="spent", retry=no_budget),
            UpstreamConfig(host="down", retry=RetryConfig(attempts=3, base_ms=1, max_ms=1)),
        ),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def _answer(app: Starlette) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/")


@pytest.mark.parametrize("escapes", ["spent", "down"])
async def test_each_calls_error_is_answered_with_its_own_give_up(escapes: str) -> None:
    """Before: the error was answered with the request's last outbound give-up, the
    other call's: `down`'s connect error as `spent`'s spent budget (503, naming `spent`),
    `spent`'s as `down`'s retries (or the other way round, by which gave up last)."""
    seen: list[Any] = []
    response = await _answer(_gather_app(escapes, seen))
    give_ups = {d.subject: d.reason for d in seen[0].decisions if d.verdict == "give_up"}
    assert give_ups == {"spent": "budget", "down": "attempts"}
    body = response.json()
    assert body["upstream"] == escapes
    if escapes == "spent":
        assert response.status_code == 503
        assert body["layer"] == "budget"
    else:
        assert response.status_code == 502
        assert "layer" not in body
    assert response.headers["x-fidelity-retry"] == "exhausted"


async def test_an_error_without_a_give_up_is_not_answered_with_another_calls() -> None:
    """A POST's connect error (sent once: no retry, no give-up of ours) next to a call
    whose budget was spent: it was answered as that call's spent budget (503)."""
    seen: list[Any] = []
    response = await _answer(_gather_app("post", seen))
    give_ups = {d.subject: d.reason for d in seen[0].decisions if d.verdict == "give_up"}
    assert give_ups == {"down": "not_idempotent", "spent": "budget"}
    assert response.status_code == 500  # the app's failure: no control layer decided it
