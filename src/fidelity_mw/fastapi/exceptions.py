"""The exceptions a form raises when it turns a request away; FastAPI handlers catch them."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

from ..context import (
    Decision,
    DecisionContext,
)
from ..errors import FidelityError

# ---------------------------------------------------------------- exceptions


class Rejected(FidelityError, HTTPException):
    """A per-route form turned the request away. Catch it with `app.exception_handler`.

    `ctx` is the request's decision context, `decision` the rejecting decision,
    `problem` the RFC 9457 document the default handler sends, `headers` the
    response fields it sends with it (`Retry-After`, `RateLimit`, ...).
    """

    def __init__(
        self,
        status_code: int,
        problem: dict[str, Any],
        headers: dict[str, str],
        ctx: DecisionContext,
        decision: Decision,
        decided_by: str | None = None,
    ) -> None:
        # The marker a caller's breaker and retries read (as on the middleware's own
        # answers): this 429/503/504 is a control decision, not the service failing.
        # (`decided_by`: what decided when it is not the decision's layer, e.g. `state`)
        by = decided_by or ctx.decided_by or decision.layer
        marked = {**headers, "x-fidelity-decided-by": by}
        HTTPException.__init__(self, status_code, str(problem["detail"]), marked)
        self.problem = problem
        self.ctx = ctx
        self.decision = decision


class RateLimited(Rejected):
    """429: a `Fidelity.limit` dependency's limit is exhausted for this client key."""


class BreakerOpen(Rejected):
    """503: the route's breaker sheds (raised by the route class without the middleware)."""


class DeadlineExpired(Rejected):
    """504: the request's deadline passed (raised by the route class without the middleware)."""
