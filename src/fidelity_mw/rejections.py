"""Rejection responses: the RFC 9457 problem document and the `on_reject` hook.

A control layer that turns a request away answers with an RFC 9457 problem
body by default. An application that needs another shape (its own error
envelope, HTML for browsers, a different status) passes
`on_reject(ctx, decision)`: it gets the request's decision context and the
decision that rejected it, and returns a Starlette `Response`, or None to keep
the default. `Retry-After` and the `RateLimit` fields are added to its
response unless it sets them itself: clients need them whatever the body.

A hook that raises, returns something that is not a response, or whose
response fails before it starts, falls back to the default: a rejection never
becomes a 500.

`upstream_failure_response(exc)` is the same shape for the app's own answer to
an upstream call that failed and that the middleware leaves to the app (a call
sent once: a POST without an `Idempotency-Key`, an upstream with one attempt).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import httpx
from starlette.responses import Response

from ._types import Message, Receive, Scope, Send
from .context import GIVE_UP, REJECT, SHED, Decision, DecisionContext
from .errors import CircuitOpen, DeadlineExceeded

logger = logging.getLogger("fidelity_mw")

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"

OnReject = Callable[[DecisionContext, Decision], Response | Awaitable[Response | None] | None]


def checked_on_reject(on_reject: object, owner: str) -> OnReject | None:
    """`on_reject` as given, refused at construction when it cannot be called: found only
    at the first refusal, each refusal logged a TypeError and fell back to the default
    answer, and the app's own shaping was silently never used."""
    if on_reject is not None and not callable(on_reject):
        raise TypeError(
            f"{owner}(on_reject=...) takes a callable (ctx, decision) -> Response | None, "
            f"not {type(on_reject).__name__}"
        )
    return on_reject


"""`on_reject(ctx, decision) -> Response | None` (may be a coroutine function)."""

# (status, headers, body): a rejection as the middleware builds it
RejectionParts = tuple[int, list[tuple[bytes, bytes]], bytes]

# Fields the default rejection carries that a custom response keeps unless it sets them.
_KEPT_HEADERS: Final = (
    b"retry-after",
    b"ratelimit",
    b"ratelimit-policy",
    b"x-ratelimit-limit",
    b"x-ratelimit-remaining",
    b"x-ratelimit-reset",
    b"x-fidelity-retry",
    # marks a refusal of ours: a caller's breaker does not count it against us
    b"x-fidelity-decided-by",
)


_LEGACY_TRIO: Final = frozenset(
    (b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset")
)


def problem_document(
    status: int, title: str, detail: str, kind: str, **extra: Any
) -> dict[str, Any]:
    """An RFC 9457 problem document as a dict (`type` is a URN per kind of rejection)."""
    return {
        "type": f"urn:fidelity-mw:problem:{kind}",
        "title": title,
        "status": status,
        "detail": detail,
        **extra,
    }


def rejecting_decision(ctx: DecisionContext) -> Decision:
    """The decision that turned the request away: the last reject, shed or (for a
    refusal that escaped the app) the outbound layer's give-up."""
    for decision in reversed(ctx.decisions):
        if decision.verdict in (REJECT, SHED, GIVE_UP):
            return decision
    # An exception raised by the app itself carries no record: name the layer that
    # answered, so the hook still knows what it is shaping.
    return Decision(ctx.decided_by or "unknown", ctx.route, REJECT, "rejected")


async def call_on_reject(
    on_reject: OnReject, ctx: DecisionContext, decision: Decision
) -> Response | None:
    """Run the hook; None (the default response) when it declines or fails."""
    try:
        answer: Any = on_reject(ctx, decision)
        if inspect.isawaitable(answer):
            answer = await answer
    except Exception:
        logger.exception("fidelity_mw: on_reject failed; sending the default problem body")
        return None
    if answer is None:
        return None
    if not isinstance(answer, Response):
        logger.error(
            "fidelity_mw: on_reject returned %s, not a starlette Response; "
            "sending the default problem body",
            type(answer).__name__,
        )
        return None
    return answer


def keep_headers(response: Response, headers: Sequence[tuple[bytes, bytes]]) -> Response:
    """The response with the rejection's Retry-After / RateLimit fields it does not set:
    a copy when any are added. The hook's own response is never changed: a hook may
    return one it keeps for every refusal, and the fields of this refusal, added to it,
    would be those of every later one (being there, never set again)."""
    have = {name.lower() for name, _value in response.raw_headers}
    if not have.isdisjoint(_LEGACY_TRIO):
        # One limit's three values: the hook's `X-RateLimit-Limit` beside our `-Remaining`
        # and `-Reset` of another limit told a client a limit nobody has
        have |= _LEGACY_TRIO
    added = [(n, v) for n, v in headers if n in _KEPT_HEADERS and n not in have]
    if not added:
        return response
    kept = copy.copy(response)
    kept.raw_headers = [*response.raw_headers, *added]
    return kept


async def custom_rejection(
    on_reject: OnReject,
    ctx: DecisionContext,
    rejection: RejectionParts,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> Response | None:
    """The hook's response to a middleware rejection, with our headers kept; or None."""
    response = await call_on_reject(on_reject, ctx, rejecting_decision(ctx))
    if response is not None:
        response = keep_headers(response, [*rejection[1], *extra])
    return response


async def send_custom(
    response: Response,
    fallback: Callable[[Send], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Send the hook's response; if it fails before starting, send the default instead."""
    started = False

    async def watching_send(message: Message) -> None:
        nonlocal started
        started = True
        await send(message)

    try:
        await response(scope, receive, watching_send)
    except Exception:
        if started:
            raise  # half a response is out: nothing sound can follow it
        logger.exception("fidelity_mw: the on_reject response failed; sending the default")
        await fallback(send)


def problem_json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def upstream_failure_response(exc: httpx.HTTPError, detail: str | None = None) -> Response:
    """The app's answer to an upstream call that failed, in the middleware's shape.

    The middleware answers a retried call given up on by itself (502 `upstream-failed`,
    504 for a timeout) when the app lets the error out; a call sent once (a POST without
    an `Idempotency-Key`, `retry = { attempts = 1 }`) is the app's to answer:

        except httpx.HTTPError as exc:
            return upstream_failure_response(exc)

    gives the same RFC 9457 document (`type` `urn:fidelity-mw:problem:upstream-failed`,
    `upstream`, `detail`, or yours), status 502 (504 for a timeout; 503
    `upstream-throttled` for an upstream's 429),
    `application/problem+json`, `cache-control: no-store`. The middleware adds its
    `Retry-After` advice and `x-fidelity-retry` to it as to any 502-504 of the app's. A
    control refusal (`CircuitOpen`, `DeadlineExceeded`) is raised again, not answered:
    let out, the middleware answers it 503/504 with `Retry-After`, which is why the
    clause above needs no `except CircuitOpen: raise` before it.
    """
    if isinstance(exc, CircuitOpen | DeadlineExceeded):
        raise exc
    try:
        upstream: str | None = exc.request.url.host or None
    except RuntimeError:  # an error built without its request
        upstream = None
    timeout = isinstance(exc, httpx.TimeoutException)
    # (an upstream's 429 is its limit, not a bad gateway, and not the client's: 503)
    throttled = isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 429
    status = 504 if timeout else 503 if throttled else 502
    if detail is None:
        if isinstance(exc, httpx.HTTPStatusError):
            why = f"answered {exc.response.status_code}"
        else:
            why = f"failed ({type(exc).__name__})"
        detail = (f"upstream {upstream!r}" if upstream else "an upstream") + f" {why}"
    extra = {} if upstream is None else {"upstream": upstream}
    title = "Gateway Timeout" if timeout else "Service Unavailable" if throttled else "Bad Gateway"
    kind = "upstream-throttled" if throttled else "upstream-failed"
    document = problem_document(status, title, detail, kind, **extra)
    return Response(
        problem_json(document),
        status_code=status,
        headers={"cache-control": "no-store"},
        media_type=PROBLEM_MEDIA_TYPE,
    )
