"""Review 40: non-idempotent requests failing at C (scenario 5).

client -> A -> B -> C x3 on real uvicorn (tests/_hops40.py, `raise` style), every hop
passing a POST's body and its `Idempotency-Key` on. Every instance of C answers 503
(a plain one: C's app, not its control layer).

The defect: B's app let out `raise_for_status()` on C's 503 for a POST that B's
transport had not retried (not idempotent). B's breaker for C counted it, and B's route
breaker and the client's units left it to that breaker, but the answer was the server's
bare 500: A's breaker for B counted it against B, opened after four such POSTs, and then
refused A's every call to B, GETs of healthy routes too. Now that error is answered as
the upstream's failure it is: a 502 marked `x-fidelity-fault: upstream` (not
`exhausted`: B did not retry), which A's breaker leaves to B's.

What must hold: a POST without `Idempotency-Key` reaches C exactly once per client
request (neither B nor A resends it); one with a key is retried by B only (at most
`attempts` calls at C, A does not send B's give-up again), and every call that reaches
C carries the whole body, exactly as sent (a body in memory is sent again whole per
attempt, never a part, never twice in one call).
"""

from __future__ import annotations

from collections import Counter

import httpx

import _hops38
import _hops40 as hops

BODY = bytes(range(256)) * 256  # 64 KiB


def _post(rig: hops.Chain, rid: str, key: str | None) -> int:
    headers = {"x-hop-id": rid}
    if key is not None:
        headers["idempotency-key"] = key
    with httpx.Client(timeout=30.0) as client:  # (a fresh connection: A's may close)
        return client.post(f"{rig.url}/x/ok", headers=headers, content=BODY).status_code


def test_a_post_failing_at_c_is_sent_once_without_a_key_and_whole_with_one() -> None:
    with hops.chain("raise") as rig:
        assert _post(rig, "warm", None) == 200
        for i in range(3):
            rig.faults.set(i, "503")
        plain = [_post(rig, f"plain{i}", None) for i in range(3)]
        keyed = [_post(rig, f"keyed{i}", f"key-{i}") for i in range(3)]
        calls = Counter(rid for rid, _ in rig.received)
        bodies_whole = all(body == BODY for _, body in rig.received)
        b_calls = Counter(rec.rid for rec in rig.seen.by("B"))
        a_counted = {k: v for k, v in rig.failures().items() if k.startswith("A ")}
    print(f"\nPOST: plain {plain}, keyed {keyed}; calls at C {dict(calls)}")
    assert bodies_whole
    assert all(calls[f"plain{i}"] == 1 for i in range(3)), calls
    assert all(1 < calls[f"keyed{i}"] <= _hops38.ATTEMPTS for i in range(3)), calls
    assert all(b_calls[f"{kind}{i}"] == 1 for kind in ("plain", "keyed") for i in range(3))
    # C's failure, answered as C's (before: B's bare 500 for the plain POSTs)
    assert plain == [502] * 3
    assert keyed == [502] * 3
    # and only the hop next to C counted it: A's breakers nothing
    assert a_counted == {}


def test_posts_failing_at_c_do_not_open_a_breaker_for_b_at_a() -> None:
    with hops.chain("raise") as rig:
        for i in range(3):
            rig.faults.set(i, "503", route="ok")  # (the route `bad` stays healthy)
        posts = [_post(rig, f"p{i}", None) for i in range(8)]
        with httpx.Client(timeout=30.0) as client:
            gets = [
                client.get(f"{rig.url}/x/bad", headers={"x-hop-id": f"g{i}"}).status_code
                for i in range(4)
            ]
        a_counted = {k: v for k, v in rig.failures().items() if k.startswith("A ")}
    print(f"\nPOSTs {posts}; GETs after {gets}; A counted {a_counted}")
    # before: 500 500 500 500, then A's breaker for B open: 503s of A's own
    assert posts == [502] * 8
    assert a_counted == {}
    assert gets == [200] * 4
