"""Round 45 (cmp45): the compiled build's one known difference, `raise ... from`.

mypyc 2.4.1 compiles `raise X from Y` as `raise X`: the `from` clause is dropped
(`mypyc/irbuild/statement.py`, `transform_raise_stmt` reads no `from_expr`), so a compiled
module's error has no `__cause__`, and `from None` suppresses no context. The refusal of
an outbound call whose breaker state could not be read (`[state] on_error = "closed"`)
was told from an open breaker's by `CircuitOpen.__cause__` alone: compiled,
`outbound.decisions` raised it with no cause, and the app's let-out refusal said "the
circuit breaker ... is open" where the state was read-only
(`test_defects_review12_routes.py::test_an_upstream_breaker_that_could_not_be_read_is_not_said_open`).

The same test of `__cause__` was wrong in the pure build the other way: a retry refused
by an open breaker raises `CircuitOpen` from the failed attempt's error, and that cause
made the refusal say "the circuit breaker state ... is unavailable and the policy says
to fail closed", decided by `state`, while the breaker was open and the state read.

Now `CircuitOpen.state_error` says which it is, and the compiled modules chain by hand
(`error.__cause__ = ...`, `__suppress_context__ = True`), so both builds raise the same
chain. The last test keeps the shape out of every compiled module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import CircuitOpen, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[1]
HOST = "api.internal"
BREAKER = BreakerConfig(min_calls=100, open_s=30.0)  # the calls here will not open it


class OpenedBetweenAttempts(MemoryStore):
    """Other requests open the upstream's breaker between this call's attempts."""

    def outbound_gate_now(self, *args: Any) -> Any:
        if args[4]:  # a retry's gate
            self.breaker_state(f"upstream:{HOST}", BREAKER).force(OPEN, args[5], seeded_random(2))
        return super().outbound_gate_now(*args)


class UnreadableBreaker(MemoryStore):
    def outbound_begin_now(self, *args: Any, **kw: Any) -> Any:
        raise StateUnavailable("10.0.0.7:6379 refused", why="read_only")

    outbound_gate_now = outbound_begin_now


def _refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=request)


def _policy(on_error: str = "open") -> Policy:
    return Policy(
        state=StateConfig(on_error=on_error),  # type: ignore[arg-type]
        upstreams=(
            UpstreamConfig(host=HOST, retry=RetryConfig(attempts=3, base_ms=1), breaker=BREAKER),
        ),
        breaker=None,
    )


def _transport(store: MemoryStore, on_error: str = "open") -> FidelityTransport:
    return FidelityTransport(
        httpx.MockTransport(_refused), policy=_policy(on_error), clock=FakeClock(), store=store,
        telemetry=False,
    )  # fmt: skip


async def test_a_retry_refused_by_an_open_breaker_chains_the_failed_attempt() -> None:
    """Compiled before: no `__cause__`. Pure and compiled now: the attempt's error, and
    no state error (the breaker is open, its state was read)."""
    transport = _transport(OpenedBetweenAttempts(rng=seeded_random(1)))
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(CircuitOpen) as refused:
            await client.get(f"http://{HOST}/")
    assert refused.value.attempts_made == 1
    assert isinstance(refused.value.__cause__, httpx.ConnectError)
    assert refused.value.__suppress_context__
    assert refused.value.state_error is None


async def test_a_breaker_state_that_could_not_be_read_is_said_so_by_the_error() -> None:
    """Compiled before: no `__cause__`, nothing else said the state was unread."""
    transport = _transport(UnreadableBreaker(), on_error="closed")
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(CircuitOpen) as refused:
            await client.get(f"http://{HOST}/")
    assert refused.value.attempts_made == 0
    assert isinstance(refused.value.state_error, StateUnavailable)
    assert refused.value.__cause__ is refused.value.state_error


async def _let_out(store: MemoryStore, on_error: str = "open") -> httpx.Response:
    async def calls(request: Request) -> Response:
        transport = FidelityTransport(httpx.MockTransport(_refused))  # the middleware's policy
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"http://{HOST}/")
        return PlainTextResponse("never")

    app = Starlette(routes=[Route("/x", calls)])
    app.add_middleware(
        FidelityMiddleware, policy=_policy(on_error), store=store, clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/x")


async def test_a_retry_refused_by_an_open_breaker_is_answered_as_the_breakers() -> None:
    """Pure before: "the circuit breaker state for upstream 'api.internal' is unavailable
    and the policy says to fail closed", `x-fidelity-decided-by: state` (the refusal's
    cause, the failed attempt's ConnectError, was taken for the store's failure)."""
    response = await _let_out(OpenedBetweenAttempts(rng=seeded_random(1)))
    assert response.status_code == 503
    assert response.headers["x-fidelity-decided-by"] == "breaker"
    body = response.json()
    assert body["type"] == "urn:fidelity-mw:problem:upstream-circuit-open"
    assert re.fullmatch(
        r"the circuit breaker for upstream 'api\.internal' is open; retry in \d+ s", body["detail"]
    )


async def test_an_unread_breaker_state_is_answered_as_the_states() -> None:
    """Compiled before: "the circuit breaker for upstream ... is open" (review 12's test
    through the outbound layer's own error)."""
    response = await _let_out(UnreadableBreaker(), on_error="closed")
    assert response.status_code == 503
    assert response.headers["x-fidelity-decided-by"] == "state"
    assert response.json()["detail"] == (
        "the circuit breaker state for upstream 'api.internal' is read-only for now "
        "and the policy says to fail closed; retry in 1 s"
    )


def _compiled_modules() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("\ncompile = [", 1)[1].split("]", 1)[0]
    return re.findall(r'"(fidelity_mw[.\w]*)"', block)


def _suppressed_by_hand(fn: ast.AST, name: str) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr == "__suppress_context__"
                    and isinstance(target.value, ast.Name)
                    and target.value.id == name
                ):
                    return True
    return False


def test_no_compiled_module_relies_on_raise_from() -> None:
    """A `from` clause is dropped compiled: a cause is set by hand (`__cause__ = ...`),
    and a `from None` (which ruff asks for inside `except`) only beside
    `__suppress_context__ = True` on the same error."""
    assert "fidelity_mw.outbound.decisions" in _compiled_modules()
    found = []
    for module in _compiled_modules():
        path = ROOT / "src" / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, ast.Raise) or node.cause is None:
                    continue
                by_hand = (
                    isinstance(node.cause, ast.Constant)
                    and node.cause.value is None
                    and isinstance(node.exc, ast.Name)
                    and _suppressed_by_hand(fn, node.exc.id)
                )
                if not by_hand:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
