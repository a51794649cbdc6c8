"""End to end: the real OTLP/HTTP exporters, set up by `configure_otel` from OTEL_* env
vars, against an OTLP receiver on loopback that decodes the protobuf."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.telemetry import Telemetry, configure_otel
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import call, starlette_app

pytestmark = pytest.mark.anyio


class Receiver:
    """A minimal OTLP/HTTP collector: /v1/traces and /v1/metrics, protobuf bodies."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.content_types: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.content_types.add(self.headers.get("content-type", ""))
                reply: Any
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                    reply = ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse()
                else:
                    self.send_error(404)
                    return
                out = reply.SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[Any]:
        return [
            span
            for request in self.traces
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


class StaleStore(MemoryStore):
    def admit_now(self, *args: Any, **kw: Any) -> Any:
        return super().admit_now(*args, **kw)._replace(source="cache", age_s=1.25)


async def test_real_otlp_exporter_carries_decisions_and_staleness(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "orders-e2e")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    setup = configure_otel(service_name="ignored-env-wins", set_global=False)
    try:
        tel = Telemetry(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider)
        pol = Policy(
            rate_limits=(RateLimit(name="one-per-s", rate="1/s", burst=1),),
            breaker=BreakerConfig(),
        )
        app = starlette_app()
        app.add_middleware(
            FidelityMiddleware, policy=pol, clock=FakeClock(), store=StaleStore(), observer=tel
        )
        assert (await call(app, "/ok")).status_code == 200
        assert (await call(app, "/ok")).status_code == 429
        setup.force_flush()
    finally:
        setup.shutdown()

    assert receiver.content_types == {"application/x-protobuf"}
    resource = attrs(receiver.traces[0].resource_spans[0].resource.attributes)
    assert resource["service.name"] == "orders-e2e"
    spans = receiver.spans()
    assert len(spans) == 2
    served, rejected = sorted(spans, key=lambda s: s.start_time_unix_nano)
    assert served.kind == served.SPAN_KIND_SERVER
    assert served.name == "GET /ok"
    s_attrs, r_attrs = attrs(served.attributes), attrs(rejected.attributes)
    assert s_attrs["fidelity.decided_by"] == "app"
    assert s_attrs["fidelity.outcome"] == "served"
    assert s_attrs["fidelity.policy.version"] == pol.version
    assert s_attrs["fidelity.stale_decisions"] == 2
    assert r_attrs["fidelity.decided_by"] == "ratelimit"
    assert r_attrs["fidelity.outcome"] == "rejected"
    assert r_attrs["http.response.status_code"] == 429

    # by default an event for the decision that was not `allow`, every one in the summary
    events = [attrs(e.attributes) for e in rejected.events if e.name == "fidelity.decision"]
    (reject,) = events
    assert reject["fidelity.layer"] == "ratelimit"
    assert reject["fidelity.verdict"] == "reject"
    assert reject["fidelity.reason"] == "over_limit"
    assert reject["fidelity.subject"] == "one-per-s"
    assert reject["fidelity.state.source"] == "cache"
    assert reject["fidelity.state.age_ms"] == 1250.0
    assert reject["fidelity.state.stale"] is True
    summary = r_attrs["fidelity.decisions"].split(" ")
    assert [p.split("/")[0] for p in summary if p.endswith("@cache+1250ms")] == [
        "breaker",
        "ratelimit",
    ]

    names = {
        m.name
        for request in receiver.metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {"fidelity.decisions", "fidelity.requests", "fidelity.state.age"} <= names


# ------------------------------------------------------------ configure_otel and the env


def _clear_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


def test_sdk_disabled_configures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    setup = configure_otel("svc", set_global=False)
    assert isinstance(setup.tracer_provider, NoOpTracerProvider)
    assert isinstance(setup.meter_provider, NoOpMeterProvider)
    tel = Telemetry(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider)
    from fidelity_mw.context import DecisionContext
    from fidelity_mw.engine import Engine

    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    assert tel.start(ctx, {"type": "http", "headers": []}) is None
    tel.end(ctx, {}, None)


async def test_console_exporter_and_service_name_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExportResult

    exported: list[Any] = []

    def export(self: Any, spans: Any) -> SpanExportResult:
        exported.extend(spans)
        return SpanExportResult.SUCCESS

    monkeypatch.setattr(ConsoleSpanExporter, "export", export)
    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    setup = configure_otel("fallback-name", service_version="1.2.3", set_global=False)
    try:
        tel = Telemetry(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider)
        app = starlette_app()
        app.add_middleware(FidelityMiddleware, policy=Policy(), clock=FakeClock(), observer=tel)
        assert (await call(app, "/ok")).status_code == 200
        setup.force_flush()
    finally:
        setup.shutdown()
    (span,) = exported
    assert span.attributes["fidelity.decided_by"] == "app"
    assert span.resource.attributes["service.name"] == "fallback-name"
    assert span.resource.attributes["service.version"] == "1.2.3"


def test_grpc_protocol_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _clear_otel_env(monkeypatch)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    setup = configure_otel("svc", set_global=False)
    setup.shutdown()
    assert "only http/protobuf is bundled" in caplog.text
