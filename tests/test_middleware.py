"""FidelityMiddleware through a real Starlette app, on a fake clock.

Each coordination rule of docs/inbound.md that applies inbound has its own test.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import fidelity_mw
from _asgi import http_scope
from fidelity_mw import (
    BreakerConfig,
    DeadlineConfig,
    DecisionContext,
    FidelityMiddleware,
    Policy,
    RateLimit,
    RouteConfig,
)
from fidelity_mw.context import context_from_scope
from fidelity_mw.decide.breaker import CLOSED, HALF_OPEN, OPEN
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

POLICY_FIELD = re.compile(r'^"[^"]+";q=\d+;w=\d+(, "[^"]+";q=\d+;w=\d+)*$')
LIMIT_FIELD = re.compile(r'^"[^"]+";r=\d+;t=\d+(, "[^"]+";r=\d+;t=\d+)*$')
NO_BREAKER = Policy(breaker=None)


# ---------------------------------------------------------------- harness


class Harness:
    """A Starlette app behind FidelityMiddleware, driven with raw ASGI calls.

    Raw calls let each request come from any client address and carry any
    header bytes; `contexts` keeps the DecisionContext of every request, also
    of those the app never saw.
    """

    def __init__(self, policy: Policy, clock: FakeClock, **options: Any) -> None:
        self.clock = clock
        self.calls: Counter[str] = Counter()
        self.seen: list[DecisionContext | None] = []
        self.fail_with: dict[str, int] = {}
        self.contexts: list[DecisionContext] = []
        self.hanging = asyncio.Event()

        async def ok(request: Request) -> Response:
            self.calls[request.url.path] += 1
            self.seen.append(fidelity_mw.current())
            return PlainTextResponse("ok")

        async def status(request: Request) -> Response:
            code = int(request.path_params["code"])
            self.calls[request.url.path] += 1
            return PlainTextResponse(str(code), status_code=code)

        async def boom(request: Request) -> Response:
            self.calls[request.url.path] += 1
            raise RuntimeError("boom")

        async def flaky(request: Request) -> Response:
            self.calls[request.url.path] += 1
            code = self.fail_with.get(request.url.path, 200)
            return PlainTextResponse(str(code), status_code=code)

        async def slow(request: Request) -> Response:
            self.calls[request.url.path] += 1
            clock.advance(float(request.query_params.get("s", "10")))
            return PlainTextResponse(
                "late", status_code=int(request.query_params.get("code", "500"))
            )

        async def raising(request: Request) -> Response:
            self.calls[request.url.path] += 1
            kind = request.query_params["exc"]
            raise {"timeout": TimeoutError, "refused": ConnectionRefusedError}[kind]("backend")

        async def read_body(request: Request) -> Response:
            self.calls[request.url.path] += 1
            body = await request.body()
            return PlainTextResponse(body)

        async def hang(request: Request) -> Response:
            self.calls[request.url.path] += 1
            self.hanging.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def stream(request: Request) -> Response:
            self.calls[request.url.path] += 1

            async def chunks():  # type: ignore[no-untyped-def]
                for i in range(100):
                    yield f"{i}\n".encode()
                    await asyncio.sleep(0)

            return StreamingResponse(chunks())

        self.app = Starlette(
            routes=[
                Route("/", ok, methods=["GET", "POST"]),
                Route("/other", ok),
                Route("/items/{item_id}", ok),
                Route("/status/{code}", status),
                Route("/boom", boom),
                Route("/flaky", flaky),
                Route("/flaky2", flaky),
                Route("/slow", slow),
                Route("/raise", raising),
                Route("/body", read_body, methods=["POST"]),
                Route("/stream", stream),
                Route("/hang", hang),
            ]
        )
        options.setdefault("telemetry", False)
        options.setdefault("rng", seeded_random(7))
        self.app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, **options)

    @property
    def store(self) -> MemoryStore:
        store = self.contexts[-1].engine.store
        assert isinstance(store, MemoryStore)
        return store

    def breaker_state(self, route: str) -> str:
        return self.store.breakers[f"route:{route}"].state

    async def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        headers: list[tuple[bytes, bytes]] | None = None,
        client: tuple[str, int] | None = ("192.0.2.1", 5000),
        body: bytes = b"",
        disconnect: bool = False,
    ) -> tuple[int | None, dict[bytes, bytes], bytes]:
        """One request. Returns (status, headers, body); status None if the app raised
        before starting a response. With `disconnect`, the client is gone at once."""
        path_only, _, query = path.partition("?")
        scope: dict[str, Any] = http_scope(
            path_only,
            method,
            spec_version="2.3",
            query_string=query.encode(),
            headers=[(b"host", b"testserver"), *(headers or [])],
            client=client,
        )
        done = asyncio.Event()
        sent_body = False
        messages: list[Mapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if disconnect:
                return {"type": "http.disconnect"}
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: Mapping[str, Any]) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        try:
            await self.app(scope, receive, send)
        except Exception:
            if not any(m["type"] == "http.response.start" for m in messages):
                raise
        finally:
            ctx = context_from_scope(scope)
            if ctx is not None:
                self.contexts.append(ctx)
        start = next((m for m in messages if m["type"] == "http.response.start"), None)
        if start is None:
            return None, {}, b""
        got_headers: dict[bytes, bytes] = {}
        for name, value in start["headers"]:
            got_headers[name.lower()] = value
        content = b"".join(
            m.get("body", b"") for m in messages if m["type"] == "http.response.body"
        )
        return start["status"], got_headers, content

    async def status(self, path: str = "/", **kw: Any) -> int | None:
        return (await self.request(path, **kw))[0]


def problem(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


def limits(*items: RateLimit, **policy: Any) -> Policy:
    policy.setdefault("breaker", None)
    return Policy(rate_limits=items, **policy)


# ---------------------------------------------------------------- 429


async def test_429_with_retry_after_fields_and_problem_body(clock: FakeClock) -> None:
    h = Harness(limits(RateLimit(name="per-client", rate="4/10s", burst=4)), clock)
    # t: seconds until one more unit is available (2.5 s per unit)
    for expected in ("r=3;t=3", "r=2;t=3", "r=1;t=3", "r=0;t=3"):
        status, headers, _ = await h.request()
        assert status == 200
        assert headers[b"ratelimit"] == f'"per-client";{expected}'.encode()
    clock.advance(0.5)
    status, headers, body = await h.request()
    assert status == 429
    assert h.calls["/"] == 4  # the app never saw the rejected request
    assert headers[b"retry-after"] == b"2"  # 2.5 s per unit, 0.5 s gone: 2.0
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"x-fidelity-decided-by"] == b"ratelimit"  # ours, not the app's
    assert headers[b"ratelimit-policy"] == b'"per-client";q=4;w=10'
    assert headers[b"ratelimit"] == b'"per-client";r=0;t=2'  # the same wait as Retry-After
    assert POLICY_FIELD.match(headers[b"ratelimit-policy"].decode())
    assert LIMIT_FIELD.match(headers[b"ratelimit"].decode())
    doc = problem(body)
    assert doc["status"] == 429
    assert doc["title"] == "Too Many Requests"
    assert doc["type"].endswith("rate-limited")
    assert doc["limit"] == "per-client"
    assert "per-client" in doc["detail"]
    assert int(headers[b"content-length"]) == len(body)
    clock.advance(1.2)
    _, headers, _ = await h.request()
    assert headers[b"retry-after"] == b"1"  # 0.8 s, rounded up
    clock.advance(0.8)
    assert await h.status() == 200


async def test_429_retry_after_rounds_up_a_fraction(clock: FakeClock) -> None:
    h = Harness(limits(RateLimit(name="per-client", rate="3/10s", burst=3)), clock)
    for _ in range(3):
        assert await h.status() == 200
    _, headers, _ = await h.request()
    assert headers[b"retry-after"] == b"4"  # 3.33 s
    clock.advance(3.3)
    assert await h.status() == 429
    clock.advance(0.04)
    assert await h.status() == 200


async def test_ratelimit_reset_is_not_inflated_by_float_noise(clock: FakeClock) -> None:
    h = Harness(limits(RateLimit(name="l", rate="3/10s", burst=3)), clock)
    for expected in ("r=2;t=4", "r=1;t=4", "r=0;t=4"):  # 3.33 s per unit
        _, headers, _ = await h.request()
        assert headers[b"ratelimit"] == f'"l";{expected}'.encode()


async def test_concurrent_requests_in_one_loop_never_exceed_the_burst(clock: FakeClock) -> None:
    h = Harness(limits(RateLimit(name="l", rate="10/h", burst=10)), clock)
    statuses = await asyncio.gather(*(h.status("/stream") for _ in range(60)))
    assert Counter(statuses) == {200: 10, 429: 50}
    assert h.calls["/stream"] == 10


async def test_retry_after_is_an_integer_rounded_up(clock: FakeClock) -> None:
    h = Harness(limits(RateLimit(name="l", rate="2/s", burst=1)), clock)
    assert await h.status() == 200
    clock.advance(0.1)
    _, headers, _ = await h.request()
    assert headers[b"retry-after"] == b"1"  # 0.4 s -> 1, never 0
    assert headers[b"retry-after"].isdigit()


async def test_policy_field_describes_the_sustained_rate(clock: FakeClock) -> None:
    """q/w is never more than the real rate: a client that paces itself by the
    advertised policy is never rejected."""
    h = Harness(limits(RateLimit(name="bursty", rate="10/s", burst=100)), clock)
    _, headers, _ = await h.request()
    field = headers[b"ratelimit-policy"].decode()
    match = re.fullmatch(r'"bursty";q=(\d+);w=(\d+)', field)
    assert match
    quota, window = int(match[1]), int(match[2])
    assert quota / window <= 10
    for _ in range(3 * quota):
        clock.advance(window / quota)
        assert await h.status() == 200


async def test_retry_after_comes_from_the_limit_that_clears_last(clock: FakeClock) -> None:
    policy = limits(
        RateLimit(name="hourly", rate="2/h", burst=2),
        RateLimit(name="fast", rate="1/s", burst=1),
    )
    h = Harness(policy, clock)
    assert await h.status() == 200
    clock.advance(1)
    assert await h.status() == 200
    # Both limits reject now: fast clears in 1 s, hourly in ~29 min.
    status, headers, body = await h.request()
    assert status == 429
    assert headers[b"retry-after"] == b"1799"
    assert problem(body)["limit"] == "hourly"
    items = headers[b"ratelimit"].decode().split(", ")
    assert [item.split(";")[0] for item in items] == ['"hourly"', '"fast"']
    assert headers[b"ratelimit-policy"] == b'"hourly";q=2;w=3600, "fast";q=1;w=1'
    reasons = [(d.subject, d.verdict) for d in h.contexts[-1].decisions if d.layer == "ratelimit"]
    assert reasons == [("hourly", "reject"), ("fast", "reject")]


async def test_retry_after_ignores_limits_that_allow(clock: FakeClock) -> None:
    policy = limits(
        RateLimit(name="roomy", rate="100/s", burst=100),
        RateLimit(name="tight", rate="1/5s", burst=1),
    )
    h = Harness(policy, clock)
    assert await h.status() == 200
    status, headers, body = await h.request()
    assert status == 429
    assert headers[b"retry-after"] == b"5"
    assert problem(body)["limit"] == "tight"
    # The roomy limit's allowance was not spent by the rejected request: 99 of its 100
    # left after the first (its field said 98, as if the refused one had taken a unit).
    assert headers[b"ratelimit"] == b'"roomy";r=99;t=1, "tight";r=0;t=5'


async def test_ratelimit_t_is_the_wait_for_more_quota_and_retry_after_not_earlier(
    clock: FakeClock,
) -> None:
    """Issue 12 #17 (draft-ietf-httpapi-ratelimit-headers-10+): `t` is the seconds until
    more quota is available, and Retry-After never points earlier than it. Old: a 429
    with Retry-After 1 and t=2 (t was the time until the bucket is full)."""
    h = Harness(limits(RateLimit(name="l", rate="1/s", burst=2)), clock)
    for expected in (b'"l";r=1;t=1', b'"l";r=0;t=1'):
        status, headers, _ = await h.request()
        assert (status, headers[b"ratelimit"]) == (200, expected)
    clock.advance(0.25)
    status, headers, _ = await h.request()
    assert status == 429
    assert headers[b"retry-after"] == b"1"
    assert headers[b"ratelimit"] == b'"l";r=0;t=1'
    clock.advance(0.75)  # t said 1 s: quota is there
    assert await h.status() == 200


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    gaps=st.lists(st.sampled_from([0.0, 0.1, 0.4, 1.0, 2.5]), min_size=1, max_size=12),
)
async def test_retry_after_is_never_earlier_than_any_t(gaps: list[float]) -> None:
    clock = FakeClock()
    h = Harness(
        limits(RateLimit(name="a", rate="2/s", burst=3), RateLimit(name="b", rate="5/10s")),
        clock,
    )
    for gap in gaps:
        clock.advance(gap)
        status, headers, _ = await h.request()
        ts = [int(item.rsplit("t=", 1)[1]) for item in headers[b"ratelimit"].decode().split(", ")]
        if status == 429:
            assert max(ts) <= int(headers[b"retry-after"])


async def test_rate_limit_headers_modes(clock: FakeClock) -> None:
    lim = RateLimit(name="l", rate="1/s", burst=1)
    always = Harness(limits(lim), clock)
    on_reject = Harness(limits(lim, rate_limit_headers="on_reject"), clock)
    never = Harness(limits(lim, rate_limit_headers="never"), clock)

    _, headers, _ = await always.request()
    assert b"ratelimit" in headers
    assert b"ratelimit-policy" in headers

    _, headers, _ = await on_reject.request()
    assert b"ratelimit" not in headers
    assert b"ratelimit-policy" not in headers
    status, headers, _ = await on_reject.request()
    assert status == 429
    assert headers[b"ratelimit"] == b'"l";r=0;t=1'

    _, headers, _ = await never.request()
    assert b"ratelimit" not in headers
    status, headers, _ = await never.request()
    assert status == 429
    assert b"ratelimit" not in headers
    assert b"ratelimit-policy" not in headers
    assert headers[b"retry-after"] == b"1"  # Retry-After is not optional


async def test_app_headers_are_kept_next_to_ratelimit_fields(clock: FakeClock) -> None:
    h = Harness(limits(RateLimit(name="l", rate="5/s")), clock)
    _, headers, body = await h.request()
    assert headers[b"content-type"].startswith(b"text/plain")
    assert headers[b"content-length"] == b"2"
    assert body == b"ok"


# ---------------------------------------------------------------- breaker


def breaker_policy(**cfg: Any) -> Policy:
    cfg.setdefault("consecutive_failures", 2)
    cfg.setdefault("open_s", 10)
    cfg.setdefault("open_min_s", cfg["open_s"])  # a fixed open period
    cfg.setdefault("open_jitter", 0.0)
    cfg.setdefault("half_open_probes", 1)
    return Policy(breaker=BreakerConfig(**cfg))


async def test_503_while_open_without_calling_the_app(clock: FakeClock) -> None:
    h = Harness(breaker_policy(), clock)
    h.fail_with["/flaky"] = 500
    assert await h.status("/flaky") == 500
    assert await h.status("/flaky") == 500
    assert h.breaker_state("/flaky") == OPEN
    clock.advance(2.5)
    for _ in range(5):
        status, headers, body = await h.request("/flaky")
        assert status == 503
        assert headers[b"retry-after"] == b"8"  # 7.5 s until half-open, rounded up
        assert headers[b"x-fidelity-decided-by"] == b"breaker"
        assert headers[b"content-type"] == b"application/problem+json"
        doc = problem(body)
        assert doc["status"] == 503
        assert doc["type"].endswith("circuit-open")
        assert doc["route"] == "/flaky"
    assert h.calls["/flaky"] == 2
    shed = h.contexts[-1].decisions
    assert [(d.layer, d.verdict, d.reason) for d in shed if d.layer == "breaker"] == [
        ("breaker", "shed", "breaker_open")
    ]
    assert h.contexts[-1].decided_by == "breaker"
    # Other routes have their own breaker.
    assert await h.status("/other") == 200


async def test_half_open_probe_closes_on_success(clock: FakeClock) -> None:
    h = Harness(breaker_policy(), clock)
    h.fail_with["/flaky"] = 500
    await h.status("/flaky")
    await h.status("/flaky")
    clock.advance(10)
    h.fail_with["/flaky"] = 200
    assert await h.status("/flaky") == 200
    probe = h.contexts[-1].last("breaker")
    assert probe is not None
    assert (probe.verdict, probe.reason) == ("probe", "half_open_probe")
    assert h.breaker_state("/flaky") == CLOSED
    assert await h.status("/flaky") == 200


async def test_half_open_probe_failure_reopens(clock: FakeClock) -> None:
    h = Harness(breaker_policy(), clock)
    h.fail_with["/flaky"] = 500
    await h.status("/flaky")
    await h.status("/flaky")
    clock.advance(10)
    assert await h.status("/flaky") == 500  # the probe
    assert h.breaker_state("/flaky") == OPEN
    assert await h.status("/flaky") == 503
    assert h.calls["/flaky"] == 3


async def test_breaker_is_per_route_template(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    h.fail_with["/flaky"] = 503
    await h.status("/flaky")
    assert await h.status("/flaky") == 503
    assert h.calls["/flaky"] == 1
    # /items/1 and /items/2 share one breaker, named by the template.
    assert await h.status("/items/1") == 200
    assert h.contexts[-1].route == "/items/{item_id}"


async def test_route_breaker_can_be_disabled_or_replaced(clock: FakeClock) -> None:
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=1, open_s=10),
        routes=(
            RouteConfig(match="/flaky", breaker=False),
            RouteConfig(match="/flaky2", breaker=BreakerConfig(consecutive_failures=3)),
        ),
    )
    h = Harness(policy, clock)
    h.fail_with["/flaky"] = h.fail_with["/flaky2"] = 500
    assert [await h.status("/flaky") for _ in range(4)] == [500] * 4
    assert [await h.status("/flaky2") for _ in range(4)] == [500, 500, 500, 503]


# ---------------------------------------------------------------- deadline


@pytest.mark.parametrize(
    "header",
    [
        (b"x-request-timeout-ms", b"0"),
        (b"grpc-timeout", b"0S"),
        (b"grpc-timeout", b"0m"),
    ],
)
async def test_504_for_an_expired_deadline_without_running_the_app(
    clock: FakeClock, header: tuple[bytes, bytes]
) -> None:
    h = Harness(Policy(rate_limits=(RateLimit(name="l", rate="1/min"),)), clock)
    status, headers, body = await h.request(headers=[header])
    assert status == 504
    assert h.calls["/"] == 0
    assert headers[b"content-type"] == b"application/problem+json"
    assert problem(body)["type"].endswith("deadline-expired")
    ctx = h.contexts[-1]
    assert ctx.decided_by == "deadline"
    assert [(d.layer, d.verdict, d.reason) for d in ctx.decisions] == [
        ("deadline", "reject", "expired_on_arrival")
    ]
    # The expired request cost no quota: the single allowed request still goes through.
    assert await h.status() == 200


async def test_deadline_lives_on_the_context(clock: FakeClock) -> None:
    h = Harness(NO_BREAKER, clock)
    start = clock.monotonic()
    await h.request(headers=[(b"x-request-timeout-ms", b"1500")])
    ctx = h.seen[-1]
    assert ctx is not None
    assert ctx.deadline_at == pytest.approx(start + 1.5)
    assert ctx.remaining_s(start + 1.0) == pytest.approx(0.5)
    deadline = ctx.last("deadline")
    assert deadline is not None
    assert (deadline.verdict, deadline.reason) == ("allow", "caller_deadline")
    assert deadline.details == {"remaining_ms": 1500.0}


async def test_shortest_deadline_header_wins(clock: FakeClock) -> None:
    h = Harness(NO_BREAKER, clock)
    start = clock.monotonic()
    await h.request(headers=[(b"x-request-timeout-ms", b"5000"), (b"grpc-timeout", b"2S")])
    assert h.seen[-1] is not None
    assert h.seen[-1].deadline_at == pytest.approx(start + 2.0)


async def test_default_and_capped_deadlines(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None,
        deadline=DeadlineConfig(default_ms=3000),
        routes=(RouteConfig(match="/other", deadline_ms=700),),
    )
    h = Harness(policy, clock)
    start = clock.monotonic()
    await h.request()
    assert h.seen[-1].deadline_at == pytest.approx(start + 3.0)  # type: ignore[union-attr]
    await h.request(headers=[(b"x-request-timeout-ms", b"60000")])
    assert h.seen[-1].deadline_at == pytest.approx(start + 3.0)  # type: ignore[union-attr]
    await h.request("/other")
    assert h.seen[-1].deadline_at == pytest.approx(start + 0.7)  # type: ignore[union-attr]
    await h.request("/other", headers=[(b"x-request-timeout-ms", b"200")])
    assert h.seen[-1].deadline_at == pytest.approx(start + 0.2)  # type: ignore[union-attr]


async def test_malformed_deadline_is_recorded_and_ignored(clock: FakeClock) -> None:
    h = Harness(Policy(breaker=None, deadline=DeadlineConfig(default_ms=3000)), clock)
    start = clock.monotonic()
    status, _, _ = await h.request(headers=[(b"grpc-timeout", b"soon")])
    assert status == 200
    ctx = h.seen[-1]
    assert ctx is not None
    assert ctx.deadline_at == pytest.approx(start + 3.0)
    assert [(d.layer, d.subject, d.verdict, d.reason) for d in ctx.decisions] == [
        ("deadline", "grpc-timeout", "allow", "malformed_header"),
        ("deadline", "/", "allow", "route_default"),
    ]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-request-timeout-ms", b"-0"),
        (b"x-request-timeout-ms", b"1_000"),
        (b"x-request-timeout-ms", b"1e3"),
        (b"x-request-timeout-ms", b"+5"),
        (b"x-request-timeout-ms", b"\t7"),
        (b"grpc-timeout", b"\t0S"),
    ],
)
async def test_deadline_headers_follow_their_own_grammar(
    clock: FakeClock, name: bytes, value: bytes
) -> None:
    """Issue 12 #23: Python number syntax is malformed (`-0` used to give a 504)."""
    h = Harness(Policy(breaker=None, deadline=DeadlineConfig(default_ms=3000)), clock)
    start = clock.monotonic()
    status, _, _ = await h.request(headers=[(name, value)])
    assert status == 200
    ctx = h.seen[-1]
    assert ctx is not None
    assert ctx.deadline_at == pytest.approx(start + 3.0)
    assert [(d.subject, d.reason) for d in ctx.decisions] == [
        (name.decode(), "malformed_header"),
        ("/", "route_default"),
    ]


# ---------------------------------------------------------------- context


async def test_current_is_none_outside_a_request(clock: FakeClock) -> None:
    assert fidelity_mw.current() is None
    h = Harness(NO_BREAKER, clock)
    await h.request()
    assert fidelity_mw.current() is None
    assert h.seen[-1] is not None


async def test_request_state_and_scope_hold_the_current_context(clock: FakeClock) -> None:
    found: list[tuple[Any, Any]] = []

    async def endpoint(request: Request) -> Response:
        found.append((fidelity_mw.current(), request.state.fidelity))
        return JSONResponse({"route": request.state.fidelity.route})

    app = Starlette(routes=[Route("/things/{id}", endpoint)])
    app.add_middleware(FidelityMiddleware, policy=NO_BREAKER, clock=clock, telemetry=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/things/7")
        await client.get("/things/8")
    assert response.json() == {"route": "/things/{id}"}
    (cur1, state1), (cur2, state2) = found
    assert isinstance(cur1, DecisionContext)
    assert cur1 is state1
    assert cur2 is state2
    assert cur1 is not cur2
    assert cur1.request_id != cur2.request_id
    assert cur1.method == "GET"
    assert cur1.started_at == clock.monotonic()


async def test_decisions_in_order(clock: FakeClock) -> None:
    policy = Policy(
        breaker=BreakerConfig(),
        rate_limits=(
            RateLimit(name="a", rate="10/s"),
            RateLimit(name="b", rate="1/s", burst=1),
        ),
    )
    h = Harness(policy, clock)
    await h.request(headers=[(b"x-request-timeout-ms", b"900")])
    allowed = h.contexts[-1]
    assert [(d.layer, d.subject, d.verdict, d.reason) for d in allowed.decisions] == [
        ("deadline", "/", "allow", "caller_deadline"),
        ("breaker", "/", "allow", "breaker_closed"),
        ("ratelimit", "a", "allow", "under_limit"),
        ("ratelimit", "b", "allow", "under_limit"),
    ]
    assert all(d.at == clock.monotonic() for d in allowed.decisions)
    assert all(d.state_source in ("request", "memory") for d in allowed.decisions)
    assert allowed.outcome == "served"
    assert allowed.decided_by == "app"
    assert allowed.status == 200

    await h.request()
    rejected = h.contexts[-1]
    assert [(d.layer, d.subject, d.verdict, d.reason) for d in rejected.decisions] == [
        ("deadline", "/", "allow", "route_default"),
        ("breaker", "/", "allow", "breaker_closed"),
        ("ratelimit", "a", "allow", "under_limit"),
        ("ratelimit", "b", "reject", "over_limit"),
    ]
    assert rejected.decided_by == "ratelimit"
    assert rejected.outcome == "rejected"
    last = rejected.decisions[-1]
    assert last.details is not None
    assert last.details["retry_after_s"] == pytest.approx(1.0)


async def test_app_decisions_come_after_the_middleware_ones(clock: FakeClock) -> None:
    async def endpoint(request: Request) -> Response:
        ctx = fidelity_mw.current()
        assert ctx is not None
        ctx.decide("retry", "upstream", "give_up", "test")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(RateLimit(name="a", rate="5/s"),)),
        clock=clock,
        telemetry=False,
    )
    h = Harness(NO_BREAKER, clock)
    h.app = app
    await h.request()
    assert [d.layer for d in h.contexts[-1].decisions] == [
        "deadline",
        "breaker",
        "ratelimit",
        "retry",
    ]


# ---------------------------------------------------------------- coordination rules


async def test_breaker_shed_consumes_no_rate_limit_quota(clock: FakeClock) -> None:
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=1, open_s=1, open_jitter=0),
        rate_limits=(RateLimit(name="l", rate="3/h", burst=3),),
    )
    h = Harness(policy, clock)
    h.fail_with["/flaky"] = 500
    assert await h.status("/flaky") == 500  # 1 unit spent, breaker opens
    for _ in range(10):
        assert await h.status("/flaky") == 503
    clock.advance(1)
    h.fail_with["/flaky"] = 200
    status, headers, _ = await h.request("/flaky")  # the probe
    assert status == 200
    assert headers[b"ratelimit"].startswith(b'"l";r=1;')  # 2 spent, not 12
    assert await h.status("/flaky") == 200
    assert await h.status("/flaky") == 429


async def test_limiter_rejection_is_never_a_breaker_failure(clock: FakeClock) -> None:
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=1, min_calls=1, failure_ratio=0.01),
        rate_limits=(RateLimit(name="l", rate="1/h", burst=1),),
    )
    h = Harness(policy, clock)
    greedy = ("198.51.100.1", 1)
    assert await h.status(client=greedy) == 200
    for _ in range(20):
        assert await h.status(client=greedy) == 429
    assert h.breaker_state("/") == CLOSED
    assert h.store.breakers["route:/"].totals(clock.monotonic()) == (1, 0, 0)
    assert await h.status(client=("198.51.100.2", 1)) == 200


async def test_limiter_rejection_frees_the_half_open_probe(clock: FakeClock) -> None:
    policy = Policy(
        breaker=BreakerConfig(
            consecutive_failures=1, open_s=5, open_jitter=0, half_open_probes=1, probe_lease_s=600
        ),
        rate_limits=(RateLimit(name="l", rate="1/h", burst=1),),
    )
    h = Harness(policy, clock)
    greedy, polite = ("198.51.100.1", 1), ("198.51.100.2", 1)
    h.fail_with["/flaky"] = 500
    assert await h.status("/flaky", client=greedy) == 500  # opens; greedy's quota is spent
    clock.advance(5)
    h.fail_with["/flaky"] = 200
    # greedy's request is given the probe by the breaker, then refused by the limiter...
    assert await h.status("/flaky", client=greedy) == 429
    assert h.breaker_state("/flaky") == HALF_OPEN
    probe = h.contexts[-1].last("breaker")
    assert probe is not None
    assert probe.verdict == "probe"
    # ...and the slot is free for the next caller, whose success closes the breaker.
    assert await h.status("/flaky", client=polite) == 200
    assert h.breaker_state("/flaky") == CLOSED
    assert h.calls["/flaky"] == 2


async def test_client_disconnect_is_never_a_breaker_failure(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    # The client is gone before the app reads the body: Starlette raises ClientDisconnect.
    await h.request("/body", method="POST", disconnect=True)
    assert h.calls["/body"] == 1
    assert h.contexts[-1].outcome == "disconnected"
    assert h.contexts[-1].client_disconnected
    assert h.breaker_state("/body") == CLOSED
    assert await h.status("/body", method="POST", body=b"hi") == 200


async def test_disconnect_mid_stream_is_never_a_breaker_failure(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    status, _, body = await h.request("/stream", disconnect=True)
    assert status == 200
    assert len(body) < len(b"".join(f"{i}\n".encode() for i in range(100)))  # cut short
    assert h.contexts[-1].outcome == "disconnected"
    assert h.breaker_state("/stream") == CLOSED
    status, _, body = await h.request("/stream")
    assert status == 200
    assert body == b"".join(f"{i}\n".encode() for i in range(100))


async def test_cancelled_request_is_never_a_breaker_failure(clock: FakeClock) -> None:
    # Servers cancel the app's task when the client goes away.
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    task = asyncio.ensure_future(h.request("/hang"))
    await h.hanging.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.contexts[-1].outcome == "disconnected"
    assert h.breaker_state("/hang") == CLOSED


async def test_limiter_429_is_not_a_failure_even_if_429_is_a_failure_status(
    clock: FakeClock,
) -> None:
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=1, failure_statuses=(429, 500)),
        rate_limits=(RateLimit(name="l", rate="1/h", burst=1),),
    )
    h = Harness(policy, clock)
    assert await h.status() == 200
    for _ in range(5):
        assert await h.status() == 429
    assert h.breaker_state("/") == CLOSED
    assert await h.status(client=("198.51.100.99", 1)) == 200


async def test_app_exception_is_a_failure_and_propagates(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=2), clock)
    for _ in range(2):
        status, _, _ = await h.request("/boom")
        assert status == 500  # Starlette's error page, after the exception passed through us
        assert h.contexts[-1].outcome == "failed"
    assert h.breaker_state("/boom") == OPEN
    assert await h.status("/boom") == 503
    assert h.calls["/boom"] == 2


@pytest.mark.parametrize("code", [500, 502, 503, 504, 599])
async def test_5xx_is_a_failure(clock: FakeClock, code: int) -> None:
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    assert await h.status(f"/status/{code}") == code
    assert h.contexts[-1].outcome == "failed"
    assert h.breaker_state("/status/{code}") == OPEN


@pytest.mark.parametrize("code", [200, 201, 302, 400, 404, 429])
async def test_other_statuses_are_successes(clock: FakeClock, code: int) -> None:
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    for _ in range(3):
        assert await h.status(f"/status/{code}") == code
    assert h.breaker_state("/status/{code}") == CLOSED
    assert h.contexts[-1].outcome == "served"


async def test_app_429_is_not_a_failure(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=1, min_calls=1, failure_ratio=0.01), clock)
    for _ in range(10):
        status, headers, _ = await h.request("/status/429")
        assert status == 429
        assert b"retry-after" not in headers  # the app's own 429, untouched
    assert h.breaker_state("/status/{code}") == CLOSED
    assert h.store.breakers["route:/status/{code}"].totals(clock.monotonic()) == (10, 0, 0)


async def test_failure_statuses_are_configurable(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=1, failure_statuses=(503, 429)), clock)
    assert await h.status("/status/500") == 500
    assert h.breaker_state("/status/{code}") == CLOSED
    assert await h.status("/status/429") == 429
    assert h.breaker_state("/status/{code}") == OPEN
    assert await h.status("/status/500") == 503


@pytest.mark.parametrize("kind", ["timeout", "refused"])
async def test_app_oserror_is_a_failure(clock: FakeClock, kind: str) -> None:
    h = Harness(breaker_policy(consecutive_failures=1), clock)
    status, _, _ = await h.request(f"/raise?exc={kind}")
    assert status == 500
    assert h.contexts[-1].outcome == "failed"
    assert h.breaker_state("/raise") == OPEN


async def test_slow_failure_opens_the_breaker_from_when_it_failed(clock: FakeClock) -> None:
    h = Harness(breaker_policy(consecutive_failures=1, open_s=5), clock)
    assert await h.status("/slow?s=10&code=500") == 500  # fails after 10 s
    assert h.breaker_state("/slow") == OPEN
    assert await h.status("/slow?s=0&code=200") == 503  # open for 5 s from the failure


# ---------------------------------------------------------------- malformed headers


JUNK = [
    b"",
    b"-1",
    b"nan",
    b"inf",
    b"1e999",
    b"\xff\xfe\xfd",
    "\u00e9".encode("latin-1"),
    b"9" * 5000,
    b"for=;;;,,,",
    b'for="[::1',
    b"unknown, , ,",
    b"1.2.3.4:99999",
    b"\x00\x01",
]


@pytest.mark.parametrize("value", JUNK)
@pytest.mark.parametrize(
    "name",
    [b"x-request-timeout-ms", b"grpc-timeout", b"x-forwarded-for", b"forwarded", b"x-api-key"],
)
async def test_malformed_headers_never_cause_a_500(
    clock: FakeClock, name: bytes, value: bytes
) -> None:
    policy = Policy(
        trusted_proxies=("192.0.2.0/24",),
        rate_limits=(
            RateLimit(name="ip", rate="1000/s", key="client_ip"),
            RateLimit(name="api", rate="1000/s", key="header:X-Api-Key"),
        ),
    )
    h = Harness(policy, clock)
    status = await h.status(headers=[(name, value), (name, value)])
    assert status == 200
    assert h.calls["/"] == 1


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b"x-request-timeout-ms",
                    b"grpc-timeout",
                    b"x-forwarded-for",
                    b"forwarded",
                    b"x-api-key",
                    b"x-fidelity-attempt",
                ]
            ),
            st.binary(max_size=40),
        ),
        max_size=6,
    )
)
def test_arbitrary_header_bytes_never_cause_a_500(headers: list[tuple[bytes, bytes]]) -> None:
    clock = FakeClock()
    policy = Policy(
        trusted_proxies=("192.0.2.0/24",),
        rate_limits=(
            RateLimit(name="ip", rate="1000/s", key="client_ip"),
            RateLimit(name="api", rate="1000/s", key="header:X-Api-Key"),
        ),
    )
    h = Harness(policy, clock)
    status = asyncio.run(h.status(headers=headers))
    assert status in (200, 504)
    ctx = h.contexts[-1]
    if status == 504:  # only a well-formed zero deadline expires a request
        assert ctx.decided_by == "deadline"
        assert h.calls["/"] == 0
    else:
        assert h.calls["/"] == 1
        assert ctx.client_key  # some key was found, whatever the headers said


# ---------------------------------------------------------------- keys


def one_limit(key: Any, **policy: Any) -> Policy:
    return limits(RateLimit(name="l", rate="1/h", burst=1, key=key), **policy)


async def test_key_client_ip(clock: FakeClock) -> None:
    h = Harness(one_limit("client_ip"), clock)
    a, b = ("198.51.100.1", 1), ("198.51.100.2", 1)
    assert await h.status(client=a) == 200
    assert await h.status(client=(a[0], 9999)) == 429  # the port does not matter
    assert await h.status(client=b) == 200
    assert h.contexts[-1].client_key == "198.51.100.2"


async def test_key_client_ip_behind_trusted_proxies(clock: FakeClock) -> None:
    h = Harness(one_limit("client_ip", trusted_proxies=("10.0.0.0/8",)), clock)
    proxy = ("10.0.0.2", 1)
    xff = b"x-forwarded-for"
    assert await h.status(client=proxy, headers=[(xff, b"203.0.113.1")]) == 200
    assert await h.status(client=proxy, headers=[(xff, b"203.0.113.2")]) == 200
    assert h.contexts[-1].client_key == "203.0.113.2"
    assert await h.status(client=proxy, headers=[(xff, b"203.0.113.1")]) == 429
    fwd = b"forwarded"
    assert await h.status(client=proxy, headers=[(fwd, b"for=203.0.113.3")]) == 200
    # A direct (untrusted) client cannot pick its key with the header.
    direct = ("203.0.113.9", 1)
    assert await h.status(client=direct, headers=[(xff, b"203.0.113.50")]) == 200
    assert await h.status(client=direct, headers=[(xff, b"203.0.113.51")]) == 429
    assert h.contexts[-1].client_key == "203.0.113.9"


async def test_forwarding_headers_ignored_without_trusted_proxies(clock: FakeClock) -> None:
    h = Harness(one_limit("client_ip"), clock)
    client = ("10.0.0.2", 1)
    assert await h.status(client=client, headers=[(b"x-forwarded-for", b"203.0.113.1")]) == 200
    assert await h.status(client=client, headers=[(b"x-forwarded-for", b"203.0.113.2")]) == 429


async def test_key_header(clock: FakeClock) -> None:
    h = Harness(one_limit("header:X-Api-Key"), clock)
    ip = ("198.51.100.1", 1)
    assert await h.status(client=ip, headers=[(b"x-api-key", b"alpha")]) == 200
    assert await h.status(client=ip, headers=[(b"x-api-key", b"beta")]) == 200
    assert await h.status(client=ip, headers=[(b"x-api-key", b"alpha")]) == 429
    assert await h.status(client=("198.51.100.7", 1), headers=[(b"x-api-key", b"alpha")]) == 429


async def test_key_header_missing_falls_back_to_ip(clock: FakeClock) -> None:
    h = Harness(one_limit("header:X-Api-Key"), clock)
    assert await h.status(client=("198.51.100.1", 1)) == 200
    assert await h.status(client=("198.51.100.1", 1)) == 429
    assert await h.status(client=("198.51.100.2", 1)) == 200
    assert h.contexts[-1].client_key == "198.51.100.2"
    # An empty header is missing too.
    assert await h.status(client=("198.51.100.3", 1), headers=[(b"x-api-key", b"")]) == 200


async def test_key_header_huge_value_is_compacted(clock: FakeClock) -> None:
    h = Harness(one_limit("header:X-Api-Key"), clock)
    huge = b"k" * 10_000
    assert await h.status(headers=[(b"x-api-key", huge)]) == 200
    assert await h.status(headers=[(b"x-api-key", huge)]) == 429
    assert all(len(key) < 200 for key in h.store.limits.tats)


async def test_key_route(clock: FakeClock) -> None:
    h = Harness(one_limit("route"), clock)
    assert await h.status("/items/1", client=("198.51.100.1", 1)) == 200
    assert await h.status("/items/2", client=("198.51.100.2", 1)) == 429  # same route
    assert await h.status("/other", client=("198.51.100.1", 1)) == 200


async def test_key_global(clock: FakeClock) -> None:
    h = Harness(one_limit("global"), clock)
    assert await h.status("/items/1", client=("198.51.100.1", 1)) == 200
    assert await h.status("/other", client=("198.51.100.2", 1)) == 429


async def test_key_callable(clock: FakeClock) -> None:
    def tenant(scope: Mapping[str, Any]) -> str | None:
        for name, value in scope["headers"]:
            if name == b"x-tenant":
                return value.decode()
        return None

    h = Harness(one_limit(tenant), clock)
    assert await h.status(client=("198.51.100.1", 1), headers=[(b"x-tenant", b"t1")]) == 200
    assert await h.status(client=("198.51.100.2", 1), headers=[(b"x-tenant", b"t1")]) == 429
    assert await h.status(client=("198.51.100.2", 1), headers=[(b"x-tenant", b"t2")]) == 200
    # None: fall back to the client address.
    assert await h.status(client=("198.51.100.1", 1)) == 200
    assert await h.status(client=("198.51.100.1", 1)) == 429


async def test_key_callable_that_raises_falls_back_to_ip(clock: FakeClock) -> None:
    def broken(scope: Mapping[str, Any]) -> str:
        raise KeyError("oops")

    h = Harness(one_limit(broken), clock)
    assert await h.status(client=("198.51.100.1", 1)) == 200
    assert await h.status(client=("198.51.100.1", 1)) == 429
    assert await h.status(client=("198.51.100.2", 1)) == 200


async def test_limit_match_and_methods(clock: FakeClock) -> None:
    policy = limits(
        RateLimit(name="items", rate="1/h", burst=1, match="/items/*"),
        RateLimit(name="posts", rate="1/h", burst=1, match="/", methods=("POST",)),
    )
    h = Harness(policy, clock)
    assert await h.status("/items/1") == 200
    assert await h.status("/items/2") == 429
    assert await h.status("/other") == 200
    assert await h.status("/other") == 200
    assert await h.status("/", method="POST") == 200
    assert await h.status("/", method="POST") == 429
    assert await h.status("/") == 200


async def test_no_client_address(clock: FakeClock) -> None:
    h = Harness(one_limit("client_ip"), clock)
    assert await h.status(client=None) == 200
    assert await h.status(client=None) == 429


# ---------------------------------------------------------------- misc


async def test_custom_store_is_used(clock: FakeClock) -> None:
    store = MemoryStore(rng=seeded_random(1))
    h = Harness(one_limit("client_ip"), clock, store=store)
    await h.request()
    assert h.store is store
    assert len(store.limits.tats) == 1


def test_harness_covers_the_routes() -> None:
    # Guard against a typo making a route 404 (and the tests above vacuous).
    h = Harness(NO_BREAKER, FakeClock())
    assert "/flaky" in [getattr(r, "path", None) for r in h.app.routes]
    assert asyncio.run(h.status("/flaky")) == 200
    assert asyncio.run(h.status("/nope")) == 404


# ---------------------------------------------------------------- review fixes


async def test_shadow_limits_are_not_advertised(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None,
        rate_limits=(
            RateLimit(name="enforced", rate="10/s"),
            RateLimit(name="trial", rate="1/s", shadow=True),
        ),
    )
    h = Harness(policy, clock)
    for _ in range(3):  # the shadow limit is exceeded, the enforced one is not
        status, headers, _ = await h.request()
        assert status == 200
        assert b"trial" not in headers[b"ratelimit-policy"]
        assert b"trial" not in headers[b"ratelimit"]
        assert headers[b"ratelimit"].startswith(b'"enforced";r=')
    assert [d.verdict for d in h.contexts[-1].decisions if d.subject == "trial"] == ["would_reject"]


async def test_only_shadow_limits_send_no_ratelimit_fields(clock: FakeClock) -> None:
    h = Harness(Policy(breaker=None, rate_limits=(RateLimit(rate="1/s", shadow=True),)), clock)
    status, headers, _ = await h.request()
    assert status == 200
    assert b"ratelimit" not in headers
    assert b"ratelimit-policy" not in headers


async def test_ipv4_mapped_peer_is_a_trusted_proxy(clock: FakeClock) -> None:
    policy = Policy(
        breaker=None,
        trusted_proxies=("10.0.0.0/8",),
        rate_limits=(RateLimit(name="ip", rate="1/s"),),
    )
    h = Harness(policy, clock)
    forwarded = [(b"x-forwarded-for", b"203.0.113.9")]
    assert (await h.request(headers=forwarded, client=("::ffff:10.0.0.2", 1)))[0] == 200
    assert h.contexts[-1].client_key == "203.0.113.9"


async def test_wrapping_the_app_directly_still_names_routes(clock: FakeClock) -> None:
    async def item(request: Request) -> Response:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/items/{item_id}", item)])
    app = FidelityMiddleware(inner, policy=Policy(), clock=clock, telemetry=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for item_id in (1, 2):
            response = await client.get(f"/items/{item_id}")
            assert response.status_code == 200
    store = app.engine.store
    assert isinstance(store, MemoryStore)
    assert sorted(store.breakers) == ["route:/items/{item_id}"]


# ------------------------------------------------ names that slipped past validation


def _renamed(policy: Policy, *names: str) -> Policy:
    """Give the policy's limits names validation would refuse (a policy object built
    around validation, or an older validator): the runtime must still enforce them."""
    for lim, name in zip(policy.rate_limits, names, strict=True):
        object.__setattr__(lim, "name", name)
    return policy


async def test_a_limit_name_outside_latin1_still_limits(clock: FakeClock) -> None:
    """Issue 12 #2: such a name made plan building raise, and the request went through
    with no limit and no breaker at all."""
    policy = _renamed(limits(RateLimit(name="x", rate="1/min", burst=1)), "per-client — v2")
    h = Harness(policy, clock)
    status, headers, _ = await h.request()
    assert status == 200
    assert headers[b"ratelimit-policy"] == b'"per-client ? v2";q=1;w=60'
    assert LIMIT_FIELD.match(headers[b"ratelimit"].decode())
    status, headers, body = await h.request()
    assert status == 429
    assert problem(body)["limit"] == "per-client — v2"
    assert h.calls["/"] == 1


async def test_quotes_and_backslashes_in_a_limit_name_are_escaped(clock: FakeClock) -> None:
    policy = _renamed(limits(RateLimit(name="x", rate="1/min", burst=2)), 'a"b\\c')
    h = Harness(policy, clock)
    _, headers, _ = await h.request()
    assert headers[b"ratelimit-policy"] == b'"a\\"b\\\\c";q=2;w=120'
    assert headers[b"ratelimit"].startswith(b'"a\\"b\\\\c";r=1;')


# ---------------------------------------------------------------- when a call ends


def _slow_policy() -> Policy:
    return Policy(
        breaker=BreakerConfig(
            min_calls=3, slow_call_ms=1000, slow_call_ratio=0.5, open_s=10, open_jitter=0.0
        )
    )


async def _drive(app: Any, scope: dict[str, Any]) -> list[Mapping[str, Any]]:
    sent: list[Mapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def _scope(path: str = "/", **extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = http_scope(path, client=("192.0.2.1", 5000))
    scope.update(extra)
    return scope


async def test_slow_call_time_ends_at_the_last_body_message(clock: FakeClock) -> None:
    """Issue 12 #13: a slow background task after an instant response is not a slow call."""
    from starlette.background import BackgroundTask

    def slow_task() -> None:
        clock.advance(5.0)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok", background=BackgroundTask(slow_task))

    app = Starlette(routes=[Route("/", endpoint)])
    mw = FidelityMiddleware(app, policy=_slow_policy(), clock=clock, telemetry=False)
    for _ in range(6):
        sent = await _drive(mw, _scope())
        assert sent[0]["status"] == 200
    store = mw.engine.store
    assert isinstance(store, MemoryStore)
    assert store.breakers["route:/"].state == CLOSED


async def test_a_slow_response_is_still_a_slow_call(clock: FakeClock) -> None:
    async def endpoint(request: Request) -> Response:
        clock.advance(5.0)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", endpoint)])
    mw = FidelityMiddleware(app, policy=_slow_policy(), clock=clock, telemetry=False)
    for _ in range(3):
        await _drive(mw, _scope())
    sent = await _drive(mw, _scope())
    assert sent[0]["status"] == 503


@pytest.mark.parametrize(
    "final",
    [
        {"type": "http.response.pathsend", "path": "/dev/null"},
        {"type": "http.response.zerocopysend", "file": 0},
    ],
    ids=["pathsend", "zerocopysend"],
)
async def test_file_send_extensions_end_the_response(
    clock: FakeClock, final: dict[str, Any]
) -> None:
    """Issue 12 #14: a response ending in pathsend / zerocopysend is complete, not a
    client disconnect: its probes close a half-open breaker."""
    fail = True

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500 if fail else 200})
        if fail:
            await send({"type": "http.response.body", "body": b""})
        else:
            await send(dict(final))

    mw = FidelityMiddleware(app, policy=breaker_policy(), clock=clock, telemetry=False)
    for _ in range(2):
        await _drive(mw, _scope())
    store = mw.engine.store
    assert isinstance(store, MemoryStore)
    assert store.breakers["route:!unmatched"].state == OPEN
    fail = False
    clock.advance(10.0)
    scope = _scope()
    sent = await _drive(mw, scope)
    assert sent[-1]["type"] == final["type"]
    ctx = context_from_scope(scope)
    assert ctx is not None
    assert (ctx.outcome, ctx.client_disconnected) == ("served", False)
    assert store.breakers["route:!unmatched"].state == CLOSED


async def test_a_scope_without_headers_has_no_headers(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 12 #21: the key is optional; its absence used to skip every layer with an
    ERROR traceback."""
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    policy = limits(RateLimit(name="l", rate="1/min", burst=1))
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)
    statuses = []
    for _ in range(2):
        scope = _scope()
        del scope["headers"]
        statuses.append((await _drive(mw, scope))[0]["status"])
    assert statuses == [200, 429]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_route_naming_never_calls_the_apps_matches(clock: FakeClock) -> None:
    """Issue 12 #19: the app's own `Route.matches()` runs once per request (its router's
    call), not once more for naming."""
    calls: Counter[str] = Counter()

    class CountingRoute(Route):
        def matches(self, scope: Any) -> Any:
            calls[self.path] += 1
            return super().matches(scope)

    async def endpoint(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[CountingRoute("/a", endpoint), CountingRoute("/items/{item_id}", endpoint)]
    )
    app.add_middleware(FidelityMiddleware, policy=NO_BREAKER, clock=clock, telemetry=False)
    scope = _scope("/items/7")
    assert (await _drive(app, scope))[0]["status"] == 200
    assert calls == {"/a": 1, "/items/{item_id}": 1}
    ctx = context_from_scope(scope)
    assert ctx is not None
    assert ctx.route == "/items/{item_id}"
    scope = _scope("/a", method="POST")  # method not allowed: still the route's breaker
    assert (await _drive(app, scope))[0]["status"] == 405
    ctx = context_from_scope(scope)
    assert ctx is not None
    assert ctx.route == "/a"
