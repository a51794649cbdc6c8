"""Review 14 of the outbound changes merged from out12 (give-up marker, raw cancel of a
Redis gate, balancer): each test failed before its fix."""

from __future__ import annotations

import httpx
import pytest

from fidelity_mw import FidelityTransport, Policy
from fidelity_mw.decide.breaker import HALF_OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002")
KEYS = ("10.0.0.1:8001", "10.0.0.2:8002")
STEADY = BreakerConfig(open_s=30.0, failure_ratio=1.0, min_calls=1_000, half_open_probes=1)


# ------------------------------------- 1. a Retry-After's reroute never goes back to it


@pytest.mark.parametrize("seed", range(6))
async def test_a_rerouted_retry_never_goes_back_to_the_instance_that_said_retry_after(
    seed: int,
) -> None:
    """Two instances: A answers `503 Retry-After: 120` (beyond `retry_after_max_s`), B is
    half-open with its one probe out (another call's: not known open here). The call
    may not wait A's word, and B may take the retry: A is paused and the retry planned
    after the backoff alone. B's gate refuses it (no probe slot); before, the pick then
    fell back on the one instance left, A, paused, and the retry went there after the
    backoff: A asked again at once, against the word that paused it."""
    busy, probing = KEYS
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(503, headers={"retry-after": "120"})

    store = MemoryStore(rng=seeded_random(3))
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, breaker=STEADY)
    clock = FakeClock()
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(seed), store=store)
    now = clock.monotonic()
    store.breaker_state("upstream:" + probing, STEADY).force(HALF_OPEN, now, seeded_random(0))
    probe = store.gate_now("upstream:" + probing, STEADY, now)
    assert probe.probe_id  # the probe slot is out: B refuses every other call
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 503
    assert seen == [busy]
