"""The age of a service's `lb` decision on Redis state (the `FidelityStateStale` alert).

The pick's decision carried the age of the transport's knowledge of the picked
instance's breaker (`now - seen_at`): 20 s for a call 20 s after the last one, though
the attempt's gate had just read that breaker in Redis. So the example alert (p99 of
`fidelity.state.age` by layer above 5 s) fired under `fidelity_layer="lb"` for any
healthy service called less often than every ~5 s. Its age is now that of the state the
attempt goes on: the gate's answer when the gate read the instance's breaker; the
transport's knowledge when the pick goes around a breaker known open without reading it
(that knowledge is really as old as it says, and still counts).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

INSTANCES = ["http://10.0.0.7:8080", "http://10.0.0.8:8080"]
ALERTS = Path(__file__).resolve().parents[1] / "examples" / "prometheus" / "alerts.yml"


def _policy(redis_url: str, breaker: dict[str, Any] | None = None) -> Policy:
    service: dict[str, Any] = {"host": "payments", "instances": INSTANCES}
    if breaker is not None:
        service["breaker"] = breaker
        service["retry"] = {"attempts": 2}
    return Policy.from_dict({"upstream": [service], "state": {"url": redis_url, **PATIENT}})


def _lb_ages(response: httpx.Response) -> list[float]:
    ctx = response.extensions["fidelity_context"]
    return [d.state_age_s for d in ctx.decisions if d.layer == "lb"]


def _lb_histogram_max(reader: Any) -> float:
    points = [
        point
        for attrs, point in metric_points(reader, schema.METRIC_STATE_AGE)
        if attrs.get(schema.LAYER) == "lb"
    ]
    return max((point.max for point in points), default=0.0)


def _stale_alerts(reader: Any, tmp_path: Path) -> str:
    """The example `FidelityStateStale` evaluated by Prometheus's rule engine (`promtool
    test rules`) on the `lb` histogram recorded here, as scraped each minute for 30 min
    with the same calls each minute (nothing recorded: no series): the alerts firing at
    25 min, as promtool prints them when none were expected ("" when none fired)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    points = [
        point
        for attrs, point in metric_points(reader, schema.METRIC_STATE_AGE)
        if attrs.get(schema.LAYER) == "lb"
    ]
    series = []
    for point in points:  # none: every lb age was 0 (a fresh memory decision is not kept)
        total = 0
        for bound, n in zip([*point.explicit_bounds, "+Inf"], point.bucket_counts, strict=True):
            total += n
            le = bound if isinstance(bound, str) else repr(float(bound))
            name = "fidelity_state_age_seconds_bucket"
            labels = f'fidelity_layer="lb",fidelity_state_source="memory",le="{le}"'
            series.append({"series": f"{name}{{{labels}}}", "values": f"0+{total}x30"})
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "25m", "alertname": "FidelityStateStale", "exp_alerts": []}
                ],
            }
        ],
    }
    path = tmp_path / "stale_test.yml"
    path.write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120
    )
    if run.returncode == 0:
        return ""
    assert "FidelityStateStale" in run.stdout + run.stderr, run.stdout + run.stderr
    return run.stdout + run.stderr


async def test_a_rarely_called_healthy_service_is_not_stale(
    redis_url: str, redis_clock: RedisClock, tmp_path: Path
) -> None:
    clock = FakeClock()
    engine = Engine(_policy(redis_url), clock=clock, rng=seeded_random(3))
    p = pipeline()
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        engine=engine,
        observer=p.telemetry,
    )
    ages: list[float] = []
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(4):  # one call every 20 s: each instance's knowledge 20-40 s old
                response = await client.get("http://payments/x")
                assert response.status_code == 200
                ages += _lb_ages(response)
                clock.advance(20.0)
                redis_clock.set(redis_clock.now + 20.0)
        # before: [0.0, 20.0, 40.0, 20.0] or alike; the gate read each breaker fresh
        assert len(ages) == 4
        assert max(ages) < 1.0, ages
        assert _lb_histogram_max(p.metrics) < 1.0  # what the alert's quantile is over
        assert _stale_alerts(p.metrics, tmp_path) == ""  # before: fired under lb
    finally:
        await engine.aclose()
        p.shutdown()


async def test_a_pick_around_a_breaker_known_open_keeps_its_knowledges_age(
    redis_url: str, redis_clock: RedisClock, tmp_path: Path
) -> None:
    """Every instance's breaker known open: the panic pick goes around one without
    reading it, on what the transport learned 7 s ago. That age is real and is recorded."""
    clock = FakeClock()
    breaker = {
        "consecutive_failures": 1,
        "min_calls": 1,
        "open_min_s": 60.0,
        "open_s": 60.0,
        "open_jitter": 0.0,
    }
    engine = Engine(_policy(redis_url, breaker), clock=clock, rng=seeded_random(3))
    p = pipeline()
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)),
        engine=engine,
        observer=p.telemetry,
    )
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            first = await client.get("http://payments/x")  # both instances fail: both open
            assert first.status_code == 503
            clock.advance(7.0)
            redis_clock.set(redis_clock.now + 7.0)
            second = await client.get("http://payments/x")
            ctx = second.extensions["fidelity_context"]
            (lb,) = [d for d in ctx.decisions if d.layer == "lb"]
            assert lb.details["breaker_known_open"] is True
            # (7 s, and the retry's backoff the fake clock slept after the first failure)
            assert 7.0 <= lb.state_age_s < 8.0
        assert 7.0 <= _lb_histogram_max(p.metrics) < 8.0  # above the alert's 5 s
        assert 'fidelity_layer="lb"' in _stale_alerts(p.metrics, tmp_path)  # it fires
    finally:
        await engine.aclose()
        p.shutdown()
