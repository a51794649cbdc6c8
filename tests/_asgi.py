"""An ASGI HTTP connection scope, built by hand for tests that call an ASGI app directly.

    scope = http_scope("/api/x", headers=[(b"host", b"t")], client=("203.0.113.7", 4711))
    await app(scope, receive, send)

Every field a server sets is there (ASGI 3.0); a test names only what it depends on.
`raw_path` is the path's bytes unless given; `headers` is used as given (a test may add
to the list afterwards), a tuple becomes a list; `extra` adds fields (`state={}`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Headers = Sequence[tuple[bytes, bytes]]


def http_scope(
    path: str = "/",
    method: str = "GET",
    headers: Headers | None = None,
    *,
    query_string: bytes = b"",
    client: tuple[str, int] | None = ("127.0.0.1", 5000),
    server: tuple[str, int] | None = ("testserver", 80),
    root_path: str = "",
    raw_path: bytes | None = None,
    scheme: str = "http",
    http_version: str = "1.1",
    spec_version: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    asgi = (
        {"version": "3.0"}
        if spec_version is None
        else {"version": "3.0", "spec_version": spec_version}
    )
    return {
        "type": "http",
        "asgi": asgi,
        "http_version": http_version,
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape") if raw_path is None else raw_path,
        "query_string": query_string,
        "root_path": root_path,
        "headers": []
        if headers is None
        else headers
        if isinstance(headers, list)
        else list(headers),
        "client": client,
        "server": server,
        **extra,
    }
