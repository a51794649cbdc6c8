"""Defects in the state stores found by the lead in session 30 (each test failed before its fix)."""

from __future__ import annotations

import httpx
import pytest

from fidelity_mw import CircuitOpen, FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


def _policy() -> Policy:
    # Built afresh on every call: equal values, distinct objects (as two modules that
    # each load the same policy file get).
    breaker = BreakerConfig(min_calls=4, failure_ratio=0.5)
    cfg = UpstreamConfig(host="pay", retry=RetryConfig(attempts=1), breaker=breaker)
    return Policy(upstreams=(cfg,))


async def test_two_transports_with_equal_policies_on_one_store_share_their_breaker() -> None:
    """Two transports with equal, separately built policies on one memory store: each
    call reset the breaker the other had counted (the store compared configs by
    identity), so twenty failing calls never opened it."""
    sent: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.host)
        return httpx.Response(503)

    store, clock = MemoryStore(), FakeClock()
    clients = [
        httpx.AsyncClient(
            transport=FidelityTransport(
                httpx.MockTransport(upstream),
                engine=Engine(_policy(), clock=clock, rng=seeded_random(1), store=store),
                telemetry=False,
            )
        )
        for _ in range(2)
    ]
    refused = 0
    for i in range(20):
        try:
            response = await clients[i % 2].get("http://pay/x")
            assert response.status_code == 503
        except CircuitOpen:
            refused += 1
    assert len(sent) == 4  # min_calls failures open it, whichever client sent them
    assert refused == 16
    for client in clients:
        await client.aclose()


def test_an_equal_config_keeps_the_breaker_and_budget_a_different_one_starts_afresh() -> None:
    state = LocalState()
    first, same, other = (
        BreakerConfig(min_calls=2),
        BreakerConfig(min_calls=2),
        BreakerConfig(min_calls=3),
    )
    breaker = state.breaker_state("host:pay", first, 0.0)
    assert state.breaker_state("host:pay", same, 0.0) is breaker
    assert state.breaker_state("host:pay", other, 0.0) is not breaker

    window = state.budget_window("pay", RetryConfig(), 0.0)
    assert state.budget_window("pay", RetryConfig(), 0.0) is window
    assert state.budget_window("pay", RetryConfig(budget_ratio=0.5), 0.0) is not window
