"""What the middleware answers by itself: RFC 9457 problem documents, sent in two
messages, and the outcome vocabulary the context and telemetry share."""

from __future__ import annotations

import json
from typing import Any, Final

from .._types import Message, Send
from ..context import _CURRENT, LAYER_RATELIMIT, DecisionContext
from ..decide.gcra import retry_after_header

# Final: the compiled build inlines them (no module lookup per request)
OUTCOME_SERVED: Final = "served"
OUTCOME_FAILED: Final = "failed"
OUTCOME_REJECTED: Final = "rejected"
OUTCOME_SHED: Final = "shed"
OUTCOME_EXPIRED: Final = "expired"
OUTCOME_DISCONNECTED: Final = "disconnected"
DECIDED_BY_APP: Final = "app"

# The reason of a decision taken without the store (`state_error:<exception>`).
STATE_ERROR: Final = "state_error:"


def shed_outcome(ctx: DecisionContext, layer: str) -> str:
    """The outcome of an error answer that a layer inside the app (`ctx.shed_by`, e.g. an
    outbound breaker, `Depends(limit)`) caused: "rejected" for a limit's over-limit 429,
    "shed" otherwise (a form whose state was unreachable, `on_error = "closed"`, shed the
    request as the middleware's own limits do then)."""
    if layer == LAYER_RATELIMIT:
        decision = ctx.last(LAYER_RATELIMIT)
        if decision is None or not decision.reason.startswith(STATE_ERROR):
            return OUTCOME_REJECTED
    return OUTCOME_SHED


PROBLEM_JSON = b"application/problem+json"
# On every response a control layer of ours produced (429/503/504 answered by the
# middleware, never by the app): a caller's breaker can tell our refusal from the
# service failing, and the layer's name says which decision it was.
DECIDED_BY_HEADER: Final = b"x-fidelity-decided-by"
EXHAUSTED = (b"x-fidelity-retry", b"exhausted")
# On our 5xx after a call whose failure the upstream's breaker counted: the breaker next
# to the fault owns it, not our callers' breakers for us (context.upstream_failed).
UPSTREAM_FAULT = (b"x-fidelity-fault", b"upstream")

Headers = list[tuple[bytes, bytes]]
# status, extra headers, body; the content headers and the decided-by marker are added
# when it is sent.
Rejection = tuple[int, Headers, bytes]


def refusal_retry_after(seconds: float) -> str:
    """`Retry-After` of a refusal: whole seconds, rounded up, at most a year, and at
    least 1 whatever the layer's wait (0, negative or NaN from a store or an exception
    of the app's): a refusal never tells its callers to come back at once."""
    value = retry_after_header(seconds)
    return "1" if value == "0" else value


def problem_body(status: int, title: str, detail: str, kind: str, **extra: Any) -> bytes:
    """An RFC 9457 problem document."""
    body = {
        "type": f"urn:fidelity-mw:problem:{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }
    return json.dumps(body, separators=(",", ":")).encode()


# What a client is told when the policy fails closed because the control state cannot
# decide, by why the store is without it (`fallback_why`). The problem's `type`
# (`state-unavailable`) and `title` stay the same whatever the reason: they are what a
# client may rely on; the `detail` is for a person, and accurate without naming anything
# internal (no host, no address, no exception text).
STATE_UNAVAILABLE_DETAILS: Final = {
    "unreachable": "the control state is unreachable and the policy says to fail closed",
    "read_only": "the control state is read-only for now and the policy says to fail closed",
    "error": "the control state failed to answer this request and the policy says to fail closed",
    "deadline": (
        "the control state did not answer before the request's deadline and the policy says "
        "to fail closed"
    ),
}
STATE_UNAVAILABLE_DETAIL: Final = (
    "the control state is unavailable and the policy says to fail closed"  # no reason known
)
_STATE_UNAVAILABLE_BODIES: dict[str | None, bytes] = {}


def state_unavailable_detail(why: object) -> str:
    """The problem `detail` of a fail-closed 503 for `fallback_why` `why` (a reason it does
    not know, or none: the general text; never the value itself)."""
    detail = STATE_UNAVAILABLE_DETAILS.get(why) if isinstance(why, str) else None
    return STATE_UNAVAILABLE_DETAIL if detail is None else detail


def state_unavailable_body(why: object) -> bytes:
    """The problem document of a fail-closed 503 (`state-unavailable`) for `why`, built
    once per reason."""
    key = why if isinstance(why, str) and why in STATE_UNAVAILABLE_DETAILS else None
    body = _STATE_UNAVAILABLE_BODIES.get(key)
    if body is None:
        body = _STATE_UNAVAILABLE_BODIES[key] = problem_body(
            503, "Service Unavailable", state_unavailable_detail(key), "state-unavailable"
        )
    return body


async def respond(send: Send, rejection: Rejection, decided_by: str | None) -> None:
    status, headers, body = rejection
    head = [
        (b"content-type", PROBLEM_JSON),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
    ]
    if decided_by is not None:
        head.append((DECIDED_BY_HEADER, decided_by.encode("latin-1", "replace")))
    start = {"type": "http.response.start", "status": status, "headers": head + headers}
    if type(send) is EndsOutside:
        # its two messages, known: to the server's `send` directly, the context swapped
        # around the last (a coroutine less per message than through the wrapper)
        await send.send(start)
        current = _CURRENT.get()
        _CURRENT.set(send.outer)
        try:
            await send.send({"type": "http.response.body", "body": body})
        finally:
            _CURRENT.set(current)
        return
    await send(start)
    await send({"type": "http.response.body", "body": body})


class EndsOutside:
    """The `send` of an answer the middleware sends itself (its refusals, an `on_reject`
    response, a cost function's HTTPException): the answer's last message goes to the
    server with `outer` current (what was current before the middleware made the
    request's context so: None, or an outer context), as the app's last message does
    (watch.ResponseWatcher). uvicorn arms its keep-alive timer inside that `send`, and
    `call_later` copies the current context: with the request's in it, every refused
    request's context lived on until its connection's next request (or the timeout).
    What was current comes back right after."""

    __slots__ = ("outer", "send")

    def __init__(self, send: Send, outer: DecisionContext | None) -> None:
        self.send = send
        self.outer = outer

    async def __call__(self, message: Message) -> None:
        kind: str = message["type"]
        if message.get("more_body", False) or not kind.endswith(_LAST_KINDS):
            await self.send(message)
            return
        # (`websocket.http.response.body` too: a handshake's denial)
        current = _CURRENT.get()
        _CURRENT.set(self.outer)
        try:
            await self.send(message)
        finally:
            _CURRENT.set(current)


# a response's last message: a body without `more_body`, or a whole file (ASGI extensions)
_LAST_KINDS: Final = ("response.body", "response.pathsend", "response.zerocopysend")
