"""The middleware's own frame: the shortcuts it takes per request build what the public
constructors build."""

from __future__ import annotations

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
