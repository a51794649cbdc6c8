"""The middleware's own frame: the shortcuts it takes per request build what the public
constructors build."""

from __future__ import annotations

import sys

import pytest

from fidelity_mw import Engine, Policy
from fidelity_mw.context import INTERPRETED, DecisionContext, new_request_context
from fidelity_mw.testing import FakeClock


def _fields(ctx: DecisionContext) -> dict[str, object]:
    fields = dict(vars(ctx))
    fields.pop("_seq")
    return fields


@pytest.mark.skipif(not INTERPRETED, reason="compiled: the middleware calls the class")
def test_the_request_context_shortcut_sets_what_the_constructor_sets() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    made = new_request_context(engine, "/r", "GET", 5.0)
    built = DecisionContext(engine, "/r", "GET", 5.0)
    assert type(made) is DecisionContext
    assert _fields(made) == _fields(built)
    assert made._seq + 1 == built._seq  # the same sequence, one number each
    assert made.decisions == []
    assert made.decisions is not built.decisions


@pytest.mark.skipif(not INTERPRETED, reason="compiled: no interpreter frame to size")
def test_the_request_coroutine_fits_the_small_object_allocator() -> None:
    """The middleware's coroutine is allocated per request: up to 512 bytes it comes from
    Python's small-object allocator, above that from malloc (a few hundred instructions
    more per request, allocation and free). Its size grows with the locals and the
    deepest call of `FidelityMiddleware.__call__`: move a rare path into a method of its
    own (as `_enter_bulkhead`) rather than growing it."""
    from fidelity_mw import FidelityMiddleware

    async def app(scope: object, receive: object, send: object) -> None:
        pass

    mw = FidelityMiddleware(app, telemetry=False)
    coroutine = mw({"type": "http"}, None, None)  # type: ignore[arg-type]
    try:
        assert sys.getsizeof(coroutine) <= 512
    finally:
        coroutine.close()
