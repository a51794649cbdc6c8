"""fidelity_mw: retries, circuit breaking and rate limiting for ASGI apps and their httpx
calls, behind one per-request decision context, with traces that show who decided."""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .buildinfo import compiled
    from .context import Decision, DecisionContext, current
    from .engine import Engine
    from .errors import CircuitOpen, FidelityError, PolicyError, StateUnavailable
    from .inbound import FidelityMiddleware
    from .inbound.checks import LimitCheck, LimitStatus, check_limits
    from .outbound import FidelitySyncTransport, FidelityTransport
    from .policy import (
        BreakerConfig,
        ConcurrencyConfig,
        DeadlineConfig,
        HedgeConfig,
        Policy,
        RateLimit,
        RetryConfig,
        RouteConfig,
        StateConfig,
        UpstreamConfig,
    )
    from .rejections import upstream_failure_response

# Public names load on first use, so importing one part of the package (the
# pure `fidelity_mw.decide`, say) does not import every adapter and its
# dependencies.
_LAZY = {
    "BreakerConfig": ".policy",
    "CircuitOpen": ".errors",
    "ConcurrencyConfig": ".policy",
    "DeadlineConfig": ".policy",
    "Decision": ".context",
    "DecisionContext": ".context",
    "Engine": ".engine",
    "FidelityError": ".errors",
    "FidelityMiddleware": ".inbound",
    "FidelitySyncTransport": ".outbound",
    "FidelityTransport": ".outbound",
    "HedgeConfig": ".policy",
    "LimitCheck": ".inbound.checks",
    "LimitStatus": ".inbound.checks",
    "Policy": ".policy",
    "PolicyError": ".errors",
    "RateLimit": ".policy",
    "RetryConfig": ".policy",
    "RouteConfig": ".policy",
    "StateConfig": ".policy",
    "StateUnavailable": ".errors",
    "UpstreamConfig": ".policy",
    "compiled": ".buildinfo",
    "check_limits": ".inbound.checks",
    "current": ".context",
    "upstream_failure_response": ".rejections",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fidelity_mw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "BreakerConfig",
    "CircuitOpen",
    "ConcurrencyConfig",
    "DeadlineConfig",
    "Decision",
    "DecisionContext",
    "Engine",
    "FidelityError",
    "FidelityMiddleware",
    "FidelitySyncTransport",
    "FidelityTransport",
    "HedgeConfig",
    "LimitCheck",
    "LimitStatus",
    "Policy",
    "PolicyError",
    "RateLimit",
    "RetryConfig",
    "RouteConfig",
    "StateConfig",
    "StateUnavailable",
    "UpstreamConfig",
    "check_limits",
    "compiled",
    "current",
    "upstream_failure_response",
]
__version__ = "0.1.0"
