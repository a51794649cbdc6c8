"""The RateLimit field of an admitted request, kept per (r, t) instead of formatted each time.

Kept fields must be byte for byte what formatting gives, for any r and t, and the
table must stay bounded however many pairs a service sees.
"""

from __future__ import annotations

import math
from typing import Any

from fidelity_mw import Policy, RateLimit
from fidelity_mw.engine import Engine
from fidelity_mw.inbound import admission
from fidelity_mw.inbound.admission import ratelimit_headers


def plan_and_result() -> tuple[Any, Any]:
    engine = Engine(Policy(rate_limits=[RateLimit(name="per-client", rate="10/s", burst=20)]))
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": ("h", 1)}
    plan = engine.plan_for(scope)
    result = engine.store.admit_now(plan.breaker_key, plan.breaker, ("k",), plan.specs, 100.0)
    assert result is not None
    assert result.admitted
    return plan, result


def expected(remaining: int, reset_s: float, retry_after: int | None) -> bytes:
    # the field as the draft spells it, computed independently of the kept table
    wait = reset_s - 20 * 0.1 + (remaining + 1) * 0.1
    t = max(0, math.ceil(wait - 1e-9))
    if retry_after is not None:
        t = min(t, retry_after)
    return b'"per-client";r=%d;t=%d' % (remaining, t)


def test_kept_fields_are_the_formatted_ones_for_every_pair() -> None:
    plan, result = plan_and_result()
    admission._FIELDS.clear()
    verdict = result.limits[0]
    for round_ in range(3):  # the first round formats, the next ones read the table
        for remaining in range(0, 20):
            for reset_s in (0.0, 0.05, 0.1, 0.95, 1.0, 1.0000000001, 2.5):
                for retry_after in (None, 0, 1):
                    one = verdict._replace(remaining=remaining, reset_s=reset_s)
                    got = ratelimit_headers(plan, result._replace(limits=(one,)), retry_after)
                    assert got[0] == plan.policy_field
                    assert got[1] == (b"ratelimit", expected(remaining, reset_s, retry_after)), (
                        round_,
                        remaining,
                        reset_s,
                        retry_after,
                    )
    assert admission._FIELDS  # (the path under test: one advertised limit, admitted)
    # each request gets its own list: one response's additions never reach another's
    first = ratelimit_headers(plan, result)
    assert first is not ratelimit_headers(plan, result)


def test_the_table_stays_bounded() -> None:
    plan, result = plan_and_result()
    admission._FIELDS.clear()
    verdict = result.limits[0]
    for remaining in range(admission._MAX_FIELDS * 2 + 7):
        one = verdict._replace(remaining=remaining, reset_s=0.0)
        got = ratelimit_headers(plan, result._replace(limits=(one,)))
        assert got[1][1] == expected(remaining, 0.0, None)
        assert len(admission._FIELDS) <= admission._MAX_FIELDS
