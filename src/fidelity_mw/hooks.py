"""Observer protocols: how telemetry (or anything else) watches the adapters.

The middleware and the transports call these; `telemetry.py` implements them.
Keeping the protocols here keeps the adapters independent of each other and
of OpenTelemetry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ._types import Scope

if TYPE_CHECKING:
    import httpx

    from .context import DecisionContext


class RequestObserver(Protocol):
    """Inbound: `start` before the layers decide, `end` after the response (or error)."""

    def start(self, ctx: DecisionContext, scope: Scope) -> Any: ...

    def end(self, ctx: DecisionContext, scope: Scope, token: Any) -> None: ...


class AttemptObserver(Protocol):
    """Outbound: one call per attempt (the transport's CLIENT spans hang on this)."""

    def attempt_start(self, ctx: DecisionContext, request: httpx.Request, attempt: int) -> Any: ...

    def attempt_end(
        self, token: Any, response: httpx.Response | None, error: BaseException | None
    ) -> None: ...
