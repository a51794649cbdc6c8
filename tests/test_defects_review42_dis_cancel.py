"""Review 42: review 40's half-open scenario with clients that leave by cancelling.

client -> A -> B -> C x3 on real uvicorn (tests/_hops40.py); B's breakers for C half
open, C hanging, 12 clients at once, each leaving after 0.5 s. With httpx's own read
timeout the scenario passed; with clients that cancel their request task instead, 5 of
12 (and 3-5 of 12 in 4 of 7 runs) got a 502 from B, passed on by A, without
`Retry-After`.

Why: the chain ran on one `FakeClock`, whose `sleep` moves time on for every hop and
every request at once. C's own route breaker (it had counted C's 503s) was half open
too and shed B's calls with `Retry-After: 1`. A request whose retry at B became a
probe (a dropped client's probe had freed the slot) waited that second on the fake
clock, so every hop's clock jumped 1 s while B was between another request's give-up
(`breaker_open`, hint 0.2 s: the instances' shortest open time) and its 502: the
middleware's advice is the hint less the time since the give-up (outbound.md), so it
had run out, and no `Retry-After` went out. Cancelling clients spread the requests'
arrival (the 0.5 s includes each client's set-up), so requests reached B after the
first probes were freed: that is what made a wait, and the jump, likely. In real time
the wait is one request's own and the others' hints are intact: not a product defect.
The rig's `JumpClock` runs in real time and is moved on only between the phases.
"""

from __future__ import annotations

import asyncio

import httpx

import _hops38
import _hops40 as hops
from test_defects_review40_hops_disconnect import (
    CLIENT_TIMEOUT_S,
    DROPPED,
    RECOVERY_S,
    _all_open,
    _patient_b,
    _settle,
)


async def _cancel_all(rig: hops.Chain, prefix: str, n: int) -> list[str]:
    """`n` clients at once, each cancelling its request (its connection closed) once
    `CLIENT_TIMEOUT_S` passed without an answer."""

    async def one(i: int) -> str:
        rid = f"{prefix}{i}"
        async with httpx.AsyncClient(timeout=20.0) as client:
            call = asyncio.ensure_future(client.get(f"{rig.url}/x/ok", headers={"x-hop-id": rid}))
            await asyncio.wait({call}, timeout=CLIENT_TIMEOUT_S)
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                return "dropped"
            r = call.result()
            if r.status_code >= 500 and not r.headers.get("retry-after", "").isdigit():
                return f"{r.status_code} without a wait"
            return str(r.status_code)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_half_open_probes_whose_clients_cancel_leave_every_refusal_with_a_wait() -> None:
    clock = hops.JumpClock()
    with hops.chain("cancel", b_policy=_patient_b, clock=clock) as rig:
        with httpx.Client(timeout=20.0) as client:
            assert [
                client.get(f"{rig.url}/x/ok", headers={"x-hop-id": f"warm{i}"}).status_code
                for i in range(6)
            ] == [200] * 6
        for i in range(3):
            rig.faults.set(i, "503")
        with httpx.Client(timeout=20.0) as client:
            for i in range(40):
                client.get(f"{rig.url}/x/ok", headers={"x-hop-id": f"fail{i}"})
                if _all_open(rig):
                    break
        assert _all_open(rig)
        # (the epochs of these opens: a breaker no request asked since still says `open`,
        # its open period long over; only a later epoch's `open` was opened again)
        opened = {i: s.epoch for i in range(3) if (s := rig.b_breaker(i)) is not None}
        for i in range(3):
            rig.faults.set(i, "hang")
        clock.advance(2 * _hops38.OPEN_S)  # past every open period: the next calls probe
        got = asyncio.run(_cancel_all(rig, "drop", DROPPED))
        left = _settle(rig)
        reopened = {
            i: (s.epoch, s.state)
            for i in range(3)
            if (s := rig.b_breaker(i)) is not None
            and s.state == "open"
            and s.epoch != opened.get(i)
        }
        probing = {i: dict(s.probes) for i in range(3) if (s := rig.b_breaker(i)) and s.probes}
        a_failures = {k: v for k, v in rig.failures().items() if k.startswith("A ")}
        rig.faults.clear()
        clock.advance(RECOVERY_S)
        with httpx.Client(timeout=20.0) as client:
            late = [
                client.get(f"{rig.url}/x/ok", headers={"x-hop-id": f"after{i}"}).status_code
                for i in range(5)
            ]
        b_out = [r.outcome for r in rig.seen.by("B") if r.rid.startswith("drop")]
    print(f"\ncancelled: {got}; B {b_out}; reopened {reopened}; left {left}")
    assert "500" not in got
    # every 502 (B gave up: its instances' breakers half open, probes out) says how long
    assert not [g for g in got if g.endswith("without a wait")], got
    assert left == {}
    assert probing == {}
    assert reopened == {}
    assert a_failures == {}
    assert late == [200] * 5
