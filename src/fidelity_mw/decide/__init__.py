"""The pure decision core: rate limits, breakers, retry budgets, backoff, retry planning.

Synchronous arithmetic over explicit inputs: time (`now`) and randomness come
in as arguments, configuration as small frozen specs. Nothing here does I/O or
imports an adapter (ASGI, httpx, Redis, OpenTelemetry) or the policy loader.
The state stores hold these objects (memory) or mirror them (the Lua scripts),
and the differential tests hold every store to them.
"""

from .breaker import CLOSED, FAILURE, HALF_OPEN, IGNORED, OPEN, SUCCESS, BreakerState, Gate
from .budget import BudgetWindow, budget_allowance, budget_allows
from .gcra import LimitVerdict, gcra
from .retry import RetryPlan, backoff_delay, parse_retry_after, plan_retry
from .specs import (
    BreakerParams,
    BreakerSpec,
    BudgetParams,
    BudgetSpec,
    LimitSpec,
    RandomSource,
    RetryParams,
    RetrySpec,
)

__all__ = [
    "CLOSED",
    "FAILURE",
    "HALF_OPEN",
    "IGNORED",
    "OPEN",
    "SUCCESS",
    "BreakerParams",
    "BreakerSpec",
    "BreakerState",
    "BudgetParams",
    "BudgetSpec",
    "BudgetWindow",
    "Gate",
    "LimitSpec",
    "LimitVerdict",
    "RandomSource",
    "RetryParams",
    "RetryPlan",
    "RetrySpec",
    "backoff_delay",
    "budget_allowance",
    "budget_allows",
    "gcra",
    "parse_retry_after",
    "plan_retry",
]
