"""Review 40: an instance of C trickling its body (scenario 4).

client -> A -> B -> C x3 on real uvicorn (tests/_hops40.py). One instance of C answers
its head at once and then a byte every 0.1 s: no read waits as long as B's attempt
timeout (httpx's timeouts are per read), so the attempt never times out; what ends the
call is the request's deadline (the client's `x-request-timeout-ms`), at B, which
cancels B's app while it reads the body and answers 504 (`x-fidelity-fault:
upstream`), which A passes on as its own give-up (504, exhausted).

The defect: the cancellation of that read counted nowhere. B's breaker for the
instance had counted the call a success at its head, and the body's reader ignored a
cancellation (none is the upstream's doing); the balancer's latency estimate had only
the head's time. So the trickling instance kept its share of B's calls for good: every
third request waited out the client's whole deadline and failed, and no breaker ever
opened. Now a body read that the request's own deadline cuts counts on the breaker the
call's success was counted on, as a body that broke (`failed_in_body`, a timeout), and
weighs the instance up, unless that deadline was under half the attempt timeout (a
caller's short deadline is no evidence, as for an attempt it cuts).

What must hold: only B's breaker for that instance counts it (A's breakers nothing);
after a few such requests, requests go to the healthy instances and are served; no 500;
each request reaches C once (a body being read is never retried).
"""

from __future__ import annotations

import time
from collections import Counter

import httpx

import _hops40 as hops

N = 16
DEADLINE_MS = 1500


def test_an_instance_trickling_its_body_is_counted_by_b_and_left_out() -> None:
    with hops.chain("raise") as rig:
        rig.faults.set(0, "trickle")
        answers = []
        with httpx.Client(timeout=30.0) as client:
            for i in range(N):
                r = client.get(
                    f"{rig.url}/x/ok",
                    headers={"x-hop-id": f"tr{i}", "x-request-timeout-ms": str(DEADLINE_MS)},
                )
                answers.append((r.status_code, r.headers.get("x-fidelity-fault")))
                time.sleep(0.01)
        failures = rig.failures()
        c0 = rig.b_breaker(0)
        counted = sum(
            1 for rec in rig.seen.by("B") for d in rec.decisions if d.reason == "failed_in_body"
        )
        per_request = [rig.seen.c_calls_by_rid[f"tr{i}"] for i in range(N)]
        to_c0 = rig.seen.c_calls[(0, "ok")]
    statuses = Counter(s for s, _ in answers)
    print(f"\ntrickle: {dict(statuses)}; to C0 {to_c0}; B counted {counted}; failures {failures}")
    assert all(s in (200, 504) for s, _ in answers), answers
    assert all(f == "upstream" for s, f in answers if s == 504)
    assert max(per_request) == 1
    # B's breaker for the trickling instance counted each cut read; nobody else counted
    assert counted == to_c0
    assert c0 is not None
    assert to_c0 >= 1  # (else this run tested nothing)
    assert {k for k in failures if not k.startswith("C")} <= {f"B upstream:{rig.c_hosts[0]}"}
    # the instance was left out: at most a few requests went there (before: every third,
    # to the end), and the last half were all served
    assert to_c0 <= 4, to_c0
    assert [s for s, _ in answers[N // 2 :]] == [200] * (N // 2)


def test_a_callers_short_deadline_cutting_a_trickling_body_is_no_evidence() -> None:
    # 400 ms: under half of B's attempt timeout for C (1 s); the caller's choice
    with hops.chain("raise") as rig:
        for i in range(3):
            rig.faults.set(i, "trickle")
        with httpx.Client(timeout=30.0) as client:
            statuses = [
                client.get(
                    f"{rig.url}/x/ok",
                    headers={"x-hop-id": f"short{i}", "x-request-timeout-ms": "400"},
                ).status_code
                for i in range(6)
            ]
        failures = {k: v for k, v in rig.failures().items() if not k.startswith("C")}
    assert statuses == [504] * 6
    assert failures == {}
