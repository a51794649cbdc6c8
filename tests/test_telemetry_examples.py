"""examples/jaeger: the two services import and run in-process (their chain lands in one
trace with both services' decisions), and the compose file wires what the README says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from opentelemetry.trace import SpanKind

from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import Pipeline, decision_events, pipeline

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "jaeger"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"jaeger_example_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def two() -> Any:
    front, back = pipeline(), pipeline()
    yield front, back
    front.shutdown()
    back.shutdown()


async def test_example_services_run_in_process(two: tuple[Pipeline, Pipeline]) -> None:
    services = load("services")
    front, back = two
    clock = FakeClock()
    backend = services.create_backend(telemetry=back.telemetry, clock=clock)
    frontend = services.create_frontend(
        telemetry=front.telemetry,
        backend_url="http://backend:8001",
        backend_transport=httpx.ASGITransport(backend),
        clock=clock,
    )
    transport = httpx.ASGITransport(frontend)
    async with httpx.AsyncClient(transport=transport, base_url="http://frontend") as client:
        ok = await client.get("/orders/sku-1")
        failing = await client.get("/orders/sku-3", params={"fail": "1"})
    assert ok.json() == {"sku": "sku-1", "inventory_status": 200}
    assert failing.status_code == 502
    assert failing.json()["inventory_status"] == 503

    f_spans, b_spans = front.finished(), back.finished()
    assert len({s.context.trace_id for s in [*f_spans, *b_spans] if s.context}) == 2  # 2 calls
    f_server = [s for s in f_spans if s.kind is SpanKind.SERVER]
    f_client = [s for s in f_spans if s.kind is SpanKind.CLIENT]
    b_server = [s for s in b_spans if s.kind is SpanKind.SERVER]
    assert len(f_server) == 2
    assert len(f_client) == 1 + 3  # the failing order: 3 attempts (503 is retried)
    assert len(b_server) == 4
    client_ids = {s.context.span_id for s in f_client if s.context}
    for span in b_server:
        assert span.parent is not None
        assert span.parent.span_id in client_ids  # each backend request under its attempt
        assert decision_events(span)
    resends = sorted(dict(s.attributes or {}).get("http.request.resend_count", 0) for s in f_client)
    assert resends == [0, 0, 1, 2]
    failed_front = max(f_server, key=lambda s: s.start_time or 0)
    layers = {(e["fidelity.layer"], e["fidelity.verdict"]) for e in decision_events(failed_front)}
    assert ("retry", "retry") in layers  # the frontend's retry decisions, on its server span
    assert dict(failed_front.attributes or {})[schema.DECIDED_BY] == "app"


def test_traffic_script_imports() -> None:
    traffic = load("traffic")
    assert callable(traffic.main)


def test_compose_wires_jaeger_redis_and_both_services() -> None:
    compose = (EXAMPLE / "docker-compose.yml").read_text()
    for needle in (
        "jaegertracing/all-in-one",
        '"4318:4318"',
        '"16686:16686"',
        "redis:7",
        "services:create_backend",
        "services:create_frontend",
        "OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4318",
        "FIDELITY_STATE_URL: redis://redis:6379/0",
        "BACKEND_URL: http://backend:8001",
    ):
        assert needle in compose, needle
    readme = (EXAMPLE / "README.md").read_text()
    assert "fidelity.decided_by" in readme
    assert "http://localhost:16686" in readme
