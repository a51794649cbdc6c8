"""A service's calls (`[[upstream]]` with `instances`) as the telemetry shows them.

Two defects, both from the transport naming a service's decisions by the service
(`payments`) while its attempts go to, and its breakers are kept for, its instances
(`10.0.0.7:8080`):

- **The CLIENT spans of a service's attempts carried no decision.** The observer took an
  attempt's decisions as the trailing run whose subject is the URL's `host:port`: the
  instance, which no decision names. So no `fidelity.decisions` and no `fidelity.decision`
  event on any of them (the retry's `delay_ms`, the instance the balancer picked, a
  half-open probe), where docs/telemetry.md says each CLIENT span carries the decisions
  that led to its attempt. A plain upstream's spans had them.
- **On Redis the breaker gauge listed a breaker that does not exist and none that does.**
  It reads the breakers there from decisions; it listed `payments` (closed, from the
  retry layer's decisions) and never an instance, so an instance whose breaker opened
  showed nowhere, while the memory store's gauge lists each instance's breaker
  (`10.0.0.7:8080` open). The balancer steers calls away from an open instance, so no
  decision ever named it open: what the transport learned of it (the outcome that opened
  it) does now.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

INSTANCES = ["http://10.0.0.7:8080", "http://10.0.0.8:8080"]


def _policy(state: dict[str, Any] | None = None, attempts: int = 3, tight: bool = True) -> Policy:
    service: dict[str, Any] = {
        "host": "payments",
        "instances": INSTANCES,
        "retry": {"attempts": attempts},
    }
    if tight:  # one failure opens an instance's breaker
        service["breaker"] = {"consecutive_failures": 1, "min_calls": 1}
    data: dict[str, Any] = {"upstream": [service]}
    if state is not None:
        data["state"] = state
    return Policy.from_dict(data)


def _gauge(reader: Any) -> list[tuple[str, str, str | None]]:
    return sorted(
        (a[schema.SUBJECT], a[schema.BREAKER_STATE], a.get(schema.BREAKER_SCOPE))
        for a, point in metric_points(reader, schema.METRIC_BREAKER_STATE)
        if point.value == 1
    )


@pytest.mark.anyio
@pytest.mark.parametrize("events", ["non_allow", "all"])
async def test_a_services_client_spans_carry_their_attempts_decisions(events: str) -> None:
    sent: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(503 if len(sent) < 3 else 200)

    p = pipeline(decision_events=events)
    engine = Engine(_policy(tight=False), clock=FakeClock())
    transport = FidelityTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get("http://payments/charge")
        assert response.status_code == 200
        spans = [s for s in p.finished() if s.kind.name == "CLIENT"]
        assert [s.attributes[schema.SERVER_ADDRESS] for s in spans] == [
            h.split(":")[0] for h in sent
        ]
        packed = [str(s.attributes.get(schema.DECISIONS)) for s in spans]
        assert "None" not in packed, packed  # before: no span had any
        # each attempt: the instance the balancer picked, then the retry layer's decision
        assert [p_.split(" ")[1].split("@")[0] for p_ in packed] == [
            "retry/allow/attempt",
            "retry/retry/status_503",
            "retry/retry/status_503",
        ], packed
        assert all(p_.startswith("lb/allow/") for p_ in packed), packed
        for span, instance in zip(spans, sent, strict=True):
            events_ = [dict(e.attributes or {}) for e in span.events]
            if events == "all":
                picked = [e for e in events_ if e[schema.LAYER] == "lb"]
                assert [e["fidelity.detail.instance"] for e in picked] == [instance]
        # a retry's event, with its backoff, on the span of the attempt it led to
        retries = [
            [dict(e.attributes or {}) for e in s.events if e.attributes[schema.VERDICT] == "retry"]
            for s in spans
        ]
        assert [len(r) for r in retries] == [0, 1, 1]
        assert [r[0]["fidelity.detail.attempt"] for r in retries[1:]] == [2, 3]
        assert all(r[0]["fidelity.detail.delay_ms"] >= 0.0 for r in retries[1:])
        assert all(r[0][schema.SUBJECT] == "payments" for r in retries[1:])
    finally:
        await engine.aclose()
        p.shutdown()


async def _open_one_instance_then_recover(
    state: dict[str, Any] | None, redis_clock: RedisClock | None
) -> tuple[list[Any], list[Any]]:
    bad = {"10.0.0.7"}

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.host in bad else 200)

    clock = FakeClock()
    engine = Engine(_policy(state, attempts=2), clock=clock, rng=seeded_random(7))
    p = pipeline()
    transport = FidelityTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(6):  # one of them reaches 10.0.0.7 first: its breaker opens
                assert (await client.get("http://payments/x")).status_code == 200
            during = _gauge(p.metrics)
            bad.clear()
            clock.advance(60.0)  # past any open time
            if redis_clock is not None:
                redis_clock.set(redis_clock.now + 60.0)
            for _ in range(20):  # probes to 10.0.0.7, then calls let through
                assert (await client.get("http://payments/x")).status_code == 200
            after = _gauge(p.metrics)
    finally:
        await engine.aclose()
        p.shutdown()
    return during, after


OPEN_ONE = [
    ("10.0.0.7:8080", "open", "upstream"),
    ("10.0.0.8:8080", "closed", "upstream"),
]
CLOSED_BOTH = [
    ("10.0.0.7:8080", "closed", "upstream"),
    ("10.0.0.8:8080", "closed", "upstream"),
]


@pytest.mark.anyio
async def test_on_memory_the_gauge_lists_each_instances_breaker() -> None:
    # the reference: the memory store's breakers, read directly
    during, after = await _open_one_instance_then_recover(None, None)
    assert during == OPEN_ONE
    assert after == CLOSED_BOTH


@pytest.mark.anyio
@pytest.mark.redis
async def test_on_redis_the_gauge_lists_the_instances_as_memory_does(
    redis_url: str, redis_clock: RedisClock
) -> None:
    # before: [("payments", "closed", "upstream")] both times
    during, after = await _open_one_instance_then_recover(
        {"url": redis_url, **PATIENT}, redis_clock
    )
    assert during == OPEN_ONE
    assert after == CLOSED_BOTH


def test_a_services_decisions_move_its_instances_series_not_the_services() -> None:
    """Decisions alone (a store the gauge cannot read): a probe and an attempt follow the
    instance the `lb` decision picked; a give-up with every instance known open (no
    instance picked) names no breaker of its own."""
    p = pipeline()
    engine = Engine(_policy())
    engine.store = object()  # type: ignore[assignment]  # a store it cannot read

    def call(*decisions: Decision) -> list[tuple[str, str, str | None]]:
        ctx = DecisionContext(engine=engine, route="/x", method="GET", started_at=0.0)
        for d in decisions:
            ctx.add(d)
        p.telemetry.call_end(ctx)
        return _gauge(p.metrics)

    def lb(instance: str, around_open: bool = False) -> Decision:
        details = {"instance": instance, "breaker_known_open": around_open}
        return Decision("lb", "payments", "allow", "p2c", "memory", 0.0, 1.0, details)

    attempt = Decision("retry", "payments", "allow", "attempt", "redis", 0.001, 1.0)
    retry = Decision("retry", "payments", "retry", "status_503", "redis", 0.001, 1.0)
    probe = Decision("breaker", "payments", "probe", "half_open_probe", "redis", 0.001, 1.0)
    refused = Decision("breaker", "payments", "give_up", "breaker_open", "redis", 0.001, 1.0)
    a, b = "10.0.0.7:8080", "10.0.0.8:8080"
    assert call(lb(a), attempt, lb(b), retry) == [
        (a, "closed", "upstream"),
        (b, "closed", "upstream"),
    ]
    assert call(lb(a), probe, attempt) == [(a, "half_open", "upstream"), (b, "closed", "upstream")]
    assert call(refused) == [(a, "half_open", "upstream"), (b, "closed", "upstream")]
    # sent around a breaker known open (panic): proves nothing of it
    assert call(lb(a, around_open=True), attempt) == [
        (a, "half_open", "upstream"),
        (b, "closed", "upstream"),
    ]
    p.shutdown()


@pytest.mark.anyio
async def test_the_map_names_the_breaker_keys_a_service_uses() -> None:
    """`fidelity-mw map`'s breaker row of a service named the key `upstream:{host[:port]}`
    (`upstream:payments`, which no call of a service with instances writes): an operator
    looking for it in Redis found nothing. Its breakers are its instances'."""
    from fidelity_mw.tools.statemap import from_policy

    policy = _policy(tight=False)
    (row,) = [
        r
        for r in from_policy(policy, "p.toml").layers
        if r.direction == "outbound" and r.layer == "breaker" and r.subject == "upstream payments"
    ]
    engine = Engine(policy, clock=FakeClock())
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)), engine=engine
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(4):
            await client.get("http://payments/x")
    used = sorted(engine.store.breakers)  # type: ignore[attr-defined]
    await engine.aclose()
    assert used, used
    assert all(k.startswith("upstream:10.0.0.") for k in used), used
    assert row.key == "upstream:{instance host:port}"  # before: upstream:{host[:port]}
    assert row.decides.startswith("one breaker per instance")
