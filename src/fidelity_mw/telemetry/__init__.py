"""OpenTelemetry export of decisions: traces, span events and metrics (docs/telemetry.md).

`Telemetry` is the observer; FidelityMiddleware and FidelityTransport use a
shared default one (global providers) unless given their own:

    from fidelity_mw.telemetry import Telemetry, configure_otel

    configure_otel(service_name="checkout")   # the SDK's configurator: OTEL_* env / config file
    app.add_middleware(FidelityMiddleware, policy=policy)

    # or explicit wiring, no globals (OpenTelemetry's convention):
    app.add_middleware(FidelityMiddleware, policy=policy, tracer_provider=tp, meter_provider=mp)
    # one observer for both directions:
    tel = Telemetry(tracer_provider=tp, meter_provider=mp)
    app.add_middleware(FidelityMiddleware, policy=policy, observer=tel)
    client = httpx.AsyncClient(transport=FidelityTransport(observer=tel))

Only `opentelemetry-api` is needed at run time; the SDK (the `otel` extra) is
imported by `configure_otel` alone.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

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


def telemetry_for(tracer_provider: Any = None, meter_provider: Any = None) -> Telemetry:
    """The observer for `FidelityMiddleware(..., tracer_provider=, meter_provider=)` and the
    transports: explicit providers for this app only (a missing one: the global one)."""
    return Telemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)


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
    "telemetry_for",
]
