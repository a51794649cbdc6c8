"""Our own answers through the app's CORS layer, when that layer sits inside us.

`app.add_middleware(FidelityMiddleware, ...)` added after the app's
`app.add_middleware(CORSMiddleware, ...)` (the README's two lines, appended to an
existing app) puts FidelityMiddleware outside CORS: a 429 or 503 of ours never passes
through it, and a browser, finding no `Access-Control-Allow-Origin`, reports a CORS
failure instead of the refusal, its `Retry-After` unreadable to the page. So the
middleware finds a Starlette `CORSMiddleware` below it once, when it is built, and
gives each of its own answers to a cross-origin request the headers that layer
would have added: computed by that layer itself (a copy of it around an app that only
starts a response), so its origins, credentials and exposed headers are the app's,
whatever the Starlette version. Preflights are left alone: CORS answers them itself,
and a refused preflight fails in the browser whatever headers it carries.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from .._types import Message, Receive, Scope, Send

# How far down the chain of `.app` attributes a CORS layer is looked for: the user's
# middleware stack, not the routes below it.
_MAX_DEPTH: Final = 32


def _cors_class() -> type | None:
    try:
        from starlette.middleware.cors import CORSMiddleware
    except ImportError:  # pragma: no cover - Starlette is a dependency
        return None
    return CORSMiddleware


def inner_cors(app: Any) -> Any | None:
    """The Starlette `CORSMiddleware` (or a subclass) among the middleware below `app`,
    nearest first; None when there is none. A Starlette app not built yet is read from
    its `user_middleware` (built as the app will build it)."""
    cls = _cors_class()
    if cls is None:
        return None
    seen: set[int] = set()
    node = app
    for _ in range(_MAX_DEPTH):
        if node is None or id(node) in seen:
            return None
        seen.add(id(node))
        if isinstance(node, cls):
            return node
        stack = getattr(node, "user_middleware", None)
        if isinstance(stack, list) and getattr(node, "middleware_stack", None) is None:
            for entry in stack:  # outermost first, as Starlette builds them
                kind = getattr(entry, "cls", None)
                if isinstance(kind, type) and issubclass(kind, cls):
                    build: Any = kind
                    try:
                        return build(_never_called, *entry.args, **entry.kwargs)
                    except Exception:  # not ours to fail: the app will say so itself
                        return None
            return None
        node = getattr(node, "middleware_stack", None) or getattr(node, "app", None)
    return None


async def _never_called(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise RuntimeError("fidelity_mw: a CORS copy's app is never called")


async def _no_body() -> Message:  # pragma: no cover - the start-only app reads nothing
    return {"type": "http.request", "body": b"", "more_body": False}


# Origins whose headers are kept: a flood of refusals to one page asks the layer once;
# a client sending ever new origins only clears the table.
_KNOWN_MAX: Final = 256


class CorsAnswers:
    """The headers the app's CORS layer adds to a response, per request `Origin` (and
    whether it sent cookies, which older Starlette versions answer differently): asked of
    the layer once each, for Starlette's own class (a subclass may decide per request,
    and is asked every time)."""

    __slots__ = ("_cacheable", "_known", "layer")

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        cls = _cors_class()
        self._cacheable = cls is not None and type(layer) is cls
        self._known: dict[tuple[bytes, bool], list[tuple[bytes, bytes]]] = {}

    async def headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """What the layer adds to a response to this request (none without `Origin`)."""
        origin: bytes | None = None
        cookie = False
        for item in scope.get("headers") or ():
            if isinstance(item, list | tuple) and len(item) == 2:
                name = item[0]
                if name == b"origin":
                    origin = bytes(item[1])
                elif name == b"cookie":
                    cookie = True
        if origin is None:
            return []
        if not self._cacheable:
            return await cors_headers(self.layer, scope)
        key = (origin, cookie)
        known = self._known.get(key)
        if known is None:
            known = await cors_headers(self.layer, scope)
            if len(self._known) >= _KNOWN_MAX:
                self._known.clear()
            self._known[key] = known
        return known


async def cors_headers(cors: Any, scope: Scope) -> list[tuple[bytes, bytes]]:
    """The headers `cors` adds to a response to this request, asked of the layer itself:
    a copy of it around an app that only starts a response."""
    added: list[tuple[bytes, bytes]] = []

    async def start_only(scope_: Scope, receive_: Receive, send_: Send) -> None:
        await send_({"type": "http.response.start", "status": 200, "headers": []})

    async def capture(message: Message) -> None:
        if message.get("type") == "http.response.start":
            added.extend((bytes(k), bytes(v)) for k, v in message.get("headers") or ())

    layer = copy.copy(cors)
    layer.app = start_only
    await layer(scope, _no_body, capture)
    return added


def with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """`send`, adding `extra` to the response start (a header the response sets itself,
    an `on_reject` hook's say, is kept; its `Vary` is merged with the layer's)."""

    async def sending(message: Message) -> None:
        if message.get("type") == "http.response.start":
            headers = list(message.get("headers") or ())
            have = {bytes(k).lower() for k, _ in headers}
            for k, v in extra:
                name = k.lower()
                if name not in have:
                    headers.append((k, v))
                elif name == b"vary":
                    # A cache must vary on both: keeping the hook's alone (`Vary:
                    # Accept`) served one origin's CORS answer to another origin.
                    headers = _merged_vary(headers, v)
            message = {**message, "headers": headers}
        await send(message)

    return sending


def _merged_vary(headers: list[Any], add: bytes) -> list[Any]:
    """`headers` with the field names of `add` in its first `Vary`, each once."""
    out: list[Any] = []
    merged = False
    for k, v in headers:
        if not merged and bytes(k).lower() == b"vary":
            merged = True
            value = bytes(v)
            names = {n.strip().lower() for n in value.split(b",")}
            if b"*" not in names:
                missing = [n.strip() for n in add.split(b",") if n.strip()]
                missing = [n for n in missing if n.lower() not in names]
                if missing:
                    value = (
                        b", ".join([value.strip(), *missing])
                        if value.strip()
                        else b", ".join(missing)
                    )
            out.append((k, value))
        else:
            out.append((k, v))
    return out
