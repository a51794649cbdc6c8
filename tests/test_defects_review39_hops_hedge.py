"""Review 39: hedged requests at B (scenario 6). No defect found; held.

B hedges its calls to C (`hedge = { after_ms = 30 }`). C0 answers 503 at once, C1 and C2
are slow (300 ms, healthy): a call's first attempt to a slow instance is hedged, and a
hedge or a retry may go to the failing one. Each attempt counts once: on the retry budget
(a hedge asks it like a retry, once), on its instance's breaker (a failed hedge once, a
cancelled loser never), and every request is served.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx

import _hops38
import _hops39 as hops
from fidelity_mw.policy.model import HedgeConfig, Policy


def _hedging(instances: tuple[str, ...]) -> Policy:
    policy = _hops38.policy(instances)
    c, *rest = policy.upstreams
    return dataclasses.replace(
        policy, upstreams=(dataclasses.replace(c, hedge=HedgeConfig(after_ms=30)), *rest)
    )


def test_real_chain_a_hedge_to_a_failing_instance_counts_once() -> None:
    n = 12
    with hops.chain("raise", b_policy=_hedging, knobs=hops.Knobs(slow_s=0.3)) as rig:
        with httpx.Client(timeout=30.0) as client:
            for i in range(3):
                hops.send(client, rig, f"warm{i}")
            rig.faults.set(0, "503")
            rig.faults.set(1, "slow")
            rig.faults.set(2, "slow")
            answers = [hops.send(client, rig, f"h{i}") for i in range(n)]
        seen = rig.seen
        snapshot = rig.b_store.snapshot(time.monotonic())
        a_counted = [k for k, s in rig.a_store.breakers.items() if s.epoch or s.consecutive]
    budgets = asyncio.run(snapshot).budgets
    decided = [d for rec in seen.by("B") for d in rec.decisions]
    hedges = sum(1 for d in decided if d.verdict == "hedge")
    retries = sum(1 for d in decided if d.verdict == "retry")
    print(f"\nhedged: {[a.status for a in answers]}; {hedges} hedges, {retries} retries")
    print(f"budget: {budgets}")
    assert [a.status for a in answers] == [200] * n
    # every hedge and every retry spent the budget once, nothing else did
    (budget,) = budgets
    assert budget.retries == hedges + retries
    # per request: at most the call's attempts plus its hedge
    assert max(seen.c_calls_by_rid[f"h{i}"] for i in range(n)) <= _hops38.ATTEMPTS + 1
    # C0's 503s were counted on its breaker, nobody's above B (it need not open: after
    # its first failures the balancer weighs C0 up and sends the calls elsewhere)
    c0 = rig.b_breakers()["0"]
    assert c0.epoch >= 1 or c0.consecutive >= 1
    assert a_counted == []
