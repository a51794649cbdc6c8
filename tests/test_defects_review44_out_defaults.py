"""out44: the context fields every outbound call inside a request reads are the context's
own, not class defaults.

CPython 3.11 specialises no read of a class-level default through an instance (the
LOAD_ATTR stays adaptive and goes the generic way: ~200 machine instructions more a read
than an instance value's, callgrind). An outbound call inside a request read three such
defaults (`response_complete`, `_pending`, `_room_at`); the context now sets them when it
is made (`DecisionContext.__init__`, `new_request_context`), as it already did for
`shed_by` and `response_headers`. A call outside a request made its own context and read
two defaults back (`deadline_at`, `_attempts`): it now keeps what it set.
"""

from __future__ import annotations

import asyncio
import dis

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.context import (
    _CURRENT,
    INTERPRETED,
    MAX_DECISIONS,
    DecisionContext,
    new_request_context,
)
from fidelity_mw.outbound.loop import CONTEXT_EXTENSION
from fidelity_mw.policy import DeadlineConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock, seeded_random

READ = ("response_complete", "_pending", "_room_at")


def _reads(ctx: DecisionContext) -> tuple[object, ...]:
    return (ctx.response_complete, ctx._pending, ctx._room_at)


@pytest.mark.parametrize("made_by", ["constructor", "new_request_context"])
def test_the_fields_are_the_contexts_own(made_by: str) -> None:
    engine = Engine(Policy(), clock=FakeClock())
    if made_by == "constructor":
        ctx = DecisionContext(engine, "/r", "GET", 1.0)
    elif INTERPRETED:
        ctx = new_request_context(engine, "/r", "GET", 1.0)
    else:
        pytest.skip("compiled: the middleware calls the class")
    if INTERPRETED:  # (compiled, a native class: every field is the instance's, no vars)
        assert set(READ) <= set(vars(ctx)), sorted(set(READ) - set(vars(ctx)))
    assert _reads(ctx) == (False, None, MAX_DECISIONS)


@pytest.mark.skipif(not INTERPRETED, reason="compiled: no adaptive bytecode")
def test_their_reads_are_specialised() -> None:
    """A function reading them, run past the specializer's warm-up: every read is an
    instance-value read (e28bb20: LOAD_ATTR_ADAPTIVE, the generic way each time)."""
    engine = Engine(Policy(), clock=FakeClock())
    code = compile(
        "def probe(ctx):\n    return (ctx.response_complete, ctx._pending, ctx._room_at)\n",
        "<probe>",
        "exec",
    )
    space: dict[str, object] = {}
    exec(code, space)  # (a code object of its own: no other test has warmed it)
    probe = space["probe"]
    for _ in range(300):
        probe(new_request_context(engine, "/r", "GET", 1.0))  # type: ignore[operator]
    loads = [
        i.opname
        for i in dis.get_instructions(probe, adaptive=True)
        if i.argval in READ  # type: ignore[arg-type]
    ]
    assert loads == ["LOAD_ATTR_INSTANCE_VALUE"] * 3, loads


@pytest.mark.parametrize("default_ms", [800, None])
def test_a_call_of_its_own_keeps_its_deadline_and_counts_its_attempt(
    default_ms: int | None,
) -> None:
    """The shortcut's call outside a request: its context's deadline (the policy's
    default, or none) and attempt count, as before, now kept rather than read back."""
    policy = Policy(
        deadline=DeadlineConfig(default_ms=default_ms),
        upstreams=[UpstreamConfig(host="svc.internal")],
    )
    clock = FakeClock()
    engine = Engine(policy, clock=clock, rng=seeded_random(1))
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )

    async def calls() -> list[httpx.Response]:
        token = _CURRENT.set(None)
        try:
            return [
                await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))
                for _ in range(3)
            ]
        finally:
            _CURRENT.reset(token)

    for response in asyncio.run(calls()):
        ctx = response.extensions[CONTEXT_EXTENSION]
        if default_ms is None:
            assert ctx.deadline_at is None
        else:
            assert ctx.deadline_at == pytest.approx(ctx.started_at + 0.8)
        assert ctx.attempts == {"svc.internal": 1}
        assert [d.reason for d in ctx.decisions] == ["attempt"]
