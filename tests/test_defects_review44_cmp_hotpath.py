"""Round 44, the compiled build: `outbound.decisions` can be compiled.

1. `outbound.decisions` compiles: mypyc 2.4.1 fails writing the text signature of a
   function with a `float` default and `**kwargs` (its pre-scan for positional-only
   parameters counts the `__bitmap` argument it adds for the unboxed default, so every
   parameter reads positional-only and `**kwargs` then follows a default). `give_up` had
   both; its extra details are a dict now. No function of a compiled module may have the
   shape again.
2. The records `give_up` makes with extra details (a 5xx after a retry, a breaker's
   refusal) carry them as before.
"""

from __future__ import annotations

import ast
import contextlib
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport, Policy
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.errors import CircuitOpen
from fidelity_mw.policy import BreakerConfig, RetryConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- 1. mypyc's text signature

# Annotations mypyc keeps unboxed with a default-argument bitmap.
_BITMAP_TYPES = {"float", "i64", "i32", "i16", "u8"}


def _compiled_modules() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["custom"]["compile"])


def _unboxed_default_and_kwargs(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    args = fn.args
    if args.kwarg is None:
        return False
    positional = [*args.posonlyargs, *args.args]
    with_defaults = positional[len(positional) - len(args.defaults) :]
    keyword = [a for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
    return any(
        isinstance(a.annotation, ast.Name) and a.annotation.id in _BITMAP_TYPES
        for a in (*with_defaults, *keyword)
    )


def test_no_compiled_function_has_an_unboxed_default_beside_kwargs() -> None:
    found = []
    for module in _compiled_modules():
        path = ROOT / "src" / Path(*module.split(".")).with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef
            ) and _unboxed_default_and_kwargs(node):
                found.append(f"{module}.{node.name}")
    assert found == []


def test_the_shape_check_sees_give_ups_old_signature() -> None:
    old = ast.parse(
        "def give_up(ctx, up, layer, reason, attempts_made, now, source='request',"
        " age_s: float = 0.0, *, upstream_advised: bool = False, **details): ..."
    ).body[0]
    assert isinstance(old, ast.FunctionDef)
    assert _unboxed_default_and_kwargs(old)


# ---------------------------------------------------------------- give_up's details, as before


async def _decisions_of(upstream: Any, policy: Policy, calls: int) -> list[Any]:
    engine = Engine(policy, clock=FakeClock())
    ctx = DecisionContext(engine=engine, route="/r44", method="GET", started_at=0.0)
    token = _CURRENT.set(ctx)
    try:
        transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(calls):
                with contextlib.suppress(CircuitOpen):
                    await client.get("http://a.internal/x")
    finally:
        _CURRENT.reset(token)
    return ctx.decisions


@pytest.mark.anyio
async def test_a_give_up_after_a_retry_answered_500_says_the_status() -> None:
    answers = iter([503, 500])

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers))

    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1)
    policy = Policy(upstreams=(UpstreamConfig(host="a.internal", retry=retry),))
    last = (await _decisions_of(upstream, policy, 1))[-1]
    assert (last.layer, last.verdict, last.reason) == ("retry", "give_up", "failed_after_retry")
    assert last.details["status"] == 500
    assert last.details["attempts"] == 2


@pytest.mark.anyio
async def test_a_breakers_refusal_says_its_retry_after() -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    breaker = BreakerConfig(min_calls=1, consecutive_failures=1, open_s=7.0, open_jitter=0.0)
    retry = RetryConfig(attempts=1)
    policy = Policy(upstreams=(UpstreamConfig(host="a.internal", retry=retry, breaker=breaker),))
    refused = [d for d in await _decisions_of(upstream, policy, 2) if d.verdict == "reject"]
    assert len(refused) == 1
    assert (refused[0].layer, refused[0].reason) == ("breaker", "breaker_open")
    assert refused[0].details["attempts"] == 0
    assert 0.0 < refused[0].details["retry_after_s"] <= 7.0
