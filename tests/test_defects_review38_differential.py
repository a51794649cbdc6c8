"""The differential sequences of tests/test_differential.py where they did not reach:
breakers and retry budgets while the clock steps back and far forward, and breaker
configurations drawn rather than three fixed ones.

`test_differential.py` runs its breaker and budget sequences on a clock that only moves
forward a few seconds at a time, under three breaker configurations; only the limits'
edge test steps the clock back. Redis's `TIME` can step back (a failover to a replica
whose clock is behind, an NTP step) and a process can sleep for hours, and the model
(`decide/breaker.py`, `decide/budget.py`) has guards for both that lib.lua and
outbound.lua mirror. Here the memory store and Redis (admit.lua, record.lua, batch.lua,
outbound.lua, on a pinned clock) are held to the same answers and the same breaker and
budget state through such steps, for any valid breaker configuration at its edges
(`min_calls` 1, a failure ratio of 1 or a hundredth, windows of 0.1 s, consecutive
failures of 1, slow calls, open times shorter than the lease). Found sound in review 38
(some 12,000 sequences); kept as a regression guard. Its two examples have teeth: with
the model's clock-step guard for an open breaker's open-until, or for a budget window's
bucket end, switched off, each fails (checked by hand; the drawn sequences alone found
the second only after some hundreds of examples).

(A retry's give-back is left out while the clock steps back: the sequences measure its
age on the pinned clock, where a step back makes it negative; production measures it on
the caller's monotonic clock and sends the server time it was spent at.)
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import test_differential as differential
from fidelity_mw.decide.breaker import FAILURE, IGNORED, SUCCESS
from fidelity_mw.policy import BreakerConfig
from test_differential import Harness

pytestmark = pytest.mark.redis

harness = differential.harness  # (the fixture, under its name; its keys outlive a stalled
# step through redis_clock's LONG_TTL, as there)

steps = st.sampled_from(
    [0.0, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 1e4, -0.1, -0.5, -3.0, -200.0, -1e4]
)
op = st.one_of(
    st.tuples(st.just("advance"), steps),
    # the route breaker alone: admitted, then an outcome later (or at once: "call")
    st.tuples(st.just("admit"), st.just(True), st.just(0), st.just(0), st.integers(1, 3),
              st.booleans()),
    st.tuples(st.just("record"), st.integers(0, 20),
              st.sampled_from([SUCCESS, FAILURE, FAILURE, IGNORED]), st.booleans()),
    st.tuples(st.just("call"), st.sampled_from([SUCCESS, FAILURE, FAILURE]), st.booleans()),
    st.tuples(st.just("outbound"), st.booleans()),
    st.tuples(st.just("outbound_sync"), st.booleans()),
    st.tuples(st.just("host_gate"), st.booleans()),
    st.tuples(st.just("try_retry"), st.booleans()),
    st.tuples(st.just("request")),
)  # fmt: skip


def _breaker(
    min_calls: int,
    ratio: float,
    window_s: float,
    open_s: float,
    open_min_s: float | None,
    jitter: float,
    probes: int,
    lease_s: float,
    consecutive: int | None,
    slow_ratio: float | None,
) -> BreakerConfig:
    return BreakerConfig(
        min_calls=min_calls,
        failure_ratio=ratio,
        window_s=window_s,
        open_s=open_s,
        open_min_s=open_s if open_min_s is None else min(open_min_s, open_s),
        open_jitter=jitter,
        half_open_probes=probes,
        probe_lease_s=lease_s,
        consecutive_failures=consecutive,
        slow_call_ms=None if slow_ratio is None else 100,
        slow_call_ratio=slow_ratio,
    )


breakers = st.builds(
    _breaker,
    st.integers(1, 4),
    st.sampled_from([0.01, 1 / 3, 0.5, 1.0]),
    st.sampled_from([0.1, 0.3, 1.0, 3.0]),
    st.sampled_from([0.1, 1.0, 5.0]),
    st.sampled_from([0.05, 0.25, None]),
    st.sampled_from([0.0, 0.2]),
    st.integers(1, 3),
    st.sampled_from([0.1, 0.75, 3.0]),
    st.sampled_from([None, 1, 2]),
    st.sampled_from([None, 0.5, 1.0]),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    breaker=breakers,
    u=st.sampled_from([0.5, 0.1, 0.93]),
    ops=st.lists(op, min_size=5, max_size=50),
)
# an open breaker's open-until set before the clock went back: open for at most its open
# time from now (decide.breaker.BreakerState.gate, lib.lua br_open_left)
@example(
    breaker=_breaker(1, 0.5, 1.0, 5.0, None, 0.0, 1, 0.75, None, None),
    u=0.5,
    ops=[("call", FAILURE, False), ("advance", -200.0), ("admit", True, 0, 0, 1, False)],
)
# a budget window's bucket end set before the clock went back: the window rotates again
# from one bucket ahead (decide.budget.BudgetWindow._rotate, outbound.lua bu_rotate)
@example(
    breaker=_breaker(1, 0.01, 0.1, 0.1, 0.05, 0.0, 1, 0.1, None, None),
    u=0.5,
    ops=[
        ("outbound", False),
        ("advance", -0.5),
        ("outbound", False),
        ("advance", 2.0),
        ("outbound", False),
    ],
)
def test_breakers_and_budgets_decide_alike_through_clock_steps(
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
    breaker: BreakerConfig,
    u: float,
    ops: list[tuple[Any, ...]],
) -> None:
    monkeypatch.setattr(differential, "BREAKERS", (breaker,))
    harness.run((0, u, ops))
