"""Review 48 (cnc48): threads sharing one request's context through the blocking
transport.

A sync route's worker that fans out with `contextvars.copy_context()` (or
`anyio.to_thread`, which copies it) gives every thread the request's context, and each
thread's calls through `FidelitySyncTransport` record into it. Nothing kept those
records apart: a thread switch between one call's pick (`lb`) and its attempt's
decision put the other call's pick, budget refusal or attempt between them, so a CLIENT
span carried the other call's pick (an instance it never went to), two picks or none;
and `ctx.attempts` lost counts (read, add one, write back, from two threads). On the old
code, 2 threads x 25 calls x 40 requests with the interpreter switching threads often:
CLIENT spans wrong and attempts not counted in nearly every run (in a scratch run of 2 x
50 x 20: 6-9 of 2,489 spans wrong, 2,473-2,489 attempts counted for 2,489 sent). Now
the transport holds a per-context lock while a call records (never across its effects:
the send, a backoff, a store's round trip): 0 wrong, every attempt counted.

A count over many calls, not one forced interleaving: the moments are inside the
attempt loop, with nothing there a test could hold. The old code fails it in nearly
every run (pure build; it switches threads less often compiled).
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Iterator

import httpx
import pytest

from fidelity_mw import Engine, Policy
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.outbound.transport import FidelitySyncTransport
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import pipeline

INSTANCES = [f"http://10.0.0.{n}:8080" for n in range(1, 5)]
# (each request's record stays under MAX_DECISIONS: a longer one drops `allow` records
# mid-way, an attempt's pick among them, however the threads run)
REQUESTS, THREADS, CALLS = 40, 2, 25


@pytest.fixture
def switching_often() -> Iterator[None]:
    """The interpreter switches threads every 10 us (5 ms by default): the interleavings
    a loaded server meets now and then, met in every run."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("switching_often")
def test_threads_sharing_a_request_keep_their_own_records() -> None:
    clock = FakeClock()
    policy = Policy.from_dict(
        {"upstream": [{"host": "payments", "instances": INSTANCES, "retry": {"attempts": 2}}]}
    )
    engine = Engine(policy, clock=clock, rng=seeded_random(3))
    p = pipeline(decision_events="all")
    sent = [0]
    sent_lock = threading.Lock()

    def upstream(request: httpx.Request) -> httpx.Response:
        with sent_lock:
            sent[0] += 1
            n = sent[0]
        return httpx.Response(503 if n % 3 == 0 else 200)  # some calls retry

    transport = FidelitySyncTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    counted = 0
    try:
        with httpx.Client(transport=transport) as client:
            for _ in range(REQUESTS):
                ctx = DecisionContext(engine, "/r", "GET", clock.monotonic())
                token = _CURRENT.set(ctx)
                try:

                    def calls(i: int) -> None:
                        for j in range(CALLS):
                            client.get(f"http://payments/{i}/{j}")

                    threads = [
                        threading.Thread(target=contextvars.copy_context().run, args=(calls, i))
                        for i in range(THREADS)
                    ]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                finally:
                    _CURRENT.reset(token)
                counted += sum(ctx.attempts.values())
        wrong = []
        spans = 0
        for span in p.finished():
            if span.kind.name != "CLIENT":
                continue
            spans += 1
            picked = [
                str(e.attributes.get("fidelity.detail.instance"))
                for e in span.events
                if e.attributes[schema.LAYER] == "lb"
            ]
            address = str(span.attributes[schema.SERVER_ADDRESS])
            if [pick.split(":")[0] for pick in picked] != [address]:
                wrong.append((address, picked, span.attributes.get(schema.DECISIONS)))
    finally:
        p.shutdown()
    assert spans == sent[0]
    assert wrong == []  # before: 6-9 spans with another call's pick, two or none
    assert counted == sent[0]  # before: up to 16 attempts of 2,489 not counted
