"""The outbound success path (issue 17, item 3): one gate operation and one outcome record
per attempt on in-process state, the request handed back as the caller built it, and the
same store operations in the same order from both transports, whether the first
attempt ends the call or the loop goes on after it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.errors import CircuitOpen
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

URL = "http://svc.internal/x"


class CountingStore(MemoryStore):
    """A memory store that logs every outbound operation it is asked for."""

    def __init__(self) -> None:
        super().__init__(rng=seeded_random(3))
        self.ops: list[tuple[Any, ...]] = []

    def outbound_begin_now(self, *args: Any) -> Any:
        self.ops.append(("begin", args[0], args[-1]))
        return super().outbound_begin_now(*args)

    def outbound_gate_now(self, *args: Any) -> Any:
        self.ops.append(("gate", args[0], args[-2], args[-1]))
        return super().outbound_gate_now(*args)

    def record_now(self, *args: Any) -> Any:
        self.ops.append(("record", args[0], args[3], args[-1]))
        return super().record_now(*args)


def make_engine(breaker: BreakerConfig | None = None) -> tuple[Engine, CountingStore, FakeClock]:
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
                breaker=breaker or BreakerConfig(),
            ),
        )
    )
    store, clock = CountingStore(), FakeClock()
    return Engine(policy, clock=clock, store=store), store, clock


def answers(clock: FakeClock, *statuses: int) -> Any:
    """The upstream: these statuses in order (then the last), each taking 5 ms."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(int(request.headers["x-fidelity-attempt"]))
        clock.advance(0.005)
        return httpx.Response(statuses[min(len(calls), len(statuses)) - 1])

    return handler, calls


def call_async(engine: Engine, handler: Any, request: httpx.Request) -> httpx.Response:
    transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    return asyncio.run(transport.handle_async_request(request))


def call_sync(engine: Engine, handler: Any, request: httpx.Request) -> httpx.Response:
    transport = FidelitySyncTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    return transport.handle_request(request)


CALLS = [call_async, call_sync]


@pytest.mark.parametrize("call", CALLS)
def test_a_successful_call_is_one_gate_and_one_record_at_its_end(call: Any) -> None:
    engine, store, clock = make_engine()
    handler, sent = answers(clock, 200)
    request = httpx.Request("GET", URL, headers={"accept": "text/plain"})
    before = list(request.headers.raw)
    start = clock.monotonic()
    response = call(engine, handler, request)
    assert response.status_code == 200
    assert sent == [1]
    key = "upstream:svc.internal"
    # the gate at the start, the record when the response came back (5 ms later)
    assert store.ops == [("begin", key, start), ("record", key, "success", start + 0.005)]
    assert list(request.headers.raw) == before  # our stamps are off again
    ctx = response.extensions["fidelity_context"]
    assert [(d.layer, d.verdict, d.reason) for d in ctx.decisions] == [
        ("retry", "allow", "attempt")
    ]
    assert ctx.attempts == {"svc.internal": 1}


@pytest.mark.parametrize("call", CALLS)
def test_a_retried_call_gates_and_records_every_attempt_once(call: Any) -> None:
    engine, store, clock = make_engine()
    handler, sent = answers(clock, 503, 200)
    response = call(engine, handler, httpx.Request("GET", URL))
    assert response.status_code == 200
    assert sent == [1, 2]
    kinds = [op[0] for op in store.ops]
    assert kinds == ["begin", "record", "gate", "record"]
    assert [op[2] for op in store.ops if op[0] == "record"] == ["failure", "success"]
    ctx = response.extensions["fidelity_context"]
    assert [d.verdict for d in ctx.decisions if d.layer == "retry"] == ["allow", "retry"]


@pytest.mark.parametrize("call", CALLS)
def test_a_non_retryable_failure_ends_the_call_with_one_record(call: Any) -> None:
    engine, store, clock = make_engine()
    handler, sent = answers(clock, 404)
    request = httpx.Request("POST", URL, content=b"x")  # not idempotent either
    assert call(engine, handler, request).status_code == 404
    assert sent == [1]
    assert [op[0] for op in store.ops] == ["begin", "record"]


@pytest.mark.parametrize("call", CALLS)
def test_a_probe_first_attempt_is_recorded_and_closes_the_breaker(call: Any) -> None:
    breaker = BreakerConfig(consecutive_failures=1, open_s=0.05, open_jitter=0.0)
    engine, store, clock = make_engine(breaker)
    handler, _ = answers(clock, 503, 503, 503)
    with contextlib.suppress(CircuitOpen):  # the failure opens it: its retry is refused
        call(engine, handler, httpx.Request("GET", URL))
    with pytest.raises(CircuitOpen):
        call(engine, handler, httpx.Request("GET", URL))
    clock.advance(0.1)
    ok, _ = answers(clock, 200)
    response = call(engine, ok, httpx.Request("GET", URL))
    assert response.status_code == 200
    decisions = response.extensions["fidelity_context"].decisions
    assert [(d.layer, d.verdict) for d in decisions][:1] == [("breaker", "probe")]
    assert store.breakers["upstream:svc.internal"].state == "closed"


@pytest.mark.parametrize("call", CALLS)
def test_inside_a_request_the_first_attempt_lands_in_its_context(call: Any) -> None:
    engine, _, clock = make_engine()
    handler, _ = answers(clock, 200)
    ctx = DecisionContext(engine, "/route", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 0.25  # shorter than the attempt timeout
    token = _CURRENT.set(ctx)
    try:
        request = httpx.Request("GET", URL)
        seen: list[str] = []

        def timed(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers["x-request-timeout-ms"])
            return handler(request)  # type: ignore[no-any-return]

        response = call(engine, timed, request)
    finally:
        _CURRENT.reset(token)
    assert response.status_code == 200
    assert "fidelity_context" not in response.extensions
    assert seen == ["203"]  # the attempt's 225 ms (the deadline's, less a tenth), less a tenth
    assert request.extensions["timeout"]["read"] == pytest.approx(0.225)
    assert ctx.attempts == {"svc.internal": 1}
    assert [d.reason for d in ctx.decisions] == ["attempt"]


class GateOnlyStore(CountingStore):
    """An in-process store without the first-attempt twin: the gate serves for it."""

    outbound_begin_now = None  # type: ignore[assignment]


@pytest.mark.parametrize("call", CALLS)
def test_a_store_without_a_begin_twin_is_gated_as_a_first_attempt(call: Any) -> None:
    policy = Policy(upstreams=(UpstreamConfig(host="*", breaker=BreakerConfig()),))
    store, clock = GateOnlyStore(), FakeClock()
    engine = Engine(policy, clock=clock, store=store)
    handler, _ = answers(clock, 200)
    start = clock.monotonic()
    assert call(engine, handler, httpx.Request("GET", URL)).status_code == 200
    key = "upstream:svc.internal"
    # retry=False: the request is counted on the budget, no retry is spent
    assert store.ops == [("gate", key, False, start), ("record", key, "success", start + 0.005)]
    assert store.budgets["budget:svc.internal"].totals(clock.monotonic()) == (1, 0)
