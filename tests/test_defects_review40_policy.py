"""Review 40, policy and admin arguments.

1. Two policies that compare equal got different versions when a number field was
   written as an int in one and a float in the other (`max_ejected_ratio = 1` and
   `= 1.0`, `failure_ratio = 1`): the hash read the int as `1` and the float as
   `1.0`. State keys hold no version, so no counter restarted; but the fleet's
   `fidelity.policy.info` gauge and spans showed two policies where one ran, the
   FastAPI forms warned that the middleware's policy differs from theirs, and the
   startup line was logged once per spelling.
2. `AdminApp(token="short")` raised a plain ValueError, a bytes token an
   AttributeError, and a count that is no count (`top="20"`) failed every request for
   the page: now a PolicyError (still a ValueError) naming the argument, where the page
   is built.
"""

from __future__ import annotations

from typing import Any

import pytest

from fidelity_mw import Policy
from fidelity_mw.admin import AdminApp
from fidelity_mw.errors import PolicyError


@pytest.mark.parametrize(
    ("written", "as_float"),
    [
        ({"upstream": [{"host": "a", "max_ejected_ratio": 1}]}, 1.0),
        ({"upstream": [{"host": "a", "retry": {"advice_spread": 2}}]}, 2.0),
        ({"breaker": {"failure_ratio": 1, "open_s": 5}}, 1.0),
        ({"upstream": [{"host": "a", "panic_threshold": 0}]}, 0.0),
    ],
)
def test_equal_policies_have_one_version(written: dict[str, Any], as_float: float) -> None:
    spelled = Policy.from_dict(written)
    twin = Policy.from_dict(_floats(written))
    assert spelled == twin
    assert spelled.version == twin.version
    assert as_float in _leaves(spelled.to_dict())


def test_the_versions_of_policies_written_with_floats_are_unchanged() -> None:
    """(A float field written as a float hashes as before: no fleet sees its running
    policy's version change with this fix; only the int spellings move, to theirs.)"""
    assert Policy().version == Policy.from_dict({"version": 1}).version
    a = Policy.from_dict({"breaker": {"failure_ratio": 0.5}})
    b = Policy.from_dict({"breaker": {"failure_ratio": 0.5, "open_s": 5.0}})
    assert a.version == b.version


def test_an_int_field_is_no_float() -> None:
    policy = Policy.from_dict({"rate_limit": [{"name": "x", "rate": "5/s", "burst": 5}]})
    assert policy.to_dict()["rate_limit"][0]["burst"] == 5
    assert type(policy.to_dict()["rate_limit"][0]["burst"]) is int


def _floats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if type(value) is int:
        return float(value)
    return value


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


@pytest.mark.parametrize(
    ("arguments", "field", "says"),
    [
        ({"token": "short"}, "AdminApp.token", "at least 16 characters, got 5"),
        ({"token": b"0123456789abcdef"}, "AdminApp.token", "expected a str"),
        ({"top": "20"}, "AdminApp.top", "expected a count"),
        ({"top_breakers": -1}, "AdminApp.top_breakers", "expected a count"),
        ({"top_budgets": True}, "AdminApp.top_budgets", "expected a count"),
        ({"refresh_s": 0}, "AdminApp.refresh_s", "expected seconds"),
    ],
)
def test_bad_admin_arguments_are_refused_by_name(
    arguments: dict[str, Any], field: str, says: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        AdminApp(**arguments)
    assert [issue.path for issue in caught.value.issues] == [field]
    assert says in caught.value.issues[0].message
    assert isinstance(caught.value, ValueError)  # (what it raised before, for a short token)


def test_good_admin_arguments_are_taken() -> None:
    admin = AdminApp(token="x" * 16, top=0, top_breakers=5, top_budgets=5, refresh_s=0.05)
    assert (admin.top, admin.refresh_s) == (0, 0.05)
