"""`fidelity-mw demo`: a shortened run of the load-balancer-chaos scenario, and its metrics.

The shortened run (``--duration 20``: 9 s of load, both variants at once on
one clock, every timing of the scenario scaled down with it; 8 clients) takes
about 10 s. The
assertions rest on counts that do not depend on timing (calls per front
request, which layer failed a request, the same requests for both variants)
and keep slack where timing enters (healthy-path success). They held beside
three CPU-burning processes on a 2-core machine already at load average 13
(client p50 over 1 s in both variants).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import json
from typing import Any

import pytest

from fidelity_mw.demo.metrics import VariantResult
from fidelity_mw.demo.records import ClientRequest, DemoDecision, FrontRecord
from fidelity_mw.demo.report import METRIC_DEFINITIONS, render_table
from fidelity_mw.demo.scenario import ScenarioConfig
from fidelity_mw.tools import cli
from redis_server import refused_port

VARIANT_METRICS = {
    "label",
    "client_requests",
    "client_requests_succeeded",
    "client_requests_with_healthy_path",
    "healthy_path_requests_succeeded",
    "fidelity",
    "success_ratio",
    "front_requests",
    "front_statuses",
    "control_failures_while_healthy",
    "control_failures_while_healthy_by_layer",
    "undeserved_429s",
    "clients_throttled_undeserved",
    "responses_429",
    "upstream_calls",
    "upstream_calls_by_instance",
    "upstream_statuses",
    "retry_amplification",
    "upstream_calls_per_front_request",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_succeeded_p50_ms",
    "latency_succeeded_p99_ms",
    "decisions_total",
    "decisions_by_layer",
    "stale_decisions",
    "stale_decision_share",
    "stale_median_age_s",
    "stale_decisions_by_layer",
    "wall_s",
    "load_window_s",
    "per_second",
    "sample_requests",
}


def _run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["demo", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def short_run() -> dict[str, Any]:
    # 8 clients (not 20): the same story at a CPU cost that a busy machine still serves
    code, out, err = _run_cli("--duration", "20", "--seed", "1", "--clients", "8", "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)  # stdout is exactly one JSON document
    for name, v in doc["variants"].items():  # shown by `pytest -s`, and on failure
        print(
            f"{name}: fidelity {v['fidelity']:.3f}, amplification "
            f"{v['retry_amplification']:.2f}x, control failures while healthy "
            f"{v['control_failures_while_healthy']}, undeserved 429s {v['undeserved_429s']} "
            f"({v['clients_throttled_undeserved']} clients), p50/p99 "
            f"{v['latency_p50_ms']:.0f}/{v['latency_p99_ms']:.0f} ms, stale "
            f"{v['stale_decision_share']:.1%}"
        )
    print("scattered breaker:", doc["variants"]["scattered"]["breaker_events"])
    return doc


def test_fidelity_has_one_retry_layer(short_run: dict[str, Any]) -> None:
    fidelity = short_run["variants"]["fidelity"]
    scattered = short_run["variants"]["scattered"]
    # Structural, whatever the machine's load: one retry layer of 3 attempts per front
    # request, where the scattered stack multiplies app retries by sidecar retries (its
    # 12 calls per front request show only when the machine lets the storm happen, so
    # they are not compared here).
    assert fidelity["upstream_calls"] <= 3 * fidelity["front_requests"]
    assert scattered["upstream_calls"] <= 12 * scattered["front_requests"]


def test_fidelity_beats_scattered_on_healthy_request_success(short_run: dict[str, Any]) -> None:
    scattered = short_run["variants"]["scattered"]
    fidelity = short_run["variants"]["fidelity"]
    # the same seed gives both variants the same requests at the same offsets
    assert fidelity["client_requests"] == scattered["client_requests"]
    assert (
        fidelity["client_requests_with_healthy_path"]
        == scattered["client_requests_with_healthy_path"]
    )
    # A count that does not depend on timing: the balancer never refuses a service call
    # (panic threshold, ejection bound).
    assert "lb" not in fidelity["control_failures_while_healthy_by_layer"]
    # The direction, with slack for a loaded machine (timeouts hit both variants alike).
    assert fidelity["fidelity"] >= scattered["fidelity"] - 0.02


def test_variants_run_on_the_same_load(short_run: dict[str, Any]) -> None:
    # An ordering, whatever the machine's load: every variant's load starts at the same
    # instant (one clock), so a machine starved for a while starves them at the same
    # offsets. Run one after the other, fidelity's load began after scattered's had ended,
    # and CPU burners that started in between failed fidelity's clients alone (seed 1,
    # niced beside three burners: scattered 0.817, fidelity 0.000, no layer to blame).
    windows = {name: v["load_window_s"] for name, v in short_run["variants"].items()}
    assert len({start for start, _ in windows.values()}) == 1, windows
    assert max(start for start, _ in windows.values()) < min(end for _, end in windows.values())


def test_a_variant_that_cannot_start_stops_the_others() -> None:
    # The variants wait for each other before the load; one that fails while setting up
    # must not leave the others waiting (its error is the scenario's, not the barrier's).
    from fidelity_mw.demo import runner

    class Broken(RuntimeError):
        pass

    def broken_front(*args: Any, **kwargs: Any) -> Any:
        raise Broken("front")

    cfg = ScenarioConfig(seed=1, duration_s=4.0, clients=2)

    async def scenario() -> None:
        async with asyncio.timeout(120):  # a bound on a hang, not a measurement
            await runner.run_scenario(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "fidelity_front", broken_front)
        with pytest.raises(Broken):
            asyncio.run(scenario())


def test_fronts_are_built_before_the_load() -> None:
    # What a front builds lazily on its first request or call (Starlette's middleware
    # stack, the transport's telemetry observer: about 0.3 s of imports) is built in the
    # setup, before the variants' shared load starts, so that cost does not fall on one
    # variant's first requests alone.
    from fidelity_mw.demo.fronts import fidelity_front
    from fidelity_mw.demo.records import RunClock

    cfg = ScenarioConfig(seed=1, duration_s=20.0, clients=8)
    urls = [f"http://127.0.0.1:{port}" for port in (1, 2, 3)]
    names = ["up-a", "up-b", "up-c"]
    recorder, caller, engine = fidelity_front(cfg, urls, names, RunClock(), lambda t: True)
    assert engine.attempt_observer is not None
    assert caller.transport.observer_for(engine) is engine.attempt_observer
    assert recorder.app.middleware_stack is not None  # type: ignore[attr-defined]

    async def close() -> None:
        await caller.aclose()
        await engine.aclose()

    asyncio.run(close())


def test_fidelity_tells_clients_when_to_come_back(short_run: dict[str, Any]) -> None:
    fidelity = short_run["variants"]["fidelity"]
    # During the error burst every instance fails: their breakers open within 5 calls
    # each, and the 503s after a give-up carry the time until the first admits a probe
    # (an `advise` decision each). On a starved machine the burst may see too few calls
    # for every breaker to open (no breaker give-up, nothing to advise; seen beside CPU
    # burners): the advice is owed once a breaker refused a call.
    by_layer = fidelity["decisions_by_layer"]
    advised = sum(verdicts.get("advise", 0) for verdicts in by_layer.values())
    refused_by_breaker = by_layer.get("breaker", {}).get("give_up", 0)
    assert refused_by_breaker == 0 or advised > 0, by_layer
    assert advised <= fidelity["front_statuses"].get("503", 0)


def test_json_is_complete(short_run: dict[str, Any]) -> None:
    doc = short_run
    assert doc["demo"] == "load-balancer-chaos"
    assert doc["seed"] == 1
    assert doc["duration_s"] == 20.0
    assert doc["scenario"]["load_s_per_variant"] > 0
    kinds = {f["kind"] for f in doc["fault_timeline"]}
    assert kinds == {"degraded", "error_burst", "slow"}
    for fault in doc["fault_timeline"]:
        assert 0 <= fault["start_s"] < fault["end_s"] <= doc["scenario"]["load_s_per_variant"]
    assert doc["fidelity_policy"]["rate_limit"][0]["rate"] == "5/s"
    assert doc["fidelity_policy_version"]
    assert set(doc["metric_definitions"]) == set(METRIC_DEFINITIONS)
    assert set(doc["variants"]) == {"scattered", "fidelity"}  # the default `--variants`
    assert "toolkit_layers" not in doc
    for name, variant in doc["variants"].items():
        missing = VARIANT_METRICS - set(variant)
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert variant["client_requests"] > 50
        assert variant["upstream_calls"] == sum(variant["upstream_calls_by_instance"].values())
        assert 0.0 <= variant["fidelity"] <= 1.0
        assert variant["latency_p50_ms"] <= variant["latency_p99_ms"]
        assert variant["decisions_total"] == sum(
            sum(v.values()) for v in variant["decisions_by_layer"].values()
        )
        assert variant["sample_requests"], "decision lines for the first requests"
    # what each variant is made of shows in its decisions. The scattered stack's layers,
    # as the JSON names them; those every request or call passes log each time
    assert set(doc["scattered_layers"]) == {
        "limiter",
        "app_retry",
        "breaker",
        "client_retry",
        "load_balancer",
    }
    layers = doc["variants"]["scattered"]["decisions_by_layer"]
    assert {"breaker", "ratelimit", "lb"} <= set(layers)
    # Its retry layers log when they act, and a starved run may give them little to do
    # (beside three CPU burners: no call failed all four sidecar attempts, no app retry).
    # What they did is counted whatever the load: each upstream call past a call's first
    # is a sidecar retry, and each call the sidecar gave up on is the app's to retry or
    # give up (transport errors reach the app without a sidecar give-up: at least).
    breaker, sidecar = layers["breaker"], layers.get("client-retry", {})
    calls = breaker.get("allow", 0) + breaker.get("probe", 0)  # past the breaker: one get
    assert layers["lb"]["allow"] == calls + sidecar.get("retry", 0)
    assert sum(layers.get("app-retry", {}).values()) >= sidecar.get("give_up", 0)
    assert {"deadline", "breaker", "ratelimit", "retry", "lb"} <= set(
        doc["variants"]["fidelity"]["decisions_by_layer"]
    )
    # in-memory state: fidelity_mw never decides on stale data here
    assert doc["variants"]["fidelity"]["stale_decisions"] == 0
    assert doc["variants"]["fidelity"]["state_url"] == "memory://"


# ---------------------------------------------------------------- fast checks, no servers


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "matplotlib" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    code, out, err = _run_cli("--plot", "chaos.png", "--duration", "12")
    assert code == 2
    assert "matplotlib" in err
    assert "plot" in err
    assert out == ""


def test_a_state_url_of_another_scheme_is_a_usage_error() -> None:
    code, out, err = _run_cli("--redis", "mongodb://localhost/0", "--duration", "12")
    assert code == 2
    assert "argument --redis: 'mongodb://localhost/0' is not a Redis URL" in err
    assert out == ""


def test_duration_out_of_range_is_a_usage_error() -> None:
    code, _, _ = _run_cli("--duration", "1")
    assert code == 2


def test_fault_script_knows_when_a_healthy_path_exists() -> None:
    cfg = ScenarioConfig(duration_s=60.0)
    script = cfg.fault_script()
    burst = next(f for f in script.faults if f.kind == "error_burst")
    degraded = next(f for f in script.faults if f.kind == "degraded")
    assert script.healthy_path(0.0)
    assert script.healthy_instances(degraded.start_s + 0.01) == 2
    assert not script.healthy_path((burst.start_s + burst.end_s) / 2)
    assert script.healthy_path(burst.end_s + 0.01)
    assert 1.0 <= burst.end_s - burst.start_s <= 2.5  # a transient burst
    # shorter runs play the same story faster
    short = ScenarioConfig(duration_s=12.0)
    assert short.time_scale < cfg.time_scale
    assert short.breaker_open_s < cfg.breaker_open_s


def _front(seq: int, client: str, start: float, status: int, failed_by: str | None) -> FrontRecord:
    return FrontRecord(seq, client, start, True, start + 0.01, status, failed_by)


def _result(front: list[FrontRecord], requests: list[ClientRequest]) -> VariantResult:
    return VariantResult(
        name="scattered",
        label="scattered layers",
        client_requests=requests,
        front=front,
        upstream_calls=6,
        upstream_by_instance={"up-a": 6},
        upstream_statuses={"200": 6},
        upstream_per_tick={0: 6},
        wall_s=1.0,
        limit_count=2,
        limit_period_s=1.0,
    )


def test_undeserved_429_counts_only_admitted_requests() -> None:
    front = [
        # c1: two admitted in the window, then a 429: deserved (limit 2 per 1 s)
        _front(1, "c1", 0.0, 200, None),
        _front(2, "c1", 0.1, 200, None),
        _front(3, "c1", 0.2, 429, "ratelimit"),
        # c2: its earlier requests were shed by a breaker, not admitted: the 429 is undeserved
        _front(4, "c2", 0.0, 503, "breaker"),
        _front(5, "c2", 0.1, 503, "breaker"),
        _front(6, "c2", 0.2, 429, "ratelimit"),
        # c3: an upstream failure still counts as admitted traffic
        _front(7, "c3", 0.0, 503, "upstream"),
        _front(8, "c3", 0.1, 200, None),
        _front(9, "c3", 0.2, 429, "ratelimit"),
        # c1 again, after the window: nothing admitted in the last second -> undeserved
        _front(10, "c1", 1.5, 429, "ratelimit"),
    ]
    result = _result(front, [])
    assert result.undeserved_429s() == (2, 2, 4)
    assert dict(result.control_failures_while_healthy()) == {"breaker": 2, "ratelimit": 4}


def test_fidelity_amplification_and_staleness_definitions() -> None:
    requests = [
        ClientRequest("c1", 1, 0.0, True, 0.0, 0.1, True, 1, [200]),
        ClientRequest("c1", 2, 0.5, True, 0.5, 0.9, False, 2, [503, 503]),
        ClientRequest("c2", 1, 0.6, False, 0.6, 0.7, False, 1, [503]),
    ]
    front = [_front(1, "c1", 0.0, 200, None)]
    front[0].decisions = [
        DemoDecision(0.0, "breaker", "upstream", "allow", "closed", "snapshot", 2.5),
        DemoDecision(0.0, "breaker", "upstream", "allow", "closed", "snapshot", 0.5),
        DemoDecision(0.0, "ratelimit", "c1", "allow", "under_limit"),
        DemoDecision(0.0, "breaker", "upstream", "allow", "closed", "cache", 0.0),
    ]
    result = _result(front, requests)
    assert result.fidelity == 0.5  # one of the two healthy-path requests succeeded
    assert result.amplification == 2.0  # 6 upstream calls for 3 client requests
    share, median, stale, total = result.staleness()
    assert (stale, total) == (2, 4)
    assert share == 0.5
    assert median == 1.25  # of 2.5 s and 0.0 s (a cache read counts as stale at any age)
    table = render_table({"scattered": result, "fidelity": result}, ScenarioConfig())
    assert "50.0 % (1 / 2)" in table
    assert "2.00x (6 / 3)" in table


def test_a_redis_that_does_not_answer_is_said_before_the_run() -> None:
    # Run anyway, every fidelity decision would be the fallback's: an outage, unexplained.
    unused_port = refused_port()
    code, out, err = _run_cli("--redis", f"redis://127.0.0.1:{unused_port}/0", "--duration", "12")
    assert code == 1
    assert "Redis does not answer" in err
    assert f"127.0.0.1:{unused_port}" in err
    assert out == ""


def test_the_demo_runs_on_a_redis_that_answers(redis_url: str) -> None:
    from fidelity_mw.demo import _redis_unreachable
    from fidelity_mw.policy import StateConfig

    assert asyncio.run(_redis_unreachable(StateConfig(url=redis_url))) is None
