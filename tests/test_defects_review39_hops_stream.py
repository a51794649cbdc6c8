"""Review 39: C's answers breaking off mid-body, after their head (scenario 4).

An instance of C answers 200, sends a first chunk and drops the connection. B's
transport handed the response back at its head (counted a success), and B's app reads
the body: the break is counted on B's breaker for that instance (`failed_in_body`), and
not retried by B (the response was handed back: a partly read body is never sent again
into a duplicated answer). B's app lets the error out.

The defect: that error, let out, was the app's bare 500 (a body that broke on a call's
first attempt carried no give-up). A did not retry it (a 500), the client got a 500,
and A's breaker for B counted it against B, though B's breaker for C owned the fault:
one instance of C of three resetting its answers failed a third of the requests, all
three opened A's breaker for B. Now it is answered as the upstream's failure it is: a
502 marked `x-fidelity-fault: upstream` (not `exhausted`: B did not retry, A may, and
nothing of B's answer was sent yet).
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

import _hops38
import _hops39 as hops


def _drive(rig: hops.Chain, n: int, prefix: str) -> list[hops.Answer]:
    out = []
    with httpx.Client(timeout=30.0) as client:
        for i in range(n):
            out.append(hops.send(client, rig, f"{prefix}{i}"))
            time.sleep(0.005)
    return out


def _a_counted(rig: hops.Chain) -> list[tuple[str, int, int]]:
    return [
        (key, s.epoch, s.consecutive)
        for key, s in rig.a_store.breakers.items()
        if s.epoch or s.consecutive
    ]


@pytest.mark.parametrize("style", ["stream", "raise"])
def test_real_chain_one_instance_of_c_breaking_its_bodies_costs_no_request(style: str) -> None:
    n = 30
    with hops.chain(style) as rig:
        warm = _drive(rig, 3, "warm")
        rig.faults.set(0, "reset")
        fault = _drive(rig, n, "reset")
        seen = rig.seen
        a_counted = _a_counted(rig)
        broken = sum(
            1 for rec in seen.by("B") for d in rec.decisions if d.reason == "failed_in_body"
        )
    print(f"\none of C resetting ({style}): {Counter(a.status for a in fault)}, {broken} broken")
    assert all(a.status == 200 for a in warm)
    # every one served by a healthy instance, each body one whole answer of one instance
    # (never a broken first chunk passed on, nor one joined to a retry's answer). A's
    # retries of B's 502 reach B as new requests: B's balancer weighs the instance whose
    # body broke up (`failure_weight`), so they go elsewhere (before that weight, all
    # three of A's attempts once landed on C0, a compiled run beside three burners).
    assert [a.status for a in fault] == [200] * n
    served = [a.body for a in fault if a.status == 200]
    assert all(body in (b"c1:ok", b"c2:ok") for body in served), served
    bit = seen.c_calls[(0, "ok")] - sum(1 for a in warm if a.body == b"c0:ok")
    assert broken == bit  # each break counted by B's breaker for C0 (when C0 was picked)
    # A retried B's 502 (B had not retried): retries add up across hops, never multiply
    assert max(seen.c_calls_by_rid[f"reset{i}"] for i in range(n)) <= 2 * _hops38.ATTEMPTS - 1
    # B's breaker for C0 owns the fault: A's breaker for B and its route breaker count
    # nothing (before: B's 500s, counted against B)
    assert a_counted == []


@pytest.mark.parametrize("style", ["stream", "raise"])
def test_real_chain_all_of_c_breaking_their_bodies_is_a_502_never_a_500(style: str) -> None:
    n = 10
    with hops.chain(style) as rig:
        _drive(rig, 3, "warm")
        for i in range(3):
            rig.faults.set(i, "reset")
        fault = _drive(rig, n, "reset")
        seen = rig.seen
        a_counted = _a_counted(rig)
        opened = sum(1 for s in rig.b_breakers().values() if s.epoch > 0)
    print(f"\nall of C resetting ({style}): {[a.status for a in fault]}; B opened {opened}")
    # before: the app's 500 from B, passed on by A as its own 500
    assert all(a.status == 502 for a in fault), [(a.status, a.headers) for a in fault]
    assert all(a.headers.get("x-fidelity-fault") == "upstream" for a in fault)
    assert opened >= 1  # the hop next to the fault opened its breakers
    assert a_counted == []  # and only that one
    assert _hops38.breaker_opens(seen, "A") == Counter()
    assert max(seen.c_calls_by_rid[f"reset{i}"] for i in range(n)) <= 2 * _hops38.ATTEMPTS - 1
