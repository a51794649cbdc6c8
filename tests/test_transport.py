"""FidelityTransport on httpx.MockTransport: fake clock, seeded randomness, no network.

What each test pins down is in its name; the server-backed tests are in
test_transport_servers.py and the three-service chain in test_chain.py.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    DeadlineConfig,
    DecisionContext,
    Engine,
    FidelityMiddleware,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.context import _CURRENT, Decision
from fidelity_mw.errors import DeadlineExceeded
from fidelity_mw.outbound.wire import (
    advertised_ms,
    bounded_timeouts,
    connected_peer_trusted,
    error_kind,
    literal_peer_trusted,
)
from fidelity_mw.state.base import StateStore
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

URL = "http://svc.internal/items"


def policy(
    *,
    attempts: int = 3,
    base_ms: int = 100,
    max_ms: int = 2000,
    breaker: BreakerConfig | None = None,
    attempt_timeout_ms: int = 10_000,
    deadline_ms: int = 30_000,
    trusted_peers: tuple[str, ...] | None = None,
    on_error: str = "local",
    **retry: Any,
) -> Policy:
    upstream = UpstreamConfig(
        host="*",
        retry=RetryConfig(attempts=attempts, base_ms=base_ms, max_ms=max_ms, **retry),
        breaker=breaker,
        attempt_timeout_ms=attempt_timeout_ms,
    )
    extra: dict[str, Any] = {}
    if trusted_peers is not None:
        extra["trusted_peers"] = trusted_peers
    return Policy(
        deadline=DeadlineConfig(default_ms=deadline_ms),
        state=StateConfig(on_error=on_error),  # type: ignore[arg-type]
        upstreams=(upstream,),
        **extra,
    )


class Upstream:
    """A scripted upstream for MockTransport: one reply per call (the last one repeats)."""

    def __init__(self, *replies: int | BaseException | Callable[[httpx.Request], Any]) -> None:
        self.replies = list(replies) or [200]
        self.requests: list[httpx.Request] = []
        self.closed = 0
        self.closed_before: list[int] = []  # bodies closed when each request arrived
        self.headers: list[dict[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        index = min(len(self.requests), len(self.replies) - 1)
        self.requests.append(request)
        self.closed_before.append(self.closed)
        self.headers.append(dict(request.headers))
        reply = self.replies[index]
        if callable(reply) and not isinstance(reply, type):
            reply = reply(request)
        if isinstance(reply, httpx.Response):
            return reply
        if isinstance(reply, BaseException):
            raise reply
        return httpx.Response(reply, stream=Tracked(self))

    @property
    def calls(self) -> int:
        return len(self.requests)

    def attempts_seen(self) -> list[str]:
        return [h.get("x-fidelity-attempt", "") for h in self.headers]


class Tracked(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A response body that counts being closed (failed attempts must be)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"body"

    def __iter__(self) -> Iterator[bytes]:
        yield b"body"

    async def aclose(self) -> None:
        self.upstream.closed += 1

    def close(self) -> None:
        self.upstream.closed += 1


def reply(status: int, headers: dict[str, str] | None = None) -> Callable[[httpx.Request], Any]:
    return lambda request: httpx.Response(status, headers=headers or {})


def transport(
    upstream: Upstream, clock: FakeClock, pol: Policy | None = None, **kw: Any
) -> FidelityTransport:
    mock = httpx.MockTransport(upstream)
    return FidelityTransport(
        mock, policy=pol or policy(), clock=clock, rng=seeded_random(42), telemetry=False, **kw
    )


def decisions(response_or_ctx: httpx.Response | DecisionContext) -> list[Decision]:
    if isinstance(response_or_ctx, httpx.Response):
        ctx = response_or_ctx.extensions["fidelity_context"]
    else:
        ctx = response_or_ctx
    return list(ctx.decisions)


def give_ups(ctx: DecisionContext) -> list[tuple[str, str, str]]:
    return [(d.layer, d.verdict, d.reason) for d in ctx.decisions if d.verdict != "allow"]


class Bound:
    """Run code inside a request's DecisionContext, as FidelityMiddleware would."""

    def __init__(self, engine: Engine, *, deadline_in: float | None = None) -> None:
        now = engine.clock.monotonic()
        self.ctx = DecisionContext(engine, "/route", "GET", now)
        if deadline_in is not None:
            self.ctx.deadline_at = now + deadline_in

    def __enter__(self) -> DecisionContext:
        self.token = _CURRENT.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self.token)


# ---------------------------------------------------------------- success path


async def test_success_is_one_attempt_with_headers_timeouts_and_a_decision(
    clock: FakeClock,
) -> None:
    up = Upstream(200)
    async with httpx.AsyncClient(transport=transport(up, clock), timeout=5.0) as client:
        response = await client.get(URL)
    assert response.status_code == 200
    assert up.calls == 1
    assert up.headers[0]["x-fidelity-attempt"] == "1"
    # the attempt's wait less a tenth (at most 250 ms): the next hop answers in time; the
    # wait is the client's 5 s read timeout, shorter than the 10 s attempt timeout
    assert up.headers[0]["x-request-timeout-ms"] == "4750"
    assert up.requests[0].extensions["timeout"] == {
        "connect": 5.0,
        "read": 5.0,
        "write": 5.0,
        "pool": 5.0,
    }
    (decision,) = decisions(response)
    assert (decision.layer, decision.subject, decision.verdict) == (
        "retry",
        "svc.internal",
        "allow",
    )
    assert decision.details == {"attempt": 1}
    assert clock.sleeps == []
    ctx = response.extensions["fidelity_context"]
    assert ctx.attempts == {"svc.internal": 1}
    assert not ctx.upstream_exhausted


async def test_per_attempt_headers_leave_the_request_as_the_caller_built_it(
    clock: FakeClock,
) -> None:
    up = Upstream(503, 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        plain = await client.get(URL)
        mine = await client.get(URL, headers={"X-Request-Timeout-Ms": "50", "x-other": "1"})
    assert "x-fidelity-attempt" not in plain.request.headers
    assert "x-request-timeout-ms" not in plain.request.headers
    assert mine.request.headers["x-request-timeout-ms"] == "50"  # the caller's, given back
    assert mine.request.headers["x-other"] == "1"
    assert up.headers[-1]["x-request-timeout-ms"] == "4750"  # what went on the wire
    assert [h["x-fidelity-attempt"] for h in up.headers] == ["1", "2", "1"]


async def test_attempt_timeout_caps_the_httpx_timeouts(clock: FakeClock) -> None:
    up = Upstream(200)
    pol = policy(attempt_timeout_ms=250)
    async with httpx.AsyncClient(transport=transport(up, clock, pol), timeout=5.0) as client:
        await client.get(URL)
    assert up.requests[0].extensions["timeout"] == {
        "connect": 0.25,
        "read": 0.25,
        "write": 0.25,
        "pool": 0.25,
    }
    assert up.headers[0]["x-request-timeout-ms"] == "225"


def test_bounded_timeouts_keeps_what_is_already_shorter() -> None:
    original = {"connect": 1.0, "read": None, "write": 9.0, "pool": 0.5}
    assert bounded_timeouts(original, 2.0) == {
        "connect": 1.0,
        "read": 2.0,
        "write": 2.0,
        "pool": 0.5,
    }
    fine = {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}
    assert bounded_timeouts(fine, 2.0) is fine
    assert bounded_timeouts(None, 3.0) == dict.fromkeys(("connect", "read", "write", "pool"), 3.0)


# ---------------------------------------------------------------- retries


async def test_retries_503_with_full_jitter_and_succeeds(clock: FakeClock) -> None:
    up = Upstream(503, 503, 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.get(URL)
    assert response.status_code == 200
    assert up.attempts_seen() == ["1", "2", "3"]
    assert len(clock.sleeps) == 2
    assert 0.0 <= clock.sleeps[0] <= 0.1  # min(2 s, 100 ms x 2^0)
    assert 0.0 <= clock.sleeps[1] <= 0.2  # min(2 s, 100 ms x 2^1)
    assert up.closed_before == [0, 1, 2]  # each failed attempt was closed before the next
    retries = [d for d in decisions(response) if d.verdict == "retry"]
    assert [d.reason for d in retries] == ["status_503", "status_503"]
    assert [d.details and d.details["attempt"] for d in retries] == [2, 3]
    assert not response.extensions["fidelity_context"].upstream_exhausted


async def test_attempts_exhausted_returns_the_last_response_and_marks_the_context(
    clock: FakeClock,
) -> None:
    up = Upstream(503)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.get(URL)
    assert response.status_code == 503
    assert response.content == b"body"  # the returned response is still readable
    assert up.calls == 3
    assert up.closed == 3  # two closed by the retry layer, the last one by the client
    ctx = response.extensions["fidelity_context"]
    assert give_ups(ctx)[-1] == ("retry", "give_up", "attempts")
    assert ctx.upstream_exhausted


async def test_one_attempt_configured_is_not_exhaustion(clock: FakeClock) -> None:
    up = Upstream(503)
    async with httpx.AsyncClient(transport=transport(up, clock, policy(attempts=1))) as client:
        response = await client.get(URL)
    ctx = response.extensions["fidelity_context"]
    assert up.calls == 1
    assert give_ups(ctx) == [("retry", "give_up", "attempts")]
    assert not ctx.upstream_exhausted  # we never retried: our caller may


async def test_statuses_not_configured_are_not_retried(clock: FakeClock) -> None:
    up = Upstream(500, 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        assert (await client.get(URL)).status_code == 500
    assert up.calls == 1
    up2 = Upstream(500, 200)
    async with httpx.AsyncClient(
        transport=transport(up2, clock, policy(on_status=(500,)))
    ) as client:
        assert (await client.get(URL)).status_code == 200
    assert up2.calls == 2


async def test_connect_errors_are_retried_then_raised(clock: FakeClock) -> None:
    up = Upstream(httpx.ConnectError("refused"))
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(URL)
    assert up.calls == 3
    up2 = Upstream(httpx.ConnectError("refused"))
    t = transport(up2, clock)
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine) as ctx, pytest.raises(httpx.ConnectError):
            await client.get(URL)
    assert [d.reason for d in ctx.decisions] == [
        "attempt",
        "connect_error",
        "connect_error",
        "attempts",
    ]
    assert ctx.upstream_exhausted


async def test_read_timeouts_are_retried_for_idempotent_requests(clock: FakeClock) -> None:
    up = Upstream(httpx.ReadTimeout("slow"), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.put(URL, content=b"x")
    assert response.status_code == 200
    assert [d.reason for d in decisions(response) if d.verdict == "retry"] == ["timeout_error"]


async def test_local_errors_are_not_retried(clock: FakeClock) -> None:
    up = Upstream(httpx.PoolTimeout("pool full"), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        with pytest.raises(httpx.PoolTimeout):
            await client.get(URL)
    assert up.calls == 1
    assert error_kind(httpx.UnsupportedProtocol("x")) == "local"
    assert error_kind(CircuitOpen("x", host="h", retry_after_s=1)) == "local"
    assert error_kind(DeadlineExceeded("x", host="h")) == "local"
    assert error_kind(httpx.RemoteProtocolError("x")) == "network"
    assert error_kind(ValueError("x")) == "other"


# ---------------------------------------------------------------- what may be retried


async def test_post_is_never_retried(clock: FakeClock) -> None:
    up = Upstream(503, 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.post(URL, json={"pay": 10})
    assert response.status_code == 503
    assert up.calls == 1
    ctx = response.extensions["fidelity_context"]
    assert give_ups(ctx) == [("retry", "give_up", "not_idempotent")]
    assert not ctx.upstream_exhausted  # we did not retry: our caller is the nearest owner


async def test_post_with_an_idempotency_key_is_retried(clock: FakeClock) -> None:
    up = Upstream(503, 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.post(URL, json={"pay": 10}, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 200
    assert up.calls == 2
    assert up.requests[0].content == up.requests[1].content == b'{"pay":10}'


async def test_post_with_connect_error_is_not_retried_either(clock: FakeClock) -> None:
    up = Upstream(httpx.ConnectError("refused"), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(URL, content=b"x")
    assert up.calls == 1


async def test_streaming_body_is_never_retried(clock: FakeClock) -> None:
    up = Upstream(503, 200)

    async def body() -> AsyncIterator[bytes]:
        yield b"chunk"

    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.put(URL, content=body())
    assert response.status_code == 503
    assert up.calls == 1
    assert give_ups(response.extensions["fidelity_context"]) == [
        ("retry", "give_up", "body_not_replayable")
    ]


# ---------------------------------------------------------------- Retry-After and 429


async def test_503_retry_after_seconds_is_honoured(clock: FakeClock) -> None:
    up = Upstream(reply(503, {"Retry-After": "3"}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.get(URL)
    assert response.status_code == 200
    assert clock.sleeps == [3.0]


async def test_503_retry_after_http_date_is_honoured(clock: FakeClock) -> None:
    when = format_datetime(datetime.fromtimestamp(clock.wall() + 4, UTC), usegmt=True)
    up = Upstream(reply(503, {"Retry-After": when}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        await client.get(URL)
    assert clock.sleeps == [pytest.approx(4.0)]


async def test_junk_retry_after_falls_back_to_backoff(clock: FakeClock) -> None:
    up = Upstream(reply(503, {"Retry-After": "whenever"}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        await client.get(URL)
    assert len(clock.sleeps) == 1
    assert 0.0 <= clock.sleeps[0] <= 0.1


async def test_retry_after_beyond_the_cap_gives_up(clock: FakeClock) -> None:
    up = Upstream(reply(503, {"Retry-After": "120"}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock, policy(deadline_ms=600_000))) as c:
        response = await c.get(URL)
    assert response.status_code == 503
    assert clock.sleeps == []
    assert give_ups(response.extensions["fidelity_context"]) == [
        ("retry", "give_up", "retry_after_too_long")
    ]


async def test_429_is_retried_when_its_retry_after_fits_the_deadline(clock: FakeClock) -> None:
    up = Upstream(reply(429, {"Retry-After": "2"}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        assert (await client.get(URL)).status_code == 200
    assert clock.sleeps == [2.0]


async def test_429_past_the_deadline_is_not_retried(clock: FakeClock) -> None:
    up = Upstream(reply(429, {"Retry-After": "20"}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock, policy(deadline_ms=5_000))) as c:
        response = await c.get(URL)
    assert response.status_code == 429
    assert clock.sleeps == []
    assert give_ups(response.extensions["fidelity_context"]) == [
        ("deadline", "give_up", "deadline")
    ]


async def test_429_without_retry_after_is_not_retried(clock: FakeClock) -> None:
    up = Upstream(429, 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        assert (await client.get(URL)).status_code == 429
    assert up.calls == 1


async def test_429_is_not_a_breaker_failure(clock: FakeClock) -> None:
    breaker = BreakerConfig(min_calls=2, failure_ratio=0.5, consecutive_failures=2)
    up = Upstream(429)
    pol = policy(breaker=breaker)
    async with httpx.AsyncClient(transport=transport(up, clock, pol)) as client:
        for _ in range(10):
            assert (await client.get(URL)).status_code == 429
    assert up.calls == 10  # never shed: the breaker stayed closed


class StillClock(FakeClock):
    """Sleeps are recorded but take no time: a pause set by one call is still on for the next."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def limited_then_flaky(retry_after: str) -> Any:
    hits: list[str] = []

    def route(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.path)
        if request.url.path == "/limited":
            if hits.count("/limited") == 1:
                return httpx.Response(429, headers={"Retry-After": retry_after})
            return httpx.Response(200)
        return httpx.Response(503 if hits.count("/flaky") == 1 else 200)

    return route


async def test_429_retry_after_pauses_retries_to_that_host() -> None:
    clock = StillClock()
    t = FidelityTransport(
        httpx.MockTransport(limited_then_flaky("5")),
        policy=policy(),
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get("http://svc.internal/limited")).status_code == 200
        assert clock.sleeps == [pytest.approx(5.0)]
        response = await client.get("http://svc.internal/flaky")
    assert response.status_code == 200
    # the 503's retry waited out the host's pause, not just its own backoff
    assert clock.sleeps == [pytest.approx(5.0), pytest.approx(5.0)]


@pytest.mark.parametrize("retry_after", ["99999999999", "31"])
async def test_a_refused_retry_after_pauses_nothing(retry_after: str) -> None:
    """Regression (issue 12, #12): a 429's Retry-After beyond `retry_after_max_s` is not
    retried, and must not pause the host: it paused retries for the life of the process."""
    clock = StillClock()
    t = FidelityTransport(
        httpx.MockTransport(limited_then_flaky(retry_after)),
        policy=policy(),
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get("http://svc.internal/limited")).status_code == 429
        assert clock.sleeps == []
        response = await client.get("http://svc.internal/flaky")
    assert response.status_code == 200
    assert len(clock.sleeps) == 1
    assert clock.sleeps[0] < 1.0


async def test_a_429_not_retried_for_the_deadline_pauses_nothing(clock: FakeClock) -> None:
    t = FidelityTransport(
        httpx.MockTransport(limited_then_flaky("5")),
        policy=policy(),
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine, deadline_in=4.0):  # 5 s does not fit: not retried
            assert (await client.get("http://svc.internal/limited")).status_code == 429
        response = await client.get("http://svc.internal/flaky")
    assert response.status_code == 200
    assert len(clock.sleeps) == 1
    assert clock.sleeps[0] < 1.0


# ---------------------------------------------------------------- deadline


async def test_deadline_caps_attempt_timeout_and_is_sent_downstream(clock: FakeClock) -> None:
    up = Upstream(200)
    t = transport(up, clock)
    async with httpx.AsyncClient(transport=t, timeout=5.0) as client:
        with Bound(t.engine, deadline_in=1.5) as ctx:
            await client.get(URL)
    # the deadline's 1500 less a tenth (our timeout fires before the deadline cancels us)
    assert up.requests[0].extensions["timeout"] == dict.fromkeys(
        ("connect", "read", "write", "pool"), pytest.approx(1.35)
    )
    assert up.headers[0]["x-request-timeout-ms"] == "1215"  # the attempt's 1350, less a tenth
    assert ctx.attempts == {"svc.internal": 1}


async def test_no_attempt_starts_past_the_deadline(clock: FakeClock) -> None:
    up = Upstream(200)
    t = transport(up, clock)
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine, deadline_in=0.0) as ctx, pytest.raises(DeadlineExceeded) as info:
            await client.get(URL)
    assert up.calls == 0
    assert isinstance(info.value, httpx.TimeoutException)
    assert give_ups(ctx) == [("deadline", "reject", "deadline")]
    assert ctx.upstream_exhausted


async def test_no_backoff_sleep_runs_past_the_deadline(clock: FakeClock) -> None:
    up = Upstream(503)
    t = transport(up, clock, policy(attempts=10, base_ms=200, max_ms=2000))
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine, deadline_in=1.0) as ctx:
            response = await client.get(URL)
    assert response.status_code == 503
    assert sum(clock.sleeps) < 1.0
    assert give_ups(ctx)[-1] == ("deadline", "give_up", "deadline")
    assert ctx.upstream_exhausted
    assert up.calls == len(clock.sleeps) + 1 < 10


async def test_outside_a_request_the_policy_default_deadline_applies(clock: FakeClock) -> None:
    up = Upstream(200)
    pol = policy(deadline_ms=400, attempt_timeout_ms=10_000)
    async with httpx.AsyncClient(transport=transport(up, clock, pol)) as client:
        await client.get(URL)
    assert up.headers[0]["x-request-timeout-ms"] == "324"  # (400 less a tenth, less a tenth)


# ---------------------------------------------------------------- breaker


def flaky_breaker() -> BreakerConfig:
    return BreakerConfig(
        min_calls=100, consecutive_failures=2, open_s=5.0, open_min_s=5.0, open_jitter=0.0
    )


async def test_breaker_opening_mid_retry_stops_at_once_then_fails_fast(clock: FakeClock) -> None:
    up = Upstream(503)
    t = transport(up, clock, policy(attempts=5, breaker=flaky_breaker()))
    async with httpx.AsyncClient(transport=t) as client:
        first = await client.get(URL)
        assert first.status_code == 503
        assert up.calls == 2  # the second failure opened the breaker
        assert len(clock.sleeps) == 1  # and no backoff followed it
        ctx = first.extensions["fidelity_context"]
        assert give_ups(ctx)[-1] == ("breaker", "give_up", "breaker_open")
        assert ctx.upstream_exhausted

        with pytest.raises(CircuitOpen) as info:
            await client.get(URL)
        assert up.calls == 2  # failed fast, no attempt
        assert isinstance(info.value, httpx.TransportError)
        assert info.value.host == "svc.internal"
        assert info.value.retry_after_s == pytest.approx(5.0 - clock.sleeps[0], abs=0.2)


async def test_half_open_probe_closes_the_breaker(clock: FakeClock) -> None:
    up = Upstream(503, 503, 200)
    t = transport(up, clock, policy(attempts=1, breaker=flaky_breaker()))
    async with httpx.AsyncClient(transport=t) as client:
        await client.get(URL)
        await client.get(URL)
        with pytest.raises(CircuitOpen):
            await client.get(URL)
        clock.advance(5.0)
        probe = await client.get(URL)
        assert probe.status_code == 200
        layers = [(d.layer, d.verdict) for d in decisions(probe)]
        assert layers == [("breaker", "probe"), ("retry", "allow")]
        assert (await client.get(URL)).status_code == 200  # closed again
    assert up.calls == 4


async def test_breaker_rejection_between_retries_raises_circuit_open(clock: FakeClock) -> None:
    """Another caller opens the breaker during our attempt: we stop before the next one,
    without waiting out a backoff (the retry's gate is asked before its backoff)."""
    store = MemoryStore(rng=seeded_random(3))
    breaker = flaky_breaker()
    calls = 0

    def trip_then_fail(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        state = store.breaker_state("upstream:svc.internal", breaker)
        state.force("open", clock.monotonic(), seeded_random(0))
        return httpx.Response(503)

    engine = Engine(policy(attempts=3, breaker=breaker), clock=clock, store=store)
    t = FidelityTransport(httpx.MockTransport(trip_then_fail), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(engine) as ctx:
            assert (await client.get(URL)).status_code == 503
    assert calls == 1
    assert clock.sleeps == []
    assert give_ups(ctx)[-1] == ("breaker", "give_up", "breaker_open")
    assert give_ups(ctx)[-1] == ("breaker", "give_up", "breaker_open")


# ---------------------------------------------------------------- budget


async def test_retry_budget_exhausted_gives_up(clock: FakeClock) -> None:
    pol = policy(budget_ratio=0.5, budget_min_per_s=0.0)
    up = Upstream(503)
    t = transport(up, clock, pol)
    async with httpx.AsyncClient(transport=t) as client:
        first = await client.get(URL)  # 1 request: 0.5 retries allowed -> none
        ctx = first.extensions["fidelity_context"]
        budget = [d for d in ctx.decisions if d.layer == "budget"]
        assert [(d.verdict, d.reason, d.state_source) for d in budget] == [
            ("give_up", "budget", "memory")
        ]
        assert ctx.upstream_exhausted
        second = await client.get(URL)  # 2 requests: 1 retry allowed
    assert up.calls == 1 + 2
    assert give_ups(second.extensions["fidelity_context"])[-1][2] == "budget"


async def test_budget_is_shared_by_calls_to_the_same_host(clock: FakeClock) -> None:
    pol = policy(budget_ratio=0.0, budget_min_per_s=0.2, budget_window_s=10.0)  # 2 retries
    up = Upstream(503)
    t = transport(up, clock, pol)
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(3):
            await client.get(URL)
        await client.get("http://other.internal/")  # another host has its own budget
    assert up.calls == 3 + 2 + 3


# ---------------------------------------------------------------- ownership


async def test_exhausted_signal_from_a_trusted_peer_is_not_retried(clock: FakeClock) -> None:
    up = Upstream(reply(503, {"x-fidelity-retry": "exhausted"}), 200)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.get("http://10.1.2.3:8080/x")
    assert response.status_code == 503
    assert up.calls == 1
    ctx = response.extensions["fidelity_context"]
    assert give_ups(ctx) == [("retry", "give_up", "downstream_exhausted")]
    assert ctx.upstream_exhausted  # and we pass it on to our own callers


async def test_exhausted_signal_travels_up_even_for_a_post(clock: FakeClock) -> None:
    up = Upstream(reply(502, {"x-fidelity-retry": "exhausted"}))
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        response = await client.post("http://127.0.0.1:9/x", content=b"x")
    assert response.extensions["fidelity_context"].upstream_exhausted


async def test_exhausted_signal_from_outside_trusted_peers_is_ignored(clock: FakeClock) -> None:
    for url in ("http://8.8.8.8/x", "http://svc.internal/x"):  # public IP; DNS name on a mock
        up = Upstream(reply(503, {"x-fidelity-retry": "exhausted"}), 200)
        async with httpx.AsyncClient(transport=transport(up, clock)) as client:
            assert (await client.get(url)).status_code == 200
        assert up.calls == 2
    up = Upstream(reply(503, {"x-fidelity-retry": "exhausted"}), 200)
    no_peers = policy(trusted_peers=())
    async with httpx.AsyncClient(transport=transport(up, clock, no_peers)) as client:
        assert (await client.get("http://localhost:8000/x")).status_code == 200


def test_peer_trust_rules() -> None:
    nets = Engine(Policy()).trusted_peers
    assert literal_peer_trusted("127.0.0.1", nets) is True
    assert literal_peer_trusted("localhost", nets) is True
    assert literal_peer_trusted("::1", nets) is True
    assert literal_peer_trusted("[::1]", nets) is True
    assert literal_peer_trusted("192.168.4.4", nets) is True
    assert literal_peer_trusted("8.8.8.8", nets) is False
    assert literal_peer_trusted("payments.internal", nets) is None  # judged per connection
    assert connected_peer_trusted(httpx.Response(503), nets) is False  # no socket to ask


# ---------------------------------------------------------------- cancellation


async def test_cancellation_is_not_retried_and_frees_the_probe(clock: FakeClock) -> None:
    up = Upstream(asyncio.CancelledError(), 200)
    breaker = BreakerConfig(min_calls=100, consecutive_failures=1, open_s=1.0, open_jitter=0.0,
                            half_open_probes=1)  # fmt: skip
    store = MemoryStore(rng=seeded_random(3))
    engine = Engine(policy(breaker=breaker), clock=clock, store=store)
    state = store.breaker_state("upstream:svc.internal", breaker)
    state.force("half_open", clock.monotonic(), seeded_random(0))
    t = FidelityTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        with pytest.raises(asyncio.CancelledError):
            await client.get(URL)
        assert up.calls == 1
        assert state.probes == {}  # the probe slot was given back
        assert (await client.get(URL)).status_code == 200  # the next call may probe


async def test_a_cancelled_request_leaves_its_backoff_sleep_at_once() -> None:
    class StuckClock(FakeClock):
        """Backoff sleeps that would never end on their own."""

        def __init__(self) -> None:
            super().__init__()
            self.entered = asyncio.Event()
            self.left_by: list[str] = []

        async def sleep(self, seconds: float) -> None:
            self.sleeps.append(seconds)
            self.entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.left_by.append("cancel")
                raise

    clock = StuckClock()
    up = Upstream(503)
    async with httpx.AsyncClient(transport=transport(up, clock)) as client:
        task = asyncio.ensure_future(client.get(URL))
        await clock.entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert clock.left_by == ["cancel"]
    assert up.calls == 1  # and nothing was retried after it
    assert up.closed == 1  # the failed attempt's body was closed before sleeping


# ---------------------------------------------------------------- context and observers


async def test_inside_a_request_the_context_engine_and_decisions_are_used(
    clock: FakeClock,
) -> None:
    request_clock = FakeClock(start=5_000.0)
    request_engine = Engine(policy(), clock=request_clock, rng=seeded_random(9))
    up = Upstream(503, 200)
    t = transport(up, clock)  # its own engine and clock are not used inside a request
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(request_engine, deadline_in=10.0) as ctx:
            response = await client.get(URL)
    assert "fidelity_context" not in response.extensions
    assert clock.sleeps == []
    assert len(request_clock.sleeps) == 1
    assert [d.verdict for d in ctx.decisions] == ["allow", "retry"]
    assert all(d.at >= 5_000.0 for d in ctx.decisions)
    assert ctx.attempts == {"svc.internal": 2}


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def attempt_start(self, ctx: DecisionContext, request: httpx.Request, attempt: int) -> Any:
        self.events.append(("start", attempt, request.headers["x-fidelity-attempt"]))
        return attempt

    def attempt_end(
        self, token: Any, response: httpx.Response | None, error: BaseException | None
    ) -> None:
        self.events.append(
            ("end", token, response.status_code if response else type(error).__name__)
        )


async def test_observer_sees_every_attempt(clock: FakeClock) -> None:
    recorder = Recorder()
    up = Upstream(httpx.ConnectError("no"), 503, 200)
    async with httpx.AsyncClient(transport=transport(up, clock, observer=recorder)) as client:
        await client.get(URL)
    assert recorder.events == [
        ("start", 1, "1"),
        ("end", 1, "ConnectError"),
        ("start", 2, "2"),
        ("end", 2, 503),
        ("start", 3, "3"),
        ("end", 3, 200),
    ]


async def test_telemetry_observer_is_looked_up_lazily_once_per_engine(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fidelity_mw.telemetry as telemetry

    recorder = Recorder()
    lookups: list[Engine] = []

    def default_attempt_observer(engine: Engine) -> Recorder:
        lookups.append(engine)
        return recorder

    monkeypatch.setattr(telemetry, "default_attempt_observer", default_attempt_observer)
    up = Upstream(200)
    t = FidelityTransport(httpx.MockTransport(up), policy=policy(), clock=clock)
    async with httpx.AsyncClient(transport=t) as client:
        await client.get(URL)
        await client.get(URL)
    assert lookups == [t.engine]
    assert t.engine.attempt_observer is recorder
    assert [e[0] for e in recorder.events] == ["start", "end", "start", "end"]


async def test_a_failing_observer_never_fails_the_call(clock: FakeClock) -> None:
    class Broken:
        def attempt_start(self, *args: Any) -> Any:
            raise RuntimeError("telemetry down")

        def attempt_end(self, *args: Any) -> None:
            raise RuntimeError("telemetry down")

    up = Upstream(200)
    async with httpx.AsyncClient(transport=transport(up, clock, observer=Broken())) as client:
        assert (await client.get(URL)).status_code == 200


# ---------------------------------------------------------------- state store failures


class FailingStore(MemoryStore):
    """A remote store that is down (no in-process twin: the transport awaits its methods)."""

    outbound_gate_now = None  # type: ignore[assignment]

    async def breaker_gate(self, *args: Any) -> Any:
        raise ConnectionError("redis down")

    async def budget_try_retry(self, *args: Any) -> Any:
        raise ConnectionError("redis down")

    async def budget_request(self, *args: Any) -> None:
        raise ConnectionError("redis down")

    async def outbound_gate(self, *args: Any) -> Any:
        raise ConnectionError("redis down")


async def test_store_failure_decides_on_fallback_or_fails_closed(clock: FakeClock) -> None:
    up = Upstream(503, 200)
    engine = Engine(policy(breaker=BreakerConfig()), clock=clock, store=FailingStore())
    t = FidelityTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get(URL)
    assert response.status_code == 200  # decided without state: allowed
    sources = {d.state_source for d in response.extensions["fidelity_context"].decisions}
    assert sources == {"fallback"}

    closed = policy(breaker=BreakerConfig(), on_error="closed")
    engine = Engine(closed, clock=clock, store=FailingStore())
    t = FidelityTransport(httpx.MockTransport(Upstream(200)), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        with pytest.raises(CircuitOpen):
            await client.get(URL)


# ---------------------------------------------------------------- sync transport


def sync_transport(upstream: Upstream, clock: FakeClock, pol: Policy | None = None) -> Any:
    return FidelitySyncTransport(
        httpx.MockTransport(upstream),
        policy=pol or policy(),
        clock=clock,
        rng=seeded_random(42),
        telemetry=False,
    )


def test_sync_transport_retries_and_closes_failed_responses(clock: FakeClock) -> None:
    up = Upstream(503, httpx.ConnectError("x"), 200)
    with httpx.Client(transport=sync_transport(up, clock)) as client:
        response = client.get(URL)
    assert response.status_code == 200
    assert up.attempts_seen() == ["1", "2", "3"]
    assert up.closed == 2  # the 503 (by us) and the 200 (by the client)
    assert len(clock.sleeps) == 2
    assert [d.reason for d in decisions(response) if d.verdict == "retry"] == [
        "status_503",
        "connect_error",
    ]


def test_sync_transport_never_retries_a_post(clock: FakeClock) -> None:
    up = Upstream(503)
    with httpx.Client(transport=sync_transport(up, clock)) as client:
        assert client.post(URL, content=b"once").status_code == 503
    assert up.calls == 1


def test_sync_transport_breaker_and_deadline(clock: FakeClock) -> None:
    up = Upstream(503)
    t = sync_transport(up, clock, policy(attempts=5, breaker=flaky_breaker()))
    with httpx.Client(transport=t) as client:
        assert client.get(URL).status_code == 503
        with pytest.raises(CircuitOpen):
            client.get(URL)
        with Bound(t.engine, deadline_in=-1.0), pytest.raises(DeadlineExceeded):
            client.get(URL)
    assert up.calls == 2


async def test_sync_transport_in_a_worker_thread_sees_the_request_context(
    clock: FakeClock,
) -> None:
    """Sync routes run in a thread pool; the context variable reaches them."""
    up = Upstream(503, 200)
    t = sync_transport(up, clock)
    seen: list[str] = []

    def sync_route() -> int:
        seen.append(threading.current_thread().name)
        with httpx.Client(transport=t) as client:
            return client.get(URL).status_code

    with Bound(t.engine) as ctx:
        status = await anyio.to_thread.run_sync(sync_route)
    assert status == 200
    assert seen[0] != threading.current_thread().name
    assert [d.verdict for d in ctx.decisions] == ["allow", "retry"]


async def test_sync_transport_bridges_to_an_async_only_store(clock: FakeClock) -> None:
    """A store without `*_now` twins is run on the event loop of the worker thread's portal."""

    class AsyncOnly(MemoryStore):
        gate_now = None  # type: ignore[assignment]
        outbound_gate_now = None  # type: ignore[assignment]
        outbound_gate = StateStore.outbound_gate  # composes the methods below
        record_now = None  # type: ignore[assignment]
        budget_request_now = None  # type: ignore[assignment]
        budget_try_retry_now = None  # type: ignore[assignment]
        calls: list[str] = []

        async def breaker_gate(self, key: str, cfg: BreakerConfig, now: float) -> Any:
            self.calls.append("gate")
            with self._lock:
                return self.breaker_state(key, cfg).gate(now, self._rng), "redis", 0.25

        async def record(self, key: str, cfg: BreakerConfig, gate: Any, *rest: Any) -> str:
            self.calls.append("record")
            return "closed"

        async def budget_request(self, *args: Any) -> None:
            self.calls.append("budget_request")

        async def budget_try_retry(self, *args: Any) -> tuple[bool, str, float]:
            self.calls.append("budget_try_retry")
            return True, "redis", 0.25

    store = AsyncOnly()
    engine = Engine(policy(breaker=BreakerConfig()), clock=clock, store=store)
    up = Upstream(503, 200)
    t = FidelitySyncTransport(httpx.MockTransport(up), engine=engine, telemetry=False)

    def sync_route() -> int:
        with httpx.Client(transport=t) as client:
            return client.get(URL).status_code

    with Bound(engine) as ctx:
        assert await anyio.to_thread.run_sync(sync_route) == 200
    assert store.calls == [
        "budget_request",
        "gate",
        "record",
        "budget_try_retry",
        "gate",
        "record",
    ]
    assert {d.state_source for d in ctx.decisions} == {"redis"}
    # the retry is recorded when it is decided, before its backoff, on the state read
    # then: the backoff is the plan, not the state's age
    ages = [d.state_age_s for d in ctx.decisions]
    assert ages == [0.25, 0.25]


# ---------------------------------------------------------------- through the middleware


async def test_middleware_marks_our_error_response_after_upstream_exhaustion(
    clock: FakeClock,
) -> None:
    """In-process: a route whose upstream call gave up answers with the don't-retry signal."""
    up = Upstream(503)
    engine = Engine(policy(base_ms=1, max_ms=2), clock=clock, rng=seeded_random(2))
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(up), engine=engine, telemetry=False)
    )

    async def route(request: Request) -> Response:
        upstream = await client.get(URL)
        return Response(status_code=502 if upstream.status_code >= 500 else 200)

    async def post_route(request: Request) -> Response:
        upstream = await client.post(URL, content=b"x")
        return Response(status_code=502 if upstream.status_code >= 500 else 200)

    app = Starlette(routes=[Route("/", route), Route("/post", post_route, methods=["POST"])])
    wrapped = FidelityMiddleware(app, engine=engine, telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=wrapped), base_url="http://app"
    ) as outer:
        exhausted = await outer.get("/")
        not_retried = await outer.post("/post")
    await client.aclose()
    assert exhausted.status_code == 502
    assert exhausted.headers["x-fidelity-retry"] == "exhausted"
    assert not_retried.status_code == 502
    assert "x-fidelity-retry" not in not_retried.headers  # we did not retry: callers may
    assert up.calls == 3 + 1


# ---------------------------------------------------------------- multipart bodies


class Unseekable(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = self.data, b""
        return chunk


async def test_multipart_files_are_retried_with_the_same_body(clock: FakeClock) -> None:
    """Regression (issue 12, #16): `files=` bodies were never retried, though documented as
    replayable. Bytes and seekable files are rewound and sent again."""
    bodies: list[bytes] = []

    def route(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(503 if len(bodies) == 1 else 200)

    t = FidelityTransport(httpx.MockTransport(route), policy=policy(), clock=clock, telemetry=False)
    files = {"a": ("a.txt", io.BytesIO(b"file-a")), "b": ("b.txt", b"file-b")}
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.put(URL, files=files)
    assert response.status_code == 200
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    assert b"file-a" in bodies[1]
    assert b"file-b" in bodies[1]


async def test_multipart_with_an_unseekable_file_is_not_retried(clock: FakeClock) -> None:
    up = Upstream(503, 200)
    t = FidelityTransport(httpx.MockTransport(up), policy=policy(), clock=clock, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine) as ctx:
            files = {"a": ("a.bin", Unseekable(b"once"))}
            assert (await client.put(URL, files=files)).status_code == 503
    assert up.calls == 1
    assert give_ups(ctx)[-1] == ("retry", "give_up", "body_not_replayable")


# ---------------------------------------------------------------- a callee's own refusals


async def test_a_callees_control_layer_refusal_is_no_failure_for_our_breaker(
    clock: FakeClock,
) -> None:
    """A 503 marked `x-fidelity-decided-by` (the callee's breaker shed it) from a trusted
    peer does not count against the callee: our breaker stays closed, and the refusal's
    Retry-After is honoured by the retry."""
    marked = httpx.Response(503, headers={"x-fidelity-decided-by": "breaker", "retry-after": "1"})
    answers = iter([marked, marked, httpx.Response(200)])
    breaker = BreakerConfig(consecutive_failures=1, open_s=30.0)
    t = FidelityTransport(
        httpx.MockTransport(lambda request: next(answers)),
        policy=policy(breaker=breaker),
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://127.0.0.1:9/x")  # an IP literal: a trusted peer
    assert response.status_code == 200
    assert clock.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]
    state = t.engine.store.breaker_state("upstream:127.0.0.1:9", breaker)
    assert state.state == "closed"


async def test_an_untrusted_peers_marker_counts_as_a_failure(clock: FakeClock) -> None:
    marked = httpx.Response(503, headers={"x-fidelity-decided-by": "breaker"})
    breaker = BreakerConfig(consecutive_failures=1, open_s=30.0)
    t = FidelityTransport(
        httpx.MockTransport(lambda request: marked),
        policy=policy(breaker=breaker),
        clock=clock,
        telemetry=False,
    )
    async with httpx.AsyncClient(transport=t) as client:
        assert (await client.get("http://203.0.113.9/x")).status_code == 503
        with pytest.raises(CircuitOpen):
            await client.get("http://203.0.113.9/x")


@pytest.mark.parametrize("sync", [False, True])
async def test_a_call_after_the_response_is_not_bound_by_the_callers_deadline(
    sync: bool,
) -> None:
    """Work after the response (a Starlette background task) runs for nobody who waits:
    its calls are calls of their own (the middleware's policy, the policy's default
    deadline, their own decisions), not cut by the answered caller's deadline (1 s here,
    passed by the time the task calls), nor added to the answered request's record."""
    clock = FakeClock()
    outcomes: list[Any] = []
    upstream = httpx.MockTransport(lambda request: httpx.Response(200))
    policy = Policy(
        deadline=DeadlineConfig(default_ms=1_000),
        upstreams=(UpstreamConfig(host="audit.internal", attempt_timeout_ms=500),),
    )

    def call_sync() -> httpx.Response:
        with httpx.Client(transport=FidelitySyncTransport(upstream, telemetry=False)) as c:
            return c.get("http://audit.internal/log")

    async def later() -> None:
        clock.advance(2.0)  # the background work takes a while
        try:
            if sync:
                response = await anyio.to_thread.run_sync(call_sync)
            else:
                transport = FidelityTransport(upstream, telemetry=False)
                async with httpx.AsyncClient(transport=transport) as c:
                    response = await c.get("http://audit.internal/log")
            outcomes.append(response.status_code)
            outcomes.append(response.extensions.get("fidelity_context"))
        except Exception as exc:
            outcomes.append(exc)

    async def handler(request: Request) -> Response:
        return Response("ok", background=BackgroundTask(later))

    app = Starlette(routes=[Route("/", handler)])
    seen: list[DecisionContext] = []

    class Keep:
        def start(self, ctx: DecisionContext, scope: Any) -> None:
            return None

        def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
            seen.append(ctx)

    mw = FidelityMiddleware(app, policy=policy, clock=clock, observer=Keep(), telemetry=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://t") as c:
        assert (await c.get("/")).status_code == 200
    assert outcomes[0] == 200, outcomes
    own = outcomes[1]
    assert isinstance(own, DecisionContext)
    assert own is not seen[0]
    assert own.engine is mw.engine  # the middleware's policy still applies
    assert [d.layer for d in seen[0].decisions if d.subject == "audit.internal"] == []


@given(ms=st.integers(1, 86_400_000))
def test_the_next_hop_is_told_a_little_less_than_the_attempt_waits(ms: int) -> None:
    """So its answer at its deadline (a 504, marked exhausted when it retried) arrives
    before this attempt's own timeout fires and is retried, restarting its retries."""
    told = int(advertised_ms(ms))
    assert 1 <= told <= ms
    if ms > 3:
        assert told <= ms - 2
        assert ms - told == min(250, max(2, ms // 10))
