"""Observer protocols: how telemetry (or anything else) watches the adapters.

The middleware and the transports call these; `telemetry/` implements them.
Keeping the protocols here keeps the adapters independent of each other and
of OpenTelemetry.

The context parameter is a `DecisionContext`, declared `Ctx` (= Any) here: the
engine holds the observers and each context holds its engine, so naming the
class would close the import cycle context -> engine -> hooks -> context.
Implementations annotate it as `DecisionContext`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ._types import Scope

if TYPE_CHECKING:
    import httpx

# A fidelity_mw.context.DecisionContext (see the module docstring).
Ctx = Any


class RequestObserver(Protocol):
    """Inbound: `start` before the layers decide, `end` after the response (or error)."""

    def start(self, ctx: Ctx, scope: Scope) -> Any: ...

    def end(self, ctx: Ctx, scope: Scope, token: Any) -> None: ...


class AttemptObserver(Protocol):
    """Outbound: one call per attempt (the transport's CLIENT spans hang on this)."""

    def attempt_start(self, ctx: Ctx, request: httpx.Request, attempt: int) -> Any: ...

    def attempt_end(
        self, token: Any, response: httpx.Response | None, error: BaseException | None
    ) -> None: ...


class ResponseEndObserver(Protocol):
    """Optional extension of `RequestObserver` (looked up with `getattr`).

    `before_response_end` runs just before the middleware sends the last
    `http.response.body` message of a response - the app's or its own
    rejection - with the token `start` returned. An OpenTelemetry ASGI
    instrumentation outside the middleware ends its server span as soon as
    that message has gone through, before `end` runs; this is the last moment
    its span can still be annotated.
    """

    def before_response_end(self, ctx: Ctx, scope: Scope, token: Any) -> None: ...


class CallObserver(Protocol):
    """Optional extension of `AttemptObserver` (looked up with `getattr`).

    `call_end` runs once per outbound call made outside any inbound request
    (the transport created the DecisionContext), after its last attempt and
    give-up decision: no `RequestObserver.end` will ever see those decisions.
    """

    def call_end(self, ctx: Ctx) -> None: ...
