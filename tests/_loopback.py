"""Real HTTP servers on loopback for integration tests: uvicorn in a background thread.

    with LoopbackServer(app) as server:
        httpx.get(server.url + "/path")

The socket is bound before the thread starts (port 0: a free port), so there
is no race for the port; `__exit__` stops the server and joins the thread.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

import redis_server

_START_TIMEOUT_S = 10.0


class LoopbackServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", **options: Any) -> None:
        self.app = app
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="error",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            **options,  # (ssl_certfile=... for HTTPS)
        )
        self.scheme = "https" if options.get("ssl_certfile") else "http"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.server.started:  # startup only: a few milliseconds
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("loopback server did not start")
            time.sleep(0.002)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def refused_port() -> int:
    """A loopback port nobody listens on: bound (not listening) for the session, so no
    other process's server takes it (released, it could, and then answered)."""
    return redis_server.refused_port()
