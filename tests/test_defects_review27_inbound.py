"""Defects a twenty-seventh review (inbound, policy, headers) found.

1. A rate's count and period had no upper bound: `rate = "99999999999999999999999/s"` or
   `"1/99999999999999999999s"` loaded, and the responses carried `RateLimit-Policy` /
   `RateLimit` members no Structured Field parser accepts (sf-integers have at most 15
   digits, RFC 9651), a float-garbled `r`, a bucket (the default burst, the rate's
   count) past the 1_000_000_000 an explicit `burst` is held to, and a `t` on the
   allowed path past the year the 429's `Retry-After` is capped at. The count is now
   held to 1 .. 1_000_000_000 (as `burst`) and the period to at most 365 days, and the
   error names the field.
2. The middleware's own 503 answers passed a wait of 0 through as `Retry-After: 0`: a
   `CircuitOpen` the app let out with `retry_after_s=0` (an exception of the public
   API), or a store's rejecting breaker gate whose wait was 0 (the Redis script clamps
   a half-open wait to 0). `Retry-After: 0` tells every caller to come back at once, to
   a breaker that is refusing; our refusals now say at least 1.
3. Our fields were added to the app's own start message: an app that sends one start
   message it keeps (a raw ASGI app's module constant, a cached dict) had the
   `RateLimit` fields of every request it served appended to it, so each response
   carried those of all the requests before it (stale `r` values first, a header block
   growing without bound until the server or the client refuses it). The app's message
   is no longer changed: ours is a copy with the fields added.
4. The same with an `on_reject` hook that returns a response it keeps (a module-level
   `JSONResponse` for every refusal): our `Retry-After`, `RateLimit` fields and
   `x-fidelity-decided-by` were appended to that response the first time, and being
   there, never set again: every later refusal said the first one's `Retry-After` (a
   client told to wait 7 s where 1 s was left) and the first one's deciding layer (a
   breaker's 503 marked `ratelimit`). Likewise `Fidelity(on_reject=...)` for the
   FastAPI forms. The hook's response is left as it was; a copy carries our fields.
5. A server on a unix socket (uvicorn `--uds`, gunicorn `--bind unix:`, the usual setup
   behind nginx) gives requests no client address (`scope["client"]` is None): every
   `client_ip` limit then counted all clients as one, `"unknown"`, so one client's
   quota throttled the whole service, without a word. The middleware now says so once
   (a warning naming the way out: key by a header the proxy sets), and the docs too.
6. Bulkhead settings that can never act loaded without a word from `fidelity-mw check`:
   a route's `concurrency = true` ("the policy's [concurrency]") with no `[concurrency]`
   table (the route has no bulkhead), a route's `priority` on a route without a
   bulkhead, `priority_header` with no bulkhead anywhere or with `trusted_peers = []`
   (the header is believed from trusted peers only). Each is now a warning naming it.
7. A key or cost function that cannot be called with one argument (`def key(scope,
   request)`, a method of the wrong arity) loaded; every request then failed in it:
   a key function's failure counted the request by its address (a traceback logged per
   interval), a cost function's charged the burst (one request took the whole bucket).
   It is now a policy error naming the field and the signature.
8. Under an event loop that is not asyncio's (Starlette and FastAPI run on trio, e.g.
   hypercorn's trio worker) every request failed with "no running event loop" (a 500
   of ours, from the deadline's timer), and the server started as if all were well.
   The middleware needs asyncio: the lifespan startup now fails saying so, and a
   request that gets that far fails naming the cause.
9. (2. for the FastAPI forms) `fidelity.route_class`'s breaker answered a rejecting gate
   with no wait `Retry-After: 0`, as the middleware did.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.responses import JSONResponse, Response

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy, PolicyError, RateLimit
from fidelity_mw.decide.breaker import Gate
from fidelity_mw.errors import CircuitOpen
from fidelity_mw.policy import BreakerConfig, ConcurrencyConfig
from fidelity_mw.state.base import InboundResult, LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.check import check_file

Message = dict[str, Any]


def _scope(
    path: str = "/api/x",
    headers: Sequence[tuple[bytes, bytes]] = (),
    client: tuple[str, int] | None = ("203.0.113.7", 4711),
) -> dict[str, Any]:
    return http_scope(path, headers=list(headers), client=client, server=("t", 80))


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _call(mw: Any, scope: dict[str, Any] | None = None) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(mw(scope or _scope(), receive, send))
    return sent


def _headers(start: Message) -> dict[bytes, bytes]:
    return dict(start["headers"])


# RFC 9651 sf-integer: at most 15 digits
_SF_INT = re.compile(rb"-?[0-9]{1,15}")


def _sf_params(field: bytes) -> dict[bytes, bytes]:
    params = {}
    for member in field.split(b","):
        for part in member.strip().split(b";")[1:]:
            key, _, value = part.partition(b"=")
            params[key] = value
    return params


# ------------------------------------------- 1. a rate's count and period unbounded


@pytest.mark.parametrize(
    ("rate", "problem"),
    [
        ("99999999999999999999999/s", "1000000000"),
        ("1000000001/s", "1000000000"),
        ("1/99999999999999999999s", "365 d"),
        ("1/366d", "365 d"),
        ("1/8785h", "365 d"),
    ],
)
def test_a_rate_past_what_the_fields_can_say_is_an_error_naming_it(rate: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit": [{"name": "a", "rate": rate}]})
    issues = {issue.path: issue.message for issue in caught.value.issues}
    assert list(issues) == ["rate_limit[0].rate"]
    assert problem in issues["rate_limit[0].rate"]


@pytest.mark.parametrize("rate", ["1000000000/s", "1/365d", "5/10min", "1/8760h"])
def test_the_largest_rates_still_load_and_advertise_sf_integers(rate: str) -> None:
    policy = Policy(rate_limits=[RateLimit(name="a", rate=rate)])
    mw = FidelityMiddleware(_ok, policy=policy, clock=FakeClock(), telemetry=False)
    for _ in range(2):
        headers = _headers(_call(mw)[0])
        for name in (b"ratelimit-policy", b"ratelimit"):
            for value in _sf_params(headers[name]).values():
                assert _SF_INT.fullmatch(value), (name, headers[name])


# ------------------------------------------- 2. Retry-After: 0 on our own 503s


def _problem(sent: list[Message]) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    start, body = sent[0], sent[1]
    return start["status"], _headers(start), json.loads(body["body"])


@pytest.mark.parametrize("wait", [0.0, -1.0, float("nan")])
def test_a_circuit_open_let_out_with_no_wait_is_answered_retry_after_at_least_1(
    wait: float,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise CircuitOpen("open", host="payments.internal", retry_after_s=wait)

    mw = FidelityMiddleware(app, policy=Policy(), clock=FakeClock(), telemetry=False)
    status, headers, body = _problem(_call(mw))
    assert status == 503
    assert headers[b"retry-after"] == b"1"
    assert body["type"] == "urn:fidelity-mw:problem:upstream-circuit-open"
    assert "retry in 1 s" in body["detail"]


class _HalfOpenStore(MemoryStore):
    """A store whose breaker refuses with the wait the Redis script may give: 0."""

    admit_now = None  # type: ignore[assignment]

    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
        return InboundResult(Gate("reject", "half_open", 3, 0.0), (), False, "redis", 0.0)


def test_a_breaker_gate_refusing_with_no_wait_is_answered_retry_after_at_least_1() -> None:
    policy = Policy(breaker=BreakerConfig())
    mw = FidelityMiddleware(_ok, policy=policy, store=_HalfOpenStore(), telemetry=False)
    status, headers, body = _problem(_call(mw))
    assert status == 503
    assert headers[b"retry-after"] == b"1"
    assert body["type"] == "urn:fidelity-mw:problem:circuit-open"
    assert body["detail"].endswith("retry in 1 s")


# ------------------------------------------- 3. the app's start message left as it was


def test_a_start_message_the_app_keeps_is_not_changed_and_fields_do_not_pile_up() -> None:
    app_headers = [(b"content-type", b"text/plain")]
    start = {"type": "http.response.start", "status": 200, "headers": app_headers}
    body = {"type": "http.response.body", "body": b"ok"}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start)  # the same dict for every request
        await send(body)

    policy = Policy(rate_limits=[RateLimit(name="a", rate="100/s")])
    mw = FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)
    for remaining in (99, 98, 97):
        sent = _call(mw)[0]["headers"]
        assert sent == [
            (b"content-type", b"text/plain"),
            (b"ratelimit-policy", b'"a";q=100;w=1'),
            (b"ratelimit", b'"a";r=%d;t=1' % remaining),
        ]
    assert start == {"type": "http.response.start", "status": 200, "headers": app_headers}
    assert app_headers == [(b"content-type", b"text/plain")]


# ------------------------------------------- 4. an on_reject response the hook keeps


def test_an_on_reject_response_the_hook_keeps_gets_each_refusals_own_fields() -> None:
    kept = JSONResponse({"error": "slow down"}, status_code=429)
    kept_headers = list(kept.raw_headers)

    def on_reject(ctx: Any, decision: Any) -> Response:
        return kept  # the same object for every refusal

    clock = FakeClock()
    policy = Policy(rate_limits=[RateLimit(name="a", rate="1/10s")])
    mw = FidelityMiddleware(_ok, policy=policy, clock=clock, telemetry=False, on_reject=on_reject)
    assert _call(mw)[0]["status"] == 200
    waits = []
    for _ in range(3):
        clock.advance(3.0)
        start = _call(mw)[0]
        assert start["status"] == 429
        headers = start["headers"]
        assert [name for name, _ in headers].count(b"retry-after") == 1
        waits.append((_headers(start)[b"retry-after"], _headers(start)[b"ratelimit"]))
    assert waits == [
        (b"7", b'"a";r=0;t=7'),
        (b"4", b'"a";r=0;t=4'),
        (b"1", b'"a";r=0;t=1'),
    ]
    assert kept.raw_headers == kept_headers


@pytest.mark.anyio
async def test_a_kept_on_reject_response_of_the_fastapi_forms_gets_each_refusals_fields() -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    kept = JSONResponse({"error": "slow down"}, status_code=429)
    kept_headers = list(kept.raw_headers)
    clock = FakeClock()
    fidelity = Fidelity(
        policy=Policy(breaker=None), clock=clock, on_reject=lambda ctx, decision: kept
    )
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("1/10s", name="x"))])
    async def x() -> dict[str, str]:
        return {"ok": "yes"}

    fidelity.install(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        assert (await c.get("/x")).status_code == 200
        waits = []
        for _ in range(2):
            clock.advance(3.0)
            rejected = await c.get("/x")
            assert rejected.status_code == 429
            waits.append(rejected.headers.get_list("retry-after"))
    assert waits == [["7"], ["4"]]
    assert kept.raw_headers == kept_headers


# ------------------------------------------- the bulkhead's count under cancellations
# (no defect found: the invariants, held through the middleware under random arrivals,
# completions and cancellations of running and queued requests, deterministically)

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(["critical", "default", "sheddable"])),
        st.tuples(st.just("finish"), st.integers(0, 15)),
        st.tuples(st.just("cancel"), st.integers(0, 15)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, adaptive=st.booleans())
def test_the_bulkhead_count_holds_under_random_cancellations(
    ops: list[tuple[str, Any]], adaptive: bool
) -> None:
    asyncio.run(_bulkhead_run(ops, adaptive))


async def _bulkhead_run(ops: list[tuple[str, Any]], adaptive: bool) -> None:
    gates: dict[int, asyncio.Event] = {}
    running: set[int] = set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        i = int(scope["path"][1:])
        running.add(i)
        try:
            await gates.setdefault(i, asyncio.Event()).wait()
        finally:
            running.discard(i)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        concurrency=ConcurrencyConfig(
            limit=3, adaptive=adaptive, max_queue=2, queue_timeout_ms=60_000
        ),
        priority_header="x-priority",
        trusted_peers=["203.0.113.0/24"],
    )
    # a fake clock that never moves: no deadline, queue timeout or window passes
    mw = FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)
    tasks: list[asyncio.Task[list[Message]]] = []
    answers: dict[int, list[int]] = {}

    async def request(i: int, priority: str) -> list[Message]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)
            if message["type"] == "http.response.start":
                answers.setdefault(i, []).append(message["status"])

        scope = _scope(f"/{i}", [(b"x-priority", priority.encode())])
        await mw(scope, receive, send)
        return sent

    async def settle() -> None:
        for _ in range(30):
            await asyncio.sleep(0)

    def check() -> None:
        limiter = next(iter(mw.engine.bulkheads.values()), None)
        if limiter is None:
            return
        assert limiter.in_flight == len(running)
        assert adaptive or limiter.in_flight <= 3
        queued = sum(1 for i, t in enumerate(tasks) if not t.done() and i not in running)
        assert limiter.waiting == queued <= 2

    for op, arg in ops:
        if op == "arrive":
            tasks.append(asyncio.create_task(request(len(tasks), arg)))
        elif op == "finish" and arg < len(tasks):
            gates.setdefault(arg, asyncio.Event()).set()
        elif op == "cancel" and arg < len(tasks):
            tasks[arg].cancel()
        await settle()
        check()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await settle()
    check()
    assert not running
    for statuses in answers.values():
        assert statuses in ([200], [503])  # one answer each, never a 500


# ------------------------------------------- 5. no client address (a unix socket)


@pytest.mark.parametrize("trusted_proxies", [[], ["10.0.0.0/8"]])
def test_requests_without_a_client_address_are_said_once_to_share_one_key(
    caplog: pytest.LogCaptureFixture, trusted_proxies: list[str]
) -> None:
    policy = Policy(
        rate_limits=[RateLimit(name="per-client", rate="100/s")], trusted_proxies=trusted_proxies
    )
    mw = FidelityMiddleware(_ok, policy=policy, clock=FakeClock(), telemetry=False)
    caplog.set_level(logging.WARNING, logger="fidelity_mw")
    _call(mw, _scope(client=("203.0.113.7", 4711)))
    assert not [r for r in caplog.records if "client address" in r.getMessage()]
    for _ in range(3):
        start = _call(mw, _scope(client=None))[0]
        assert start["status"] == 200
    said = [r for r in caplog.records if "client address" in r.getMessage()]
    assert len(said) == 1
    message = said[0].getMessage()
    assert "per-client" in message
    assert "unix socket" in message
    assert "header:" in message  # the way out
    # the fields say it: one bucket for all of them
    assert _headers(start)[b"ratelimit"] == b'"per-client";r=97;t=1'


def test_a_route_without_client_ip_limits_says_nothing_of_the_client_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = Policy(rate_limits=[RateLimit(name="all", rate="100/s", key="global")])
    mw = FidelityMiddleware(_ok, policy=policy, clock=FakeClock(), telemetry=False)
    caplog.set_level(logging.WARNING, logger="fidelity_mw")
    _call(mw, _scope(client=None))
    assert not [r for r in caplog.records if "client address" in r.getMessage()]


# ------------------------------------------- 6. bulkhead settings that never act


def _warnings(tmp_path: Any, text: str) -> dict[str, str]:
    path = tmp_path / "fidelity.toml"
    path.write_text("version = 1\n" + text)
    result = check_file(path)
    assert not result.errors
    return {f.path: f"{f.line}: {f.message}" for f in result.warnings}


def test_a_routes_concurrency_true_without_a_concurrency_table_is_a_warning(
    tmp_path: Any,
) -> None:
    said = _warnings(tmp_path, '[[route]]\nmatch = "/a"\nconcurrency = true\n')
    assert list(said) == ["route[0].concurrency"]
    assert said["route[0].concurrency"].startswith("4: ")
    assert "no [concurrency]" in said["route[0].concurrency"]


def test_a_routes_priority_without_a_bulkhead_is_a_warning(tmp_path: Any) -> None:
    said = _warnings(tmp_path, '[[route]]\nmatch = "/a"\npriority = "sheddable"\n')
    assert list(said) == ["route[0].priority"]
    assert "no bulkhead" in said["route[0].priority"]
    said = _warnings(
        tmp_path,
        '[concurrency]\nlimit = 8\n[[route]]\nmatch = "/a"\npriority = "sheddable"\n'
        "concurrency = false\n",
    )
    assert list(said) == ["route[0].priority"]


def test_a_priority_header_that_can_never_be_believed_is_a_warning(tmp_path: Any) -> None:
    said = _warnings(tmp_path, 'priority_header = "x-priority"\n')
    assert list(said) == ["priority_header"]
    assert "no bulkhead" in said["priority_header"]
    said = _warnings(
        tmp_path, 'priority_header = "x-priority"\ntrusted_peers = []\n[concurrency]\n'
    )
    assert list(said) == ["priority_header"]
    assert "trusted_peers" in said["priority_header"]


def test_bulkhead_settings_that_act_are_no_warning(tmp_path: Any) -> None:
    assert not _warnings(
        tmp_path,
        'priority_header = "x-priority"\n[concurrency]\nlimit = 8\n'
        '[[route]]\nmatch = "/a"\npriority = "sheddable"\nconcurrency = true\n'
        '[[route]]\nmatch = "/b"\npriority = "critical"\n[route.concurrency]\nlimit = 2\n',
    )
    assert not _warnings(
        tmp_path,
        'priority_header = "x-priority"\n'
        '[[route]]\nmatch = "/b"\npriority = "critical"\n[route.concurrency]\nlimit = 2\n',
    )


# ------------------------------------------- 7. key and cost functions of the wrong arity


def _two(a: Any, b: Any) -> str:
    return "x"


class _Method:
    def key(self, scope: Any, extra: Any) -> str:
        return "x"


@pytest.mark.parametrize("field", ["key", "cost"])
@pytest.mark.parametrize("fn", [_two, _Method().key, lambda: 1])
def test_a_function_that_takes_no_single_argument_is_a_policy_error(field: str, fn: Any) -> None:
    with pytest.raises(PolicyError) as caught:
        RateLimit(name="a", rate="5/s", **{field: fn})
    issues = {issue.path: issue.message for issue in caught.value.issues}
    assert list(issues) == [field]
    assert "one argument" in issues[field]


def _one(scope: Any) -> int:
    return 1


def _optional(scope: Any, extra: int = 1) -> int:
    return extra


def _any(*args: Any) -> int:
    return 1


class _Callable:
    def __call__(self, scope: Any) -> int:
        return 1


@pytest.mark.parametrize("field", ["key", "cost"])
@pytest.mark.parametrize("fn", [_one, _optional, _any, _Callable(), len, lambda r: 1])
def test_functions_of_one_argument_still_load(field: str, fn: Any) -> None:
    RateLimit(name="a", rate="5/s", **{field: fn})


# ------------------------------------------- 8. an event loop that is not asyncio's


def _trio() -> Any:
    return pytest.importorskip("trio")


def test_under_trio_the_lifespan_startup_fails_saying_asyncio_is_needed() -> None:
    trio = _trio()
    sent: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    mw = FidelityMiddleware(app, policy=Policy(), telemetry=False)

    async def main() -> None:
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> Message:
            return messages.pop(0)

        async def send(message: Message) -> None:
            sent.append(message)

        await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    trio.run(main)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "asyncio" in sent[0]["message"]


def test_under_trio_a_request_fails_naming_the_cause() -> None:
    trio = _trio()
    mw = FidelityMiddleware(_ok, policy=Policy(), telemetry=False)

    async def main() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(message: Message) -> None:
            pass

        await mw(_scope(), receive, send)

    with pytest.raises(RuntimeError, match="asyncio"):
        trio.run(main)


def test_under_asyncio_the_lifespan_starts_as_before() -> None:
    sent: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    mw = FidelityMiddleware(app, policy=Policy(), telemetry=False)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert sent == [{"type": "lifespan.startup.complete"}]


# ------------------------------------------- 9. the FastAPI route class's breaker 503


@pytest.mark.anyio
async def test_the_route_class_breaker_refusing_with_no_wait_says_retry_after_1() -> None:
    from fastapi import APIRouter, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity(policy=Policy(), store=_HalfOpenStore())
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/pay")
    @fidelity.breaker(failure_ratio=0.5, min_calls=5)
    async def pay() -> dict[str, str]:
        return {"paid": "yes"}

    app = FastAPI()
    app.include_router(router)
    fidelity.install(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        response = await c.get("/pay")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"].endswith("retry in 1 s")


# ------------------------------------------- the header scan against a model
# (no defect found: `scan_headers` had no test of its own)

_NAMES = st.sampled_from([b"x-request-timeout-ms", b"grpc-timeout", b"x-api-key", b"other", b""])


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(_NAMES, st.binary(max_size=12)), max_size=12),
    wanted=st.frozensets(_NAMES),
)
def test_the_header_scan_keeps_the_wanted_lines_joined_in_order(
    headers: list[tuple[bytes, bytes]], wanted: frozenset[bytes]
) -> None:
    from fidelity_mw.inbound.request import first_header, scan_headers

    found = scan_headers(headers, wanted)
    model: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in wanted:
            model.setdefault(name, []).append(value)
    if not model:
        assert found is None
        return
    assert found == {name: b",".join(values) for name, values in model.items()}
    scope = {"headers": headers}
    for name, values in model.items():
        assert first_header(scope, name) == values[0]
