"""OpenTelemetry export of decisions: traces, span events and metrics (docs/telemetry.md).

`Telemetry` is the observer; FidelityMiddleware and FidelityTransport use a
shared default one (global providers) unless given their own:

    from fidelity_mw.telemetry import Telemetry, configure_otel

    configure_otel(service_name="checkout")        # SDK + OTLP/HTTP from OTEL_* env vars
    app.add_middleware(FidelityMiddleware, policy=policy)

    # or explicit wiring, no globals:
    tel = Telemetry(tracer_provider=tp, meter_provider=mp)
    app.add_middleware(FidelityMiddleware, policy=policy, observer=tel)
    client = httpx.AsyncClient(transport=FidelityTransport(observer=tel))

Only `opentelemetry-api` is needed at run time; the SDK is imported by
`configure_otel` alone.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from . import schema
from .observer import Telemetry
from .otel_setup import OtelSetup, configure_otel

if TYPE_CHECKING:
    from ..engine import Engine
    from ..hooks import AttemptObserver, RequestObserver

_DEFAULT: Telemetry | None = None
_DEFAULT_LOCK = threading.Lock()


def default_telemetry() -> Telemetry:
    """The process-wide observer bound to the global providers (created on first use)."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = Telemetry()
    return _DEFAULT


def default_request_observer(engine: Engine) -> RequestObserver | None:
    return default_telemetry()


def default_attempt_observer(engine: Engine) -> AttemptObserver | None:
    return default_telemetry()


__all__ = [
    "OtelSetup",
    "Telemetry",
    "configure_otel",
    "default_attempt_observer",
    "default_request_observer",
    "default_telemetry",
    "schema",
]
