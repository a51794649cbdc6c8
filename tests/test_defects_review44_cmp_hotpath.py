"""Round 44, the compiled build: what changed in the request's path for it, held to the
behaviour it had.

1. `outbound.decisions` compiles: mypyc 2.4.1 fails writing the text signature of a
   function with a `float` default and `**kwargs` (its pre-scan for positional-only
   parameters counts the `__bitmap` argument it adds for the unboxed default, so every
   parameter reads positional-only and `**kwargs` then follows a default). `give_up` had
   both; its extra details are a dict now. No function of a compiled module may have the
   shape again.
2. The RateLimit field of an admitted request is kept per limit by one int (`(r << 32) |
   t`), not per `(item, r, t)` tuple: the same bytes, a table shared by the limit's plans.
3. The header scan skips a line whose name has no wanted name's length before hashing it:
   the same headers found.
"""

from __future__ import annotations

import ast
import math
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw import Policy, RateLimit
from fidelity_mw.engine import Engine
from fidelity_mw.inbound import admission
from fidelity_mw.inbound.admission import ratelimit_headers
from fidelity_mw.inbound.request import ANY_LENGTH, lengths_of, scan_headers

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- 1. mypyc's text signature

# Annotations mypyc keeps unboxed with a default-argument bitmap.
_BITMAP_TYPES = {"float", "bool_", "i64", "i32", "i16", "u8"}


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


def test_decisions_is_compiled() -> None:
    assert "fidelity_mw.outbound.decisions" in _compiled_modules()


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


# ---------------------------------------------------------------- 2. RateLimit fields


def _plan(engine: Engine, path: str) -> Any:
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "client": ("h", 1)}
    return engine.plan_for(scope)


def test_plans_of_one_limit_share_its_field_table() -> None:
    limit = RateLimit(name="round44-shared", rate="10/s", burst=20)
    engine = Engine(Policy(rate_limits=[limit]))
    one, two = _plan(engine, "/a"), _plan(engine, "/b")
    assert one is not two
    assert one.fields is two.fields
    other = Engine(Policy(rate_limits=[RateLimit(name="round44-other", rate="10/s", burst=20)]))
    assert _plan(other, "/a").fields is not one.fields


def test_a_wait_past_the_keys_span_is_formatted_and_not_kept() -> None:
    # a daily limit of one unit an hour: `t` in the tens of thousands fits; an absurd
    # reset (a store's answer) past 2**32 s is formatted all the same
    engine = Engine(Policy(rate_limits=[RateLimit(name="round44-long", rate="1/s", burst=5)]))
    plan = _plan(engine, "/x")
    result = engine.store.admit_now(plan.breaker_key, plan.breaker, ("k",), plan.specs, 10.0)
    assert result is not None
    plan.fields.clear()
    verdict = result.limits[0]
    for reset_s in (0.0, 86_400.0, 2.0**33, 2.0**40):
        one = verdict._replace(remaining=3, reset_s=reset_s)
        got = ratelimit_headers(plan, result._replace(limits=(one,)))
        wait = reset_s - plan.specs[0].tolerance_s + 4 * plan.specs[0].interval_s
        t = max(0, math.ceil(wait - 1e-9))
        assert got[1] == (b"ratelimit", b'"round44-long";r=3;t=%d' % t)
    assert len(plan.fields) == 2  # the two waits under 2**32 s
    assert len(plan.fields) <= admission._MAX_FIELDS


# ---------------------------------------------------------------- 3. the header scan

# (from 60 bytes on, a name is never skipped: the mask's bits from there on are all set)
_LONG = [b"a" * 60, b"b" * 60, b"a" * 61, b"b" * 200]
_NAMES = st.sampled_from(
    [b"x-request-timeout-ms", b"grpc-timeout", b"x-api-key", b"host", b"", b"a" * 59, *_LONG]
)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.tuples(_NAMES, st.binary(max_size=6)), max_size=12),
    wanted=st.frozensets(_NAMES),
)
def test_the_length_mask_finds_what_the_plain_scan_finds(
    headers: list[tuple[bytes, bytes]], wanted: frozenset[bytes]
) -> None:
    assert scan_headers(headers, wanted, lengths_of(wanted)) == scan_headers(headers, wanted)
    assert scan_headers(headers, wanted, ANY_LENGTH) == scan_headers(headers, wanted)


def test_the_mask_names_the_lengths() -> None:
    mask = lengths_of([b"host", b"x-request-timeout-ms"])
    assert [n for n in range(60) if (mask >> n) & 1] == [4, 20]
    assert all((mask >> n) & 1 for n in (60, 61, 500))  # long names: always looked up
    assert lengths_of([]) >> 3 & 1 == 0
