"""The live state page as a pure ASGI app: `GET /` (HTML) and `GET /state.json`."""

from __future__ import annotations

import hmac
import importlib.resources
import ipaddress
import json
import logging
import secrets
import weakref
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote, unquote_plus

from .._types import Receive, Scope, Send
from ..context import context_from_scope
from ..engine import Engine
from ..errors import PolicyError
from ..rejections import PROBLEM_MEDIA_TYPE, problem_document, problem_json
from .view import Since, key_hasher, render, snapshot_configs

logger = logging.getLogger("fidelity_mw.admin")
# what a JSON string written into the page's script must not hold as it is (`</script>`)
_SCRIPT_ESCAPES: Final = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


class AdminApp:
    """Mount it to see the live state: `app.mount("/_fidelity", AdminApp(engine))`.

    Off unless mounted. Without a `token` only loopback clients are served;
    with one, every client must send it (`Authorization: Bearer <token>`, or
    `?token=` for a browser), compared in constant time.

    `engine`: the engine whose store to show. Without one, the engine of the
    `FidelityMiddleware` the request passed through (mount the page inside the
    wrapped app). `top`: how many limiter keys to list. `top_breakers`: how many
    breakers (those not closed first when there are more), `top_budgets` how many
    retry budgets (the busiest first). `refresh_s`: how long the page waits after an
    answer before it fetches the JSON again.
    """

    def __init__(
        self,
        engine: Engine | None = None,
        *,
        token: str | None = None,
        top: int = 20,
        refresh_s: float = 2.0,
        top_breakers: int = 200,
        top_budgets: int = 200,
    ) -> None:
        _check_arguments(token, top, refresh_s, top_breakers, top_budgets)
        self.engine = engine
        self._token = token.encode() if token is not None else None
        self.top = top
        self.top_breakers = top_breakers
        self.top_budgets = top_budgets
        self.refresh_s = refresh_s
        self._since = Since()
        # Weak: keyed by id(), a hasher outlived its engine and passed to a new engine
        # given the same id (the page's key hashes then disagreed with its telemetry's).
        self._hashers: weakref.WeakKeyDictionary[Engine, Callable[[str], str]] = (
            weakref.WeakKeyDictionary()
        )
        self._page = (
            importlib.resources.files("fidelity_mw.admin")
            .joinpath("page.html")
            .read_text(encoding="utf-8")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own (not mounted)
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":  # no websocket here: refused, as Starlette's
            # Router refuses one it has no route for (before the accept, a server answers
            # the handshake 403); returning without a word left the client hanging
            await send({"type": "websocket.close", "code": 1000, "reason": ""})
            return
        if scope["type"] != "http":
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            # a 401 names the scheme it wants (RFC 9110 15.5.2)
            challenge = [(b"www-authenticate", b'Bearer realm="fidelity_mw"')]
            await _send(
                send,
                refusal[0],
                problem_json(refusal[1]),
                PROBLEM_MEDIA_TYPE,
                challenge if refusal[0] == 401 else None,
            )
            return
        if scope["method"] not in ("GET", "HEAD"):
            doc = problem_document(405, "Method Not Allowed", "read-only page", "admin-method")
            allow = [(b"allow", b"GET, HEAD")]
            await _send(send, 405, problem_json(doc), PROBLEM_MEDIA_TYPE, allow)
            return
        root = scope.get("root_path", "")
        path: str = scope["path"]
        if root and path.startswith(root):
            path = path[len(root) :]
        engine = self.engine
        if engine is None:
            ctx = context_from_scope(scope)
            engine = ctx.engine if ctx is not None else None
        if path in ("", "/"):
            await self._html(send, root)
        elif path == "/state.json":
            if engine is None:
                doc = problem_document(
                    503,
                    "Service Unavailable",
                    "no engine: pass AdminApp(engine) or mount it inside an app wrapped "
                    "by FidelityMiddleware",
                    "admin-no-engine",
                )
                await _send(send, 503, problem_json(doc), PROBLEM_MEDIA_TYPE)
                return
            body = json.dumps(await self.state(engine), separators=(",", ":")).encode()
            await _send(send, 200, body, "application/json")
        else:
            doc = problem_document(404, "Not Found", "see / and /state.json", "admin-not-found")
            await _send(send, 404, problem_json(doc), PROBLEM_MEDIA_TYPE)

    async def state(self, engine: Engine) -> dict[str, Any]:
        """The JSON document the page shows."""
        now = engine.clock.monotonic()
        configs = snapshot_configs(
            engine, top_breakers=self.top_breakers, top_budgets=self.top_budgets
        )
        snap = await engine.store.snapshot(now, top=self.top, configs=configs)
        hasher = self._hashers.get(engine)
        if hasher is None:
            hasher = self._hashers[engine] = key_hasher(engine)
        return render(
            engine,
            snap,
            now,
            self._since,
            hasher,
            top_breakers=self.top_breakers,
            top_budgets=self.top_budgets,
            configs=configs,
        )

    def _refusal(self, scope: Scope) -> tuple[int, dict[str, Any]] | None:
        if self._token is not None:
            token = self._token
            # every spelling compared (no early exit), each in constant time
            if any([hmac.compare_digest(seen, token) for seen in self._presented(scope)]):
                return None
            return 401, problem_document(
                401, "Unauthorized", "this page needs its token", "admin-token"
            )
        client = scope.get("client")
        if client and _loopback(client[0]) and not _forwarded(scope):
            return None
        return 403, problem_document(
            403,
            "Forbidden",
            "only loopback clients may see this page unless it has a token "
            "(a request a proxy forwarded is not one)",
            "admin-loopback-only",
        )

    @staticmethod
    def _presented(scope: Scope) -> list[bytes]:
        """The token the client presented, in each spelling it may have meant."""
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return [bytes(value[7:].strip())]
        query = scope.get("query_string", b"").decode("latin-1")
        for pair in query.split("&"):
            key, eq, raw = pair.partition("=")
            if eq and unquote_plus(key) == "token":
                # Percent-escapes are UTF-8, as the token itself is (junk as U+FFFD, back
                # to UTF-8: latin-1 could not encode "%E2%82%AC", a 500). A "+" is the
                # token's own "+" as typed or pasted into a URL (base64 tokens hold
                # them), or a space as a form encodes one: both spellings are tried.
                literal = unquote(raw).encode("utf-8", "replace")
                if "+" not in raw:
                    return [literal]
                return [literal, unquote_plus(raw).encode("utf-8", "replace")]
        return [b""]

    async def _html(self, send: Send, root: str) -> None:
        # The root path is the client's under a mount with a path parameter: in a script,
        # `</script>` (or `<!--`) in a JSON string would end it, so `<`, `>`, `&` are
        # written as JavaScript escapes (the string is the same to the script).
        url = json.dumps(root + "/state.json").translate(_SCRIPT_ESCAPES)
        # A fresh nonce per page: its own script and style run, nothing else would (an
        # injected script, as the root-path XSS was, is refused by the browser too).
        nonce = secrets.token_urlsafe(18)
        page = (
            self._page.replace("{{STATE_URL}}", url)
            .replace("{{REFRESH_MS}}", str(int(self.refresh_s * 1000)))
            .replace("{{NONCE}}", nonce)
        )
        policy = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        await _send(
            send,
            200,
            page.encode(),
            "text/html; charset=utf-8",
            [(b"content-security-policy", policy.encode())],
        )


# Headers a proxy adds. The server may already have turned one into scope["client"]
# (uvicorn and hypercorn do for the peers in their forwarded-allow-ips: with '*' any
# client's `X-Forwarded-For: 127.0.0.1` became a loopback peer), and a reverse proxy on
# the same host makes every client a loopback peer: either way the request came from
# somewhere else, so without a token it is refused.
_FORWARDING: Final = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})


def _forwarded(scope: Scope) -> bool:
    return any(name in _FORWARDING for name, _ in scope.get("headers", ()))


def _loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack server reports IPv4 peers as ::ffff:a.b.c.d
    return ip.is_loopback


# Every answer: nothing in it runs or loads anything, no page may frame it (the HTML
# page sends its own policy), and no URL of it (`?token=`) leaves as a Referer.
_LOCKED_DOWN: Final = b"default-src 'none'; frame-ancestors 'none'"


def _check_arguments(
    token: object, top: object, refresh_s: object, top_breakers: object, top_budgets: object
) -> None:
    """Bad arguments are refused where the page is built, naming the argument, as a policy's
    are (a PolicyError, a ValueError as before): a count that is not one failed every
    request for the page, a short token was a plain ValueError, a bytes one an
    AttributeError."""
    if token is not None:
        if not isinstance(token, str):
            raise PolicyError.at(
                "AdminApp.token", f"expected a str of at least 16 characters, got {_tname(token)}"
            )
        if len(token) < 16:
            raise PolicyError.at(
                "AdminApp.token",
                f"an admin token needs at least 16 characters, got {len(token)}: "
                'secrets.token_urlsafe(32) makes one (python -c "import secrets; '
                'print(secrets.token_urlsafe(32))")',
            )
    for name, value in (("top", top), ("top_breakers", top_breakers), ("top_budgets", top_budgets)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PolicyError.at(f"AdminApp.{name}", f"expected a count >= 0, got {value!r}")
    if (
        isinstance(refresh_s, bool)
        or not isinstance(refresh_s, int | float)
        or not 0.0 < refresh_s <= 86_400.0
    ):
        raise PolicyError.at(
            "AdminApp.refresh_s", f"expected seconds > 0 and <= 86400, got {refresh_s!r}"
        )


def _tname(value: object) -> str:
    return type(value).__name__


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        *(extra or ()),
    ]
    if not any(name == b"content-security-policy" for name, _ in headers):
        headers.append((b"content-security-policy", _LOCKED_DOWN))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
