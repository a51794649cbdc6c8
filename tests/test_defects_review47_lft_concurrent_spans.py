"""Two calls to one upstream at once inside one request: whose decisions each CLIENT
span carries.

The observer took an attempt's decisions as the trailing run of the request's record
for the attempt's upstream (the service, for an instance: found through the `lb`
decision that picked it). Calls made together (`asyncio.gather` over one client) share
the request's record, and a retry's run is recorded before its backoff: while one call
backed off the other recorded its own, and the retry's span took the other call's pick
and attempt for its own (and its own retry decision, with its `delay_ms`, on no span).
Now the loop hands the observer its attempt's own decision (`ATTEMPT_DECISIONS` on the
request's extensions, for the attempt's start only), and the span's run ends there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import pipeline

pytestmark = pytest.mark.anyio

# each call's first answer: its retry's decision names it
FIRST = {"/a": 503, "/b": 502}
INSTANCES = ["http://10.0.0.7:8080", "http://10.0.0.8:8080"]


def _policy(service: bool) -> Policy:
    up: dict[str, Any] = {"host": "payments", "retry": {"attempts": 2}}
    if service:
        up["instances"] = INSTANCES
    return Policy.from_dict({"upstream": [up]})


async def _two_calls_at_once(service: bool) -> list[tuple[str, str | None, tuple[str, ...], str]]:
    """Calls /a and /b together; each one's first attempt is answered 503 (/a) or 502, its
    retry 200.
    Each CLIENT span: (path, the instance its `lb` decision names, its decisions, the
    address it went to)."""
    seen: dict[str, int] = {}

    async def upstream(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        seen[path] = seen.get(path, 0) + 1
        await asyncio.sleep(0)  # the other call runs meanwhile
        return httpx.Response(FIRST[path] if seen[path] == 1 else 200)

    clock = FakeClock()
    engine = Engine(_policy(service), clock=clock, rng=seeded_random(3))
    p = pipeline(decision_events="all")
    transport = FidelityTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    ctx = DecisionContext(engine=engine, route="/r", method="GET", started_at=clock.monotonic())
    token = _CURRENT.set(ctx)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            answers = await asyncio.gather(
                client.get("http://payments/a"), client.get("http://payments/b")
            )
        assert [r.status_code for r in answers] == [200, 200]
        out: list[tuple[str, str | None, tuple[str, ...], str]] = []
        for span in p.finished():
            if span.kind.name != "CLIENT":
                continue
            path = str(span.attributes[schema.URL_FULL]).rsplit("/", 1)[1]
            picked = [
                e.attributes.get("fidelity.detail.instance")
                for e in span.events
                if e.attributes[schema.LAYER] == "lb"
            ]
            assert len(picked) <= 1, (path, picked)
            decisions = tuple(
                d.split("@")[0] for d in str(span.attributes.get(schema.DECISIONS)).split(" ")
            )
            out.append(
                (
                    path,
                    str(picked[0]) if picked else None,
                    decisions,
                    str(span.attributes[schema.SERVER_ADDRESS]),
                )
            )
        return out
    finally:
        _CURRENT.reset(token)
        await engine.aclose()
        p.shutdown()


@pytest.mark.parametrize("service", [True, False], ids=["service", "plain"])
async def test_each_client_span_carries_its_own_attempts_decisions(service: bool) -> None:
    spans = await _two_calls_at_once(service)
    assert sorted(s[0] for s in spans) == ["a", "a", "b", "b"]
    for path in ("a", "b"):
        mine = [s for s in spans if s[0] == path]
        # its first attempt, then its retry: each with its own retry-layer decision
        retried = f"retry/retry/status_{FIRST['/' + path]}"
        assert [s[2][-1] for s in mine] == ["retry/allow/attempt", retried], spans
        if service:
            # the pick on each span is the instance that attempt went to
            for _, instance, decisions, address in mine:
                assert decisions[0].startswith("lb/allow/"), spans
                assert instance is not None, spans
                assert instance.split(":")[0] == address, spans
                assert len(decisions) == 2, spans
        else:
            assert all(len(s[2]) == 1 for s in mine), spans
