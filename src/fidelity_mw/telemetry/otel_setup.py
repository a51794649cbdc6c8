"""`configure_otel()`: one call that sets up the OpenTelemetry SDK for apps that have none.

Everything comes from the standard `OTEL_*` environment variables, read by
the SDK and the OTLP/HTTP exporters themselves:

* `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` (win over `service_name=`,
  which is only the fallback);
* `OTEL_EXPORTER_OTLP_ENDPOINT` (default `http://localhost:4318`),
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._METRICS_ENDPOINT`, `..._HEADERS`,
  `..._TIMEOUT`, `..._COMPRESSION`;
* `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER`: `otlp` (default),
  `console`, `none`, or a comma-separated mix;
* `OTEL_TRACES_SAMPLER` / `..._ARG`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`;
* `OTEL_SDK_DISABLED=true`: configure nothing.

Only OTLP over HTTP/protobuf is bundled (`opentelemetry-exporter-otlp-proto-http`);
`OTEL_EXPORTER_OTLP_PROTOCOL=grpc` is reported and HTTP is used.

The SDK is imported here only, so an app that never calls this needs only
`opentelemetry-api` at run time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from .observer import GLOBAL_PROVIDERS, global_meter_provider, global_tracer_provider

logger = logging.getLogger("fidelity_mw.telemetry")

_TRUE = ("true", "1", "yes", "on")


@dataclass
class OtelSetup:
    """What `configure_otel` set up. `shutdown()` flushes and stops what it created."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    owned: list[Any] = field(default_factory=list, repr=False)

    def force_flush(self, timeout_ms: int = 30_000) -> None:
        for provider in self.owned:
            provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        for provider in self.owned:
            provider.shutdown()
        self.owned.clear()


def _exporters(kind: str) -> list[str]:
    raw = os.environ.get(f"OTEL_{kind}_EXPORTER", "otlp")
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    known = []
    for name in names:
        if name in ("otlp", "console", "none"):
            known.append(name)
        else:
            logger.warning("fidelity_mw: OTEL_%s_EXPORTER=%s is not supported here", kind, name)
    return [] if "none" in known else known


def _check_protocol(signal: str) -> None:
    protocol = os.environ.get(
        f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if protocol and protocol.strip().lower() != "http/protobuf":
        logger.warning(
            "fidelity_mw: OTLP protocol %r requested; only http/protobuf is bundled, using it",
            protocol,
        )


def _has_env_service_name() -> bool:
    if os.environ.get("OTEL_SERVICE_NAME", "").strip():
        return True
    return any(
        item.split("=", 1)[0].strip() == "service.name"
        for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )


def configure_otel(
    service_name: str | None = None,
    *,
    service_version: str | None = None,
    set_global: bool = True,
    traces: bool = True,
    metrics: bool = True,
    span_exporters: Sequence[Any] | None = None,
    metric_readers: Sequence[Any] | None = None,
) -> OtelSetup:
    """Configure an SDK TracerProvider and MeterProvider exporting over OTLP/HTTP.

    `service_name` is used when the environment names no service.
    `set_global=False` leaves the global providers alone (pass the returned
    providers to `Telemetry(tracer_provider=..., meter_provider=...)`).
    `span_exporters` / `metric_readers` replace the exporters the environment
    asks for (tests, custom pipelines). If a global provider is already set,
    it is kept and returned; nothing is added to it.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return OtelSetup(trace_api.NoOpTracerProvider(), metrics_api.NoOpMeterProvider())

    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    attrs: dict[str, str] = {}
    if service_name and not _has_env_service_name():
        attrs[SERVICE_NAME] = service_name
    if service_version:
        attrs[SERVICE_VERSION] = service_version
    resource = Resource.create(attrs)
    setup = OtelSetup(trace_api.NoOpTracerProvider(), metrics_api.NoOpMeterProvider())

    if traces:
        existing = global_tracer_provider() if set_global else None
        if existing is not None:
            logger.warning("fidelity_mw: a global TracerProvider is already set; keeping it")
            setup.tracer_provider = existing
        else:
            setup.tracer_provider = _tracer_provider(resource, span_exporters)
            setup.owned.append(setup.tracer_provider)
            if set_global:
                trace_api.set_tracer_provider(setup.tracer_provider)
    if metrics:
        existing_m = global_meter_provider() if set_global else None
        if existing_m is not None:
            logger.warning("fidelity_mw: a global MeterProvider is already set; keeping it")
            setup.meter_provider = existing_m
        else:
            setup.meter_provider = _meter_provider(resource, metric_readers)
            setup.owned.append(setup.meter_provider)
            if set_global:
                metrics_api.set_meter_provider(setup.meter_provider)
    GLOBAL_PROVIDERS.refresh()  # observers pick the new providers up at once
    return setup


def _tracer_provider(resource: Any, exporters: Sequence[Any] | None) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = SdkTracerProvider(resource=resource)
    if exporters is None:
        exporters = []
        for name in _exporters("TRACES"):
            if name == "otlp":
                _check_protocol("TRACES")
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                exporters.append(OTLPSpanExporter())
            else:
                exporters.append(ConsoleSpanExporter())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _meter_provider(resource: Any, readers: Sequence[Any] | None) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        PeriodicExportingMetricReader,
    )

    if readers is None:
        readers = []
        for name in _exporters("METRICS"):
            if name == "otlp":
                _check_protocol("METRICS")
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                    OTLPMetricExporter,
                )

                readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
            else:
                readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    return SdkMeterProvider(resource=resource, metric_readers=list(readers))
