"""Review 48 (hdr48): a retry's CLIENT span in a long request, another call to the same
upstream going on meanwhile.

The loop names each attempt's own decision (`ATTEMPT_DECISIONS`); the observer looked
for it among the record's last 64 entries only, and not found there it fell back to
the record's trailing run for the attempt's upstream. A call that made 64 calls to the
same upstream while another call backed off before its retry gave that retry's span the
other call's `attempt` decision (`retry/allow/attempt`) and left its own retry decision
(`status_503`, with its `delay_ms`) on no span. Now the whole record is searched, and a
decision the bounded record dropped leaves the span the attempt's own decisions, never
another call's.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import pipeline

pytestmark = pytest.mark.anyio


class _HoldingClock(FakeClock):
    """A FakeClock whose sleeps (the retry's backoff) last until `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.sleeping = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        self.sleeping.set()
        await self.go.wait()


@pytest.mark.parametrize(
    ("retried_before", "others"),
    [(0, 70), (0, 400), (150, 300)],
    ids=["past-64", "bounded", "dropped"],
)
async def test_a_retry_span_carries_its_own_decision_after_many_calls_meanwhile(
    retried_before: int, others: int
) -> None:
    """`dropped`: 150 retries before (decisions other than `allow`, kept first) leave no
    room for the retry's own decision when the record is bounded: its span carries that
    decision from the loop's mark."""
    answered: dict[str, int] = {}

    def upstream(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        answered[path] = answered.get(path, 0) + 1
        if path == "/f":  # each call's first attempt fails
            return httpx.Response(503 if answered[path] % 2 else 200)
        return httpx.Response(503 if path == "/a" and answered[path] == 1 else 200)

    clock = _HoldingClock()
    policy = Policy.from_dict(
        {
            "upstream": [
                {
                    "host": "payments",
                    "retry": {"attempts": 2, "budget_ratio": 1.0},
                    "breaker": False,
                }
            ]
        }
    )
    engine = Engine(policy, clock=clock, rng=seeded_random(3))
    p = pipeline(decision_events="all")
    transport = FidelityTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    ctx = DecisionContext(engine=engine, route="/r", method="GET", started_at=clock.monotonic())
    token = _CURRENT.set(ctx)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            clock.go.set()
            for _ in range(retried_before):
                assert (await client.get("http://payments/f")).status_code == 200
            clock.go.clear()
            clock.sleeping.clear()

            async def meanwhile() -> None:
                await clock.sleeping.wait()  # /a is in its backoff
                for _ in range(others):
                    assert (await client.get("http://payments/c")).status_code == 200
                clock.go.set()

            a, _ = await asyncio.gather(client.get("http://payments/a"), meanwhile())
        assert a.status_code == 200
        spans = [
            (str(s.attributes[schema.URL_FULL]).rsplit("/", 1)[1], s)
            for s in p.finished()
            if s.kind.name == "CLIENT"
        ]
        mine = [s for path, s in spans if path == "a"]
        assert len(mine) == 2
        runs = [str(s.attributes.get(schema.DECISIONS)).split(" ") for s in mine]
        # before: the retry's span ended ["retry/allow/attempt@..."], another call's
        assert [run[-1].split("@")[0] for run in runs] == [
            "retry/allow/attempt",
            "retry/retry/status_503",
        ], runs
        retry_events = [
            e.attributes.get("fidelity.reason")
            for e in mine[1].events
            if e.attributes.get(schema.LAYER) == "retry"
        ]
        assert retry_events == ["status_503"], retry_events
        decisions = ctx.decisions
        if others > 256:
            assert ctx.dropped_total > 0  # (the record was bounded)
        kept = [d for d in decisions if d.reason == "status_503"]
        if retried_before:  # (the retries' decisions past the first 128 were dropped)
            assert len(kept) < retried_before + 1
        else:
            assert len(kept) == 1
    finally:
        _CURRENT.reset(token)
        await engine.aclose()
        p.shutdown()
