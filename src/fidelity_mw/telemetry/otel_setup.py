"""`configure_otel()`: the OpenTelemetry SDK, set up by the SDK's own machinery.

One call for apps that have no OpenTelemetry setup yet. What to export, where
and how is read by the SDK itself, so every standard knob works as documented
upstream:

* `OTEL_CONFIG_FILE`: a declarative configuration file (YAML/JSON), applied by
  `opentelemetry-configuration` (install it to use files); the file is then the
  only source, as the SDK specifies;
* otherwise the `OTEL_*` environment variables, through the SDK's configurator:
  `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_EXPORTER`,
  `OTEL_METRICS_EXPORTER`, `OTEL_EXPORTER_OTLP_*` (HTTP/protobuf, or gRPC with
  `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` and `opentelemetry-exporter-otlp-proto-grpc`
  installed), `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`, ...;
* `OTEL_SDK_DISABLED=true`: configure nothing.

What fidelity_mw adds is its own only: like the OpenTelemetry distro, defaults
for unset variables (`OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER=otlp`,
`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`: the SDK alone would export
nothing), `service_name=` as a fallback name, and the bucket boundaries of its
histograms - carried by the instruments as advice, which the SDK honours, and as
views added to a configuration file's meter provider.

The SDK is imported here only (the `otel` extra): an app that never calls this
needs only `opentelemetry-api` at run time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from . import schema as s
from .metrics import DURATION_BUCKETS, STATE_AGE_BUCKETS
from .observer import (
    GLOBAL_PROVIDERS,
    INSTRUMENTATION_NAME,
    global_meter_provider,
    global_tracer_provider,
)

logger = logging.getLogger("fidelity_mw.telemetry")

OTEL_EXTRA_HINT = "pip install 'fidelity-mw[otel]'"
_TRUE = ("true", "1", "yes", "on")
# Set when unset, before the SDK reads the environment - as the OpenTelemetry distro
# does (it defaults to gRPC; the exporter bundled in the `otel` extra is OTLP/HTTP).
_ENV_DEFAULTS = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_METRICS_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
}
_GRPC_HINT = "pip install opentelemetry-exporter-otlp-proto-grpc"
# Our histograms and their bucket boundaries (the views a configuration file gets).
OUR_HISTOGRAMS: dict[str, tuple[float, ...]] = {
    s.METRIC_STATE_AGE: STATE_AGE_BUCKETS,
    s.METRIC_CLIENT_DURATION: DURATION_BUCKETS,
}


@dataclass
class OtelSetup:
    """What `configure_otel` set up. `shutdown()` flushes and stops what it created."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    owned: list[Any] = field(default_factory=list, repr=False)

    def force_flush(self, timeout_ms: int = 30_000) -> None:
        for provider in self.owned:
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                flush(timeout_ms)

    def shutdown(self) -> None:
        for provider in self.owned:
            stop = getattr(provider, "shutdown", None)
            if stop is not None:
                stop()
        self.owned.clear()


def _has_env_service_name() -> bool:
    if os.environ.get("OTEL_SERVICE_NAME", "").strip():
        return True
    return any(
        item.split("=", 1)[0].strip() == "service.name"
        for item in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    )


def configure_otel(
    service_name: str | None = None, *, service_version: str | None = None
) -> OtelSetup:
    """Set the global TracerProvider and MeterProvider up through the SDK's configurator.

    `service_name` / `service_version` are used when the environment (or the
    configuration file) names none. If global providers are already set they
    are kept and returned: nothing is added to them.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return OtelSetup(trace_api.NoOpTracerProvider(), metrics_api.NoOpMeterProvider())
    tracer_provider, meter_provider = global_tracer_provider(), global_meter_provider()
    if tracer_provider is not None or meter_provider is not None:
        logger.warning("fidelity_mw: OpenTelemetry providers are already set; keeping them")
        return OtelSetup(
            tracer_provider or trace_api.get_tracer_provider(),
            meter_provider or metrics_api.get_meter_provider(),
        )
    config_file = os.environ.get("OTEL_CONFIG_FILE", "").strip()
    if config_file:
        _configure_from_file(config_file)
    else:
        _configure_from_env(service_name, service_version)
    GLOBAL_PROVIDERS.refresh()  # observers pick the new providers up at once
    tracer, meter = trace_api.get_tracer_provider(), metrics_api.get_meter_provider()
    return OtelSetup(tracer, meter, owned=[tracer, meter])


def _configure_from_env(service_name: str | None, service_version: str | None) -> None:
    try:
        # The SDK's configurator, the one `opentelemetry-instrument` and the distros run
        # (its module is underscored; the class is the documented base for distros).
        from opentelemetry.sdk._configuration import _OTelSDKConfigurator
    except ImportError as exc:
        raise ImportError(f"configure_otel needs the OpenTelemetry SDK: {OTEL_EXTRA_HINT}") from exc

    attrs: dict[str, str] = {}
    if service_name and not _has_env_service_name():
        attrs["service.name"] = service_name
    if service_version:
        attrs["service.version"] = service_version
    for name, default in _ENV_DEFAULTS.items():
        if not os.environ.get(name, "").strip():
            os.environ[name] = default
    configure: Any = _OTelSDKConfigurator().configure  # type: ignore[no-untyped-call]
    try:
        configure(resource_attributes=attrs, setup_logging_handler=False)
    except RuntimeError as exc:
        if "otlp_proto_grpc" in str(exc):
            raise RuntimeError(f"OTLP over gRPC needs its exporter: {_GRPC_HINT}") from exc
        raise


def _configure_from_file(path: str) -> None:
    try:
        from opentelemetry.configuration import configure_sdk, load_config_file
    except ImportError as exc:
        raise ImportError(
            "OTEL_CONFIG_FILE is set: applying it needs opentelemetry-configuration "
            "(pip install opentelemetry-configuration)"
        ) from exc
    config = load_config_file(path)
    add_our_views(config)
    configure_sdk(config)


def add_our_views(config: Any) -> None:
    """Add a view per fidelity_mw histogram (its bucket boundaries) to a declarative
    configuration's meter provider, unless the file already selects that instrument."""
    meter_provider = getattr(config, "meter_provider", None)
    if meter_provider is None:
        return
    from opentelemetry.configuration import models

    views = list(meter_provider.views or [])
    chosen = {v.selector.instrument_name for v in views if v.selector is not None}
    for name, buckets in OUR_HISTOGRAMS.items():
        if name in chosen:
            continue
        views.append(
            models.View(
                selector=models.ViewSelector(instrument_name=name, meter_name=INSTRUMENTATION_NAME),
                stream=models.ViewStream(
                    aggregation=models.Aggregation(
                        explicit_bucket_histogram=models.ExplicitBucketHistogramAggregation(
                            boundaries=list(buckets)
                        )
                    )
                ),
            )
        )
    meter_provider.views = views
