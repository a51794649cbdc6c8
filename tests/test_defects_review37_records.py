"""Review 37: the slotted decision records (`Gate`, `LimitSpec`, `LimitVerdict`,
`InboundResult`; decide/fields.py) pickle and copy as the NamedTuples they replaced did.
Compiled (native classes) neither worked: pickle's default makes the object without
calling `__init__`, which a native class refuses ("__init__() missing required argument");
interpreted, protocols 0 and 1 refused a slotted class without `__getstate__`. The suite
runs on both builds (scripts/compiled.sh)."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from fidelity_mw.decide.breaker import Gate
from fidelity_mw.decide.gcra import LimitSpec, LimitVerdict
from fidelity_mw.state.local import InboundResult

_GATE = Gate("probe", "half_open", 3, 0.25, probe_id=7, sent_probe_id=7)
_VERDICT = LimitVerdict(True, 12.5, 4, 0.5, 0.0, credit=True)
_RECORDS: list[Any] = [
    _GATE,
    LimitSpec("per-client", 0.01, 1.99, 2, False, credit_s=10.0),
    _VERDICT,
    InboundResult(_GATE, (_VERDICT, _VERDICT._replace(allowed=False)), True, "memory", 0.5),
]


@pytest.mark.parametrize("record", _RECORDS, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_record_pickles_to_an_equal_record(record: Any, protocol: int) -> None:
    back = pickle.loads(pickle.dumps(record, protocol))
    assert type(back) is type(record)
    assert back == record
    assert hash(back) == hash(record)
    assert repr(back) == repr(record)


@pytest.mark.parametrize("record", _RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_copies_to_an_equal_record(record: Any) -> None:
    for made in (copy.copy(record), copy.deepcopy(record)):
        assert type(made) is type(record)
        assert made == record
        assert made._fields == record._fields
