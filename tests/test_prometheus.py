"""Prometheus, for real: the recipe in examples/prometheus (OpenTelemetry's Prometheus reader
behind /metrics) served by uvicorn on loopback, scraped by a real `prometheus` server
(the Debian package; scripts/test.sh installs it), the breaker-state gauge read back
through Prometheus's HTTP API; the example alert rules checked by `promtool` and
evaluated against the scraped series."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from fidelity_mw import BreakerConfig
from test_telemetry_helpers import UvicornThread, free_port

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prometheus"
INSTALL_HINT = "install Prometheus (Debian: apt-get install prometheus; scripts/test.sh does it)"
WAIT_S = 120.0  # a busy 2-core machine: Prometheus start, first scrapes


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} not found: {INSTALL_HINT}"
    return path


def example_app() -> Any:
    spec = importlib.util.spec_from_file_location("prometheus_example_app", EXAMPLE / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the example's policy, with a breaker that stays open however slow the scrapes are
    policy = replace(module.POLICY, breaker=BreakerConfig(consecutive_failures=3, open_s=3600.0))
    return module.create_app(policy=policy, registry=CollectorRegistry())


def test_the_scrape_is_answered_while_redis_is_away_with_on_error_closed() -> None:
    """ops8 walkthrough: the example's /metrics went through the route breaker, which with
    Redis state and on_error = "closed" answers 503 while Redis is unreachable: the scrape
    failed exactly when its fallback and breaker series were needed."""
    import asyncio

    from fidelity_mw.policy import StateConfig

    spec = importlib.util.spec_from_file_location("prometheus_example_app", EXAMPLE / "app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    down = StateConfig(
        url="redis://127.0.0.1:1/0", on_error="closed", timeout_ms=50, connect_timeout_ms=50
    )
    app = module.create_app(policy=replace(module.POLICY, state=down), registry=CollectorRegistry())

    async def scrape() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            orders = await client.get("/orders/1")
            assert orders.status_code == 503  # the API itself fails closed, as configured
            return [(await client.get("/metrics")).status_code for _ in range(2)]

    assert asyncio.run(scrape()) == [200, 200]


class Prometheus:
    """A prometheus server on a free loopback port, with its own config and storage."""

    def __init__(self, workdir: Path, target: str) -> None:
        shutil.copy(EXAMPLE / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "app", "static_configs": [{"targets": [target]}]}],
        }
        self.config_file = workdir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.logfile = workdir / "prometheus.log"
        self.log = self.logfile.open("w")
        # Prometheus binds the port itself, some time after free_port() let it go: on a
        # machine test sessions share, another process can take it in between. Then ours
        # exits (or another server answers there): start again on another port.
        for attempt in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={workdir / f'data{attempt}'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
            if self.ours_answers():
                return
            self.terminate()
        self.log.close()
        raise AssertionError("no free port stayed free for prometheus\n" + self.log_tail())

    def ours_answers(self) -> bool:
        """True once our process answers on the port (its flags name our config file);
        False when ours exited (the port was taken)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/status/flags"
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    flags = json.load(response)["data"]
                if flags.get("config.file") == str(self.config_file):
                    return True
            except (OSError, ValueError, KeyError, TypeError):
                pass  # not listening yet, or not a prometheus: ours exits if it cannot bind
            time.sleep(0.1)
        raise AssertionError(f"prometheus not answering after {WAIT_S} s\n" + self.log_tail())

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, ok: Any) -> list[dict[str, Any]]:
        """Poll until `ok(result)`; bounded, with short sleeps."""
        deadline = time.monotonic() + WAIT_S
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logfile.read_text()[-3000:]
            try:
                last = self.query(promql)
                if ok(last):
                    return last
            except OSError as exc:  # not listening yet
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"{promql}: still {last!r} after {WAIT_S} s\n" + self.log_tail())

    def log_tail(self) -> str:
        return self.logfile.read_text()[-3000:]

    def terminate(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.terminate()
        self.log.close()


@pytest.fixture
def served_app() -> Iterator[UvicornThread]:
    with UvicornThread(example_app()) as server:
        yield server


def test_prometheus_scrapes_the_breaker_state_and_decisions(
    served_app: UvicornThread, tmp_path: Path
) -> None:
    base = served_app.url
    with httpx.Client(base_url=base, timeout=10) as client:
        # three failures open the route breaker (consecutive_failures=3), the next is shed
        assert [client.get("/orders/1?fail=1").status_code for _ in range(3)] == [503] * 3
        shed = client.get("/orders/2")
        assert shed.status_code == 503
        assert "retry-after" in shed.headers
        assert "fidelity_breaker_state" in client.get("/metrics").text

    prometheus = Prometheus(tmp_path, f"127.0.0.1:{served_app.port}")
    try:
        open_now = prometheus.wait_for(
            'fidelity_breaker_state{fidelity_subject="/orders/{id}"} == 1',
            lambda result: len(result) == 1,
        )
        assert open_now[0]["metric"]["fidelity_breaker_state"] == "open"
        assert open_now[0]["metric"]["fidelity_breaker_scope"] == "route"

        decisions = prometheus.query(
            "sum by (fidelity_layer, fidelity_verdict) (fidelity_decisions_total)"
        )
        by_kind = {
            (r["metric"]["fidelity_layer"], r["metric"]["fidelity_verdict"]): float(r["value"][1])
            for r in decisions
        }
        assert by_kind[("breaker", "shed")] >= 1
        assert by_kind[("ratelimit", "allow")] >= 3

        # the shipped alert expressions run against the real series: the breaker alert
        # selects exactly the open breaker
        rules = yaml.safe_load((EXAMPLE / "alerts.yml").read_text())["groups"][0]["rules"]
        exprs = {rule["alert"]: rule["expr"] for rule in rules}
        firing = prometheus.query(exprs["FidelityBreakerOpen"])
        assert [r["metric"]["fidelity_subject"] for r in firing] == ["/orders/{id}"]
        for name, expr in exprs.items():
            prometheus.query(expr)  # every expression is valid PromQL on this server
            assert name.startswith("Fidelity")
    finally:
        prometheus.stop()


def test_example_alert_rules_and_config_pass_promtool() -> None:
    rules = subprocess.run(
        [tool("promtool"), "check", "rules", str(EXAMPLE / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 5 rules found" in rules.stdout + rules.stderr
    config = subprocess.run(
        [tool("promtool"), "check", "config", str(EXAMPLE / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=EXAMPLE,
    )
    assert config.returncode == 0, config.stdout + config.stderr
