"""Review 38: which answers to a websocket handshake give the route's units back.

A handshake is charged at admission; a refusal by a layer inside the app gives the units
back, as for HTTP. The handshake's answer was taken for such a refusal whenever a layer
had refused anything (`shed_by`) and the status was 400 or more: so an app whose optional
call an upstream's breaker refused, and that then closed the handshake for a reason of
its own (a bad token: the close before the accept, 403), got the client's unit back, and
a client could open handshakes for free for as long as that breaker stayed open. The
handshake now uses HTTP's rule (`refusals.reports_refusal`): after an outbound refusal,
only an answer that reports it (a 502/503/504 or 429 denial) gives the units back; any
4xx still does for a per-route form's own refusal (`Depends(fidelity.limit)`'s 429, or
its close where the server has no denial extension).

The handshake's context is not `current()` (docs/inbound.md), so the transport records
an outbound call made during a handshake on a context of its own: the app here makes
the handshake's context current for its call, as code of its own could."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.testing import FakeClock

EXTENSION = {"websocket.http.response": {}}


def _policy() -> Policy:
    opens = BreakerConfig(consecutive_failures=1, open_min_s=30.0, open_s=60.0)
    return Policy(
        rate_limits=(RateLimit(name="sockets", rate="9/h", burst=9),),
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=opens),),
    )


class App:
    """Calls the risk service during the handshake (its error handled: the call is
    optional), then answers as `answers` says: its own close, a 503 denial, the accept."""

    def __init__(self, clock: FakeClock) -> None:
        def refused(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        self.client = httpx.AsyncClient(
            transport=FidelityTransport(
                httpx.MockTransport(refused), policy=_policy(), clock=clock, telemetry=False
            )
        )
        self.answers: list[str] = []
        self.shed: list[str | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        ctx: DecisionContext = scope["state"]["fidelity"]
        token = _CURRENT.set(ctx)
        try:
            await self.client.get("http://risk.internal/score")
        except httpx.HTTPError:
            pass  # optional: the handshake goes on without a score
        finally:
            _CURRENT.reset(token)
        self.shed.append(ctx.shed_by)
        answer = self.answers.pop(0)
        if answer == "close":  # its own reason (a bad token): 403 to the client
            await send({"type": "websocket.close", "code": 1008})
        elif answer == "deny":  # it reports the refusal
            headers = [(b"retry-after", b"30")]
            start = {"type": "websocket.http.response.start", "status": 503, "headers": headers}
            await send(start)
            await send({"type": "websocket.http.response.body", "body": b"risk is down"})
        else:
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})


def _handshake(mw: FidelityMiddleware) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    inbox = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [],
        "client": ("10.0.0.1", 5000),
        "extensions": EXTENSION,
    }
    asyncio.run(mw(scope, receive, send))
    return sent


def _remaining(accept: dict[str, Any]) -> int:
    value = dict(accept["headers"])[b"ratelimit"].decode()
    return int(value.split(";r=")[1].split(";")[0])


def test_a_close_of_the_apps_own_after_a_refused_optional_call_is_charged() -> None:
    clock = FakeClock()
    app = App(clock)
    mw = FidelityMiddleware(app, policy=_policy(), clock=clock, telemetry=False)
    app.answers = ["close", "close", "deny", "accept"]
    first = _handshake(mw)  # the call fails: the risk service's breaker opens
    closed = _handshake(mw)  # the call is refused (CircuitOpen); the app closes: its own
    denied = _handshake(mw)  # refused again; the app answers 503: it reports the refusal
    accepted = _handshake(mw)
    assert app.shed == [None, "breaker", "breaker", "breaker"]
    assert first[0]["type"] == closed[0]["type"] == "websocket.close"
    assert denied[0]["status"] == 503
    assert accepted[0]["type"] == "websocket.accept"
    # 9 units: the first close, the second close (was given back) and this accept
    # spent; the 503 denial that reports the refusal gave its unit back
    assert _remaining(accepted[0]) == 9 - 3


def test_a_forms_refusal_closing_the_handshake_still_gives_the_units_back() -> None:
    """Where the server has no denial extension, a form's 429 becomes a close (403):
    still its refusal, and refunded (HTTP's rule: any 4xx for a form's own refusal)."""
    from fidelity_mw.context import LAYER_RATELIMIT

    answers = ["form", "accept"]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        if answers.pop(0) == "form":
            scope["state"]["fidelity"].shed_by = LAYER_RATELIMIT  # (as Fidelity.limit does)
            await send({"type": "websocket.close", "code": 1008})
        else:
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})

    mw = FidelityMiddleware(app, policy=_policy(), clock=FakeClock(), telemetry=False)
    assert _handshake(mw)[0]["type"] == "websocket.close"
    accepted = _handshake(mw)
    assert _remaining(accepted[0]) == 9 - 1  # the form's close gave its unit back
