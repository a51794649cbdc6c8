"""Review 40: a rolling restart of C while traffic flows (scenario 2).

client -> A -> B -> C on real uvicorn (tests/_hops40.py, `dynamic`): B finds C's
instances through a resolver. Each of C's three instances is replaced in turn by a new
one on a new port: the new one is started and named, then the old one stops (uvicorn's
graceful shutdown: its requests in flight finish, new connections are refused) while the
resolver still names it for a moment (discovery lags), then it is dropped from the list.
Two clients keep sending the whole time, C answering a little slowly so that calls are
in flight at the instance that stops.

What must hold: no client request fails (those in flight at the stopping instance
finish; those B sends to it once it stopped are refused on connect and retried by B on
another instance); B's instances are the new ones after, each with a clean breaker and
each taking traffic; nothing stays in flight; no breaker above B counts anything.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx

import _hops39
import _hops40 as hops

LAG_S = 0.3  # how long the resolver still names an instance that stopped
OVERLAP_S = 0.3  # how long old and new serve side by side


class Traffic:
    """`clients` threads, each sending one request after the other until stopped."""

    def __init__(self, rig: hops.Chain, clients: int = 2) -> None:
        self.rig = rig
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[str, int, dict[str, str]]] = []
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in range(clients)]

    def _run(self, client_id: int) -> None:
        with httpx.Client(timeout=30.0) as client:
            i = 0
            while not self.stop.is_set():
                rid = f"t{client_id}-{i}"
                r = client.get(f"{self.rig.url}/x/ok", headers={"x-hop-id": rid})
                with self.lock:
                    self.answers.append((rid, r.status_code, dict(r.headers)))
                i += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_a_rolling_restart_of_c_fails_no_client_request() -> None:
    knobs = _hops39.Knobs(slow_s=0.03)
    with hops.chain("raise", knobs=knobs, dynamic=True) as rig:
        for i in range(3):
            rig.faults.set(i, "slow")
        old = {i: rig.c_urls[i] for i in range(3)}
        new: dict[int, str] = {}
        with Traffic(rig) as traffic:
            time.sleep(OVERLAP_S)
            for i in range(3):
                rig.faults.set(3 + i, "slow")
                new[i] = rig.start_c(3 + i)
                rig.c_urls.append(new[i])
                time.sleep(OVERLAP_S)
                rig.c_servers[i].__exit__(None, None, None)  # in flight: they finish
                time.sleep(LAG_S)  # B may still pick it: refused on connect
                rig.c_urls.remove(old[i])
            time.sleep(OVERLAP_S)
        left = {k: v for k, v in rig.in_flight().items() if v}
        seen = rig.seen
        b_instances = [
            inst.url for up in rig.b_transport._upstreams.values() for inst in up.instances or ()
        ]
        b_breakers = rig.store("B").breakers
        new_breakers = {
            i: (s.state, s.epoch)
            for i in range(3)
            if (s := b_breakers.get("upstream:" + new[i].removeprefix("http://"))) is not None
        }
        kept_old = [k for k in b_breakers if any(k.endswith(u[7:]) for u in old.values())]
        above_b = {k: v for k, v in rig.failures().items() if k.startswith("A ")}
        served_by = Counter(idx for (idx, _route) in seen.c_calls.elements())
        retried = Counter(
            d.reason for rec in seen.by("B") for d in rec.decisions if d.verdict == "retry"
        )
    statuses = Counter(s for _, s, _ in traffic.answers)
    print(
        f"\nrolling: {len(traffic.answers)} requests {dict(statuses)}; served by "
        f"{dict(served_by)}; B retried {dict(retried)}; new breakers {new_breakers}; "
        f"B still keeps {len(kept_old)} breakers of old instances"
    )
    assert len(traffic.answers) > 20
    assert [a for a in traffic.answers if a[1] != 200] == []
    assert sorted(b_instances) == sorted(new.values())
    assert all(served_by[3 + i] > 0 for i in range(3)), served_by
    assert all(state == "closed" and epoch == 0 for state, epoch in new_breakers.values())
    assert left == {}
    assert above_b == {}
