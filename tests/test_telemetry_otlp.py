"""End to end: the real OTLP/HTTP exporters, set up by `configure_otel` from OTEL_* env
vars, against an OTLP receiver on loopback that decodes the protobuf."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
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
from fidelity_mw.telemetry import OtelSetup, Telemetry
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


def otlp_http_providers(endpoint: str, service: str) -> OtelSetup:
    """SDK providers exporting over the real OTLP/HTTP exporters, not set globally
    (`configure_otel` sets the global ones: its tests run in child processes)."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": service})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{endpoint}/v1/traces")))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(f"{endpoint}/v1/metrics"))
    mp = MeterProvider(resource=resource, metric_readers=[reader])
    return OtelSetup(tp, mp, owned=[tp, mp])


class StaleStore(MemoryStore):
    def admit_now(self, *args: Any, **kw: Any) -> Any:
        return super().admit_now(*args, **kw)._replace(source="cache", age_s=1.25)


async def test_real_otlp_exporter_carries_decisions_and_staleness(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = otlp_http_providers(receiver.endpoint, "orders-e2e")
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
    assert s_attrs.get("fidelity.decided_by", "app") == "app"
    assert s_attrs.get("fidelity.outcome", "served") == "served"
    assert s_attrs["fidelity.policy.version"] == pol.version
    assert s_attrs["fidelity.stale_decisions"] == 2
    assert r_attrs.get("fidelity.decided_by", "app") == "ratelimit"
    assert r_attrs.get("fidelity.outcome", "served") == "rejected"
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
        "ratelimit:one-per-s",  # a rate limit's entry names its limit
    ]

    names = {
        m.name
        for request in receiver.metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert {"fidelity.decisions", "fidelity.requests", "fidelity.state.age"} <= names


# ------------------------------------------------------------ configure_otel, in child processes

# configure_otel sets the process's global providers (once per process): each case runs
# a fresh interpreter that serves two requests through the middleware, then flushes.
CHILD = """
import asyncio, json, sys
import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.telemetry import configure_otel

async def ok(request):
    return PlainTextResponse("ok")

setup = configure_otel("fallback-name", service_version="1.2.3")
app = Starlette(routes=[Route("/ok", ok)])
policy = Policy(rate_limits=[RateLimit(name="one", rate="1/s", burst=1)])
app.add_middleware(FidelityMiddleware, policy=policy)

async def main():
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [(await client.get("/ok")).status_code for _ in range(2)]

statuses = asyncio.run(main())
setup.force_flush()
print(json.dumps({"statuses": statuses, "tracer": type(setup.tracer_provider).__module__}))
setup.shutdown()
"""


def run_child(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def resource_names(receiver: Receiver) -> set[str]:
    return {
        attrs(rs.resource.attributes).get("service.name")
        for request in receiver.traces
        for rs in request.resource_spans
    }


def metric_names(receiver: Receiver) -> set[str]:
    return {
        m.name
        for request in receiver.metrics
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_configure_otel_defaults_to_otlp_http_from_the_environment(receiver: Receiver) -> None:
    proc = run_child({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["statuses"] == [200, 429]
    assert receiver.content_types == {"application/x-protobuf"}
    assert resource_names(receiver) == {"fallback-name"}  # no name in the env: the fallback
    served, rejected = sorted(receiver.spans(), key=lambda span: span.start_time_unix_nano)
    assert attrs(served.attributes).get("fidelity.decided_by", "app") == "app"
    assert attrs(rejected.attributes).get("fidelity.decided_by", "app") == "ratelimit"
    assert {"fidelity.decisions", "fidelity.requests"} <= metric_names(receiver)


def test_configure_otel_env_service_name_wins_and_exporters_follow_the_env(
    receiver: Receiver,
) -> None:
    proc = run_child(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_SERVICE_NAME": "from-env",
            # `otlp` with no protocol: the SDK alone would pick gRPC; HTTP is the default
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
        }
    )
    assert proc.returncode == 0, proc.stderr
    assert resource_names(receiver) == {"from-env"}
    assert len(receiver.spans()) == 2
    assert receiver.metrics == []  # the SDK read OTEL_METRICS_EXPORTER


def test_configure_otel_exports_over_grpc() -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the SDK's gRPC exporter, to a real gRPC receiver."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    received: list[ExportTraceServiceRequest] = []

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> ExportTraceServiceResponse:
            received.append(request)
            return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        proc = run_child(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_METRICS_EXPORTER": "none",
            }
        )
    finally:
        server.stop(grace=None)
    assert proc.returncode == 0, proc.stderr
    spans = [
        s for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
    assert sorted(attrs(s.attributes).get("fidelity.decided_by", "app") for s in spans) == [
        "app",
        "ratelimit",
    ]


CONFIG_FILE = """
file_format: "1.0-rc.1"
resource:
  attributes:
    - name: service.name
      value: from-file
tracer_provider:
  processors:
    - batch:
        exporter:
          otlp_http:
            endpoint: {endpoint}/v1/traces
meter_provider:
  readers:
    - periodic:
        exporter:
          otlp_http:
            endpoint: {endpoint}/v1/metrics
"""


def test_configure_otel_applies_otel_config_file(receiver: Receiver, tmp_path: Any) -> None:
    path = tmp_path / "otel.yaml"
    path.write_text(CONFIG_FILE.format(endpoint=receiver.endpoint))
    # the file is the only source: an env exporter setting is ignored
    proc = run_child({"OTEL_CONFIG_FILE": str(path), "OTEL_TRACES_EXPORTER": "none"})
    assert proc.returncode == 0, proc.stderr
    assert resource_names(receiver) == {"from-file"}
    assert len(receiver.spans()) == 2
    assert {"fidelity.decisions", "fidelity.requests"} <= metric_names(receiver)


def test_config_file_gets_views_for_our_histograms(tmp_path: Any) -> None:
    from opentelemetry.configuration import load_config_file

    from fidelity_mw.telemetry.otel_setup import OUR_HISTOGRAMS, add_our_views

    path = tmp_path / "otel.yaml"
    path.write_text(CONFIG_FILE.format(endpoint="http://127.0.0.1:9"))
    config = load_config_file(str(path))
    add_our_views(config)
    add_our_views(config)  # idempotent: an instrument already selected is left alone
    views = {v.selector.instrument_name: v for v in config.meter_provider.views}
    assert set(views) == set(OUR_HISTOGRAMS)
    for name, view in views.items():
        assert view.selector.meter_name == "fidelity_mw"
        histogram = view.stream.aggregation.explicit_bucket_histogram
        assert tuple(histogram.boundaries) == OUR_HISTOGRAMS[name]


def test_sdk_disabled_configures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    from fidelity_mw.telemetry import configure_otel

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    setup = configure_otel("svc")
    assert isinstance(setup.tracer_provider, NoOpTracerProvider)
    assert isinstance(setup.meter_provider, NoOpMeterProvider)
    tel = Telemetry(tracer_provider=setup.tracer_provider, meter_provider=setup.meter_provider)
    from fidelity_mw.context import DecisionContext
    from fidelity_mw.engine import Engine

    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    assert tel.start(ctx, {"type": "http", "headers": []}) is None
    tel.end(ctx, {}, None)
