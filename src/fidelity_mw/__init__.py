"""fidelity_mw: retries, circuit breaking and rate limiting for ASGI apps and their httpx
calls, behind one per-request decision context, with traces that show who decided."""

from .asgi import FidelityMiddleware
from .context import Decision, DecisionContext, current
from .engine import Engine
from .errors import CircuitOpen, FidelityError, PolicyError, StateUnavailable
from .outbound import FidelitySyncTransport, FidelityTransport
from .policy import (
    BreakerConfig,
    DeadlineConfig,
    Policy,
    RateLimit,
    RetryConfig,
    RouteConfig,
    StateConfig,
    UpstreamConfig,
)

__all__ = [
    "BreakerConfig",
    "CircuitOpen",
    "DeadlineConfig",
    "Decision",
    "DecisionContext",
    "Engine",
    "FidelityError",
    "FidelityMiddleware",
    "FidelitySyncTransport",
    "FidelityTransport",
    "Policy",
    "PolicyError",
    "RateLimit",
    "RetryConfig",
    "RouteConfig",
    "StateConfig",
    "StateUnavailable",
    "UpstreamConfig",
    "current",
]
__version__ = "0.1.0"
