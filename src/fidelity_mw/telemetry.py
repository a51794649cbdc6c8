"""OpenTelemetry export of decisions (traces and metrics). Placeholder until the
telemetry work lands: returns no observers, so nothing is recorded."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine
    from .hooks import AttemptObserver, RequestObserver


def default_request_observer(engine: Engine) -> RequestObserver | None:
    return None


def default_attempt_observer(engine: Engine) -> AttemptObserver | None:
    return None
