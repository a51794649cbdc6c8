"""Shared pieces of the fault tests (no tests here): real servers on loopback and leak counters.

- `ServerThread`: uvicorn in a thread on a pre-bound 127.0.0.1 socket, with
  access to its event loop (to count its tasks) and a clean stop.
- `RawUpstream`: a raw asyncio HTTP/1.1 server in a thread that misbehaves on
  demand: answer, hang, reset the connection (RST) after reading a request,
  refuse connections (listening socket closed, same port reopened later),
  or answer 503. It counts every request it read, by method and request id.
- `FrontApp`: a Starlette service behind FidelityMiddleware whose routes call
  an upstream through FidelityTransport and map every httpx error to a 5xx
  other than 500, so any 500 the tests see is the middleware's.
- `Recorder`: a RequestObserver that keeps what each request decided.
- `fd_count` / `task_count`: what the tests compare before and after.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.context import DecisionContext
from fidelity_mw.errors import CircuitOpen, DeadlineExceeded

HOST = "127.0.0.1"
# How long a bounded wait on a real server may take: the servers here are threads of this
# process, and on a busy 2-core machine (compiled, load 10) a starved one answered past
# 5 s. A wait ends as soon as its condition holds, so the slack costs a passing test
# nothing; it only bounds a failing one.
PATIENCE_S = 60.0


def fd_count() -> int:
    """Open file descriptors of this process (sockets included)."""
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> dict[int, str]:
    """Open file descriptors of this process and what each is (`socket:[inode]`, a path),
    for a failure message that names what was left open."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return targets


def wait_until(predicate: Callable[[], bool], timeout_s: float = PATIENCE_S) -> bool:
    """Poll a condition for a bounded time (for shutdowns, never to wait out a window)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def _hold(port: int) -> socket.socket | None:
    """Bind `port` without listening: connections are refused as when nothing is there,
    and no other process's port-0 bind (how every test server here picks one) can take it
    before `up()` listens on it again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: the port's connections in TIME_WAIT must not stop the bind
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        return None
    return sock


class LoopThread:
    """An event loop in a daemon thread; run coroutines on it from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float = PATIENCE_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def task_count(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        return int(self.run(count()))

    def close(self) -> None:
        async def cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=PATIENCE_S)
        self.loop.close()


# ---------------------------------------------------------------- uvicorn


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a thread of its own."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self.app = app
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted connections
        # only when the listening socket says proto=TCP; with proto 0, Nagle and
        # delayed ACKs cost ~40 ms per response written in two parts.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_level="critical",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=1,
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(serve())

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        if not wait_until(lambda: self.server.started):
            raise RuntimeError("uvicorn did not start")
        return self

    def call(self, coro: Awaitable[Any], timeout: float = PATIENCE_S) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def task_count(self) -> int:
        """Tasks alive on the server's loop, not counting the one asking."""

        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        return int(self.call(count()))

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=PATIENCE_S)
        self.sock.close()


# ---------------------------------------------------------------- a misbehaving upstream

OK = "ok"
HANG = "hang"
RESET = "reset"  # read the request, then RST
UNAVAILABLE = "503"


class RawUpstream:
    """HTTP/1.1 on a raw asyncio server. `mode` may be switched at any time."""

    def __init__(self, mode: str = OK) -> None:
        self.mode = mode
        # port 0: the first start takes whatever the kernel gives and reads it back; a port
        # chosen first and bound later could go to another process on a shared machine
        self.port = 0
        self.hold: socket.socket | None = None  # keeps the port ours while down()
        self.hits: collections.Counter[str] = collections.Counter()  # "METHOD /path"
        self.ids: collections.Counter[str] = collections.Counter()  # "METHOD x-req-id"
        self.lock = threading.Lock()
        self.lt = LoopThread()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.release: asyncio.Event | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def up(self) -> None:
        """Listen (again, on the same port); a no-op while listening."""

        async def start() -> None:
            if self.release is None or self.release.is_set():
                self.release = asyncio.Event()  # a new hang phase
            if self.server is None:
                if self.hold is not None:
                    self.hold.close()
                    self.hold = None
                self.server = await asyncio.start_server(
                    self._handle, HOST, self.port, reuse_address=True
                )
                self.port = int(self.server.sockets[0].getsockname()[1])

        self.lt.run(start())

    def down(self) -> None:
        """Stop listening and drop every open connection: connection refused from now."""

        async def stop() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
                self.hold = _hold(self.port)
            for writer in list(self.writers):
                _rst(writer)
            if self.release is not None:
                self.release.set()

        self.lt.run(stop())

    def unhang(self) -> None:
        async def go() -> None:
            if self.release is not None:
                self.release.set()

        self.lt.run(go())

    def count(self, key: str) -> int:
        with self.lock:
            return self.hits[key]

    def max_per_id(self, method: str) -> int:
        """The most times one request id of `method` reached this upstream."""
        with self.lock:
            return max((n for k, n in self.ids.items() if k.startswith(method + " ")), default=0)

    def close(self) -> None:
        self.down()
        self.lt.close()
        if self.hold is not None:
            self.hold.close()
            self.hold = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                with self.lock:
                    self.hits[f"{method} {path}"] += 1
                    if "x-req-id" in headers:
                        self.ids[f"{method} {headers['x-req-id']}"] += 1
                mode = self.mode
                if mode == HANG:
                    assert self.release is not None
                    await self.release.wait()
                    _rst(writer)
                    return
                if mode == RESET:
                    _rst(writer)
                    return
                status, reason = (200, "OK") if mode == OK else (503, "Service Unavailable")
                body = b"ok" if status == 200 else b"down"
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
                    "content-type: text/plain\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.writers.discard(writer)
            if not writer.is_closing():
                writer.close()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---------------------------------------------------------------- the service under test


class Recorder:
    """Keeps, for every request the middleware handled, what it decided."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        record = {
            "path": scope.get("path"),
            "outcome": ctx.outcome,
            "decided_by": ctx.decided_by,
            "status": ctx.status,
            "disconnected": ctx.client_disconnected,
            "sources": [d.state_source for d in ctx.decisions],
            "decisions": [(d.layer, d.verdict, d.reason, d.state_source) for d in ctx.decisions],
            "at": time.monotonic(),
        }
        with self.lock:
            self.records.append(record)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)


class FrontApp:
    """The service under test: FidelityMiddleware around routes that call an upstream.

    Upstream errors become 502 (transport), 503 (breaker open) or 504
    (deadline): never 500. `client` lives on the server's loop.
    """

    def __init__(self, upstream_url: str, policy: Policy, **middleware: Any) -> None:
        self.upstream_url = upstream_url
        self.client: httpx.AsyncClient | None = None
        self.errors: collections.Counter[str] = collections.Counter()
        self.started = 0
        self.finished = 0

        async def proxy(request: Request) -> Response:
            return await self._call(
                "GET", "/" + request.path_params["rest"], request.headers.get("x-req-id")
            )

        async def pay(request: Request) -> Response:
            await request.body()
            return await self._call("POST", "/pay", request.headers.get("x-req-id"))

        async def stream(request: Request) -> Response:
            async def chunks() -> Any:
                for i in range(200):
                    yield b"chunk %d\n" % i
                    await asyncio.sleep(0.005)

            return StreamingResponse(chunks(), media_type="text/plain")

        async def hello(request: Request) -> Response:
            return PlainTextResponse("hello")

        app = Starlette(
            routes=[
                Route("/proxy/{rest:path}", proxy),
                Route("/pay", pay, methods=["POST"]),
                Route("/stream", stream),
                Route("/hello", hello),
            ]
        )
        self.app = app
        self.asgi = FidelityMiddleware(app, policy=policy, **middleware)

    async def _call(self, method: str, path: str, req_id: str | None) -> Response:
        if self.client is None:
            self.client = httpx.AsyncClient(
                transport=FidelityTransport(engine=self.asgi.engine, telemetry=False),
                timeout=5.0,
            )
        self.started += 1
        headers = {"x-req-id": req_id} if req_id else {}
        try:
            r = await self.client.request(method, self.upstream_url + path, headers=headers)
            return PlainTextResponse(r.text, status_code=r.status_code)
        except CircuitOpen:
            self.errors["circuit_open"] += 1
            return PlainTextResponse("upstream breaker open", status_code=503)
        except DeadlineExceeded:
            self.errors["deadline"] += 1
            return PlainTextResponse("deadline", status_code=504)
        except httpx.HTTPError as exc:
            self.errors[type(exc).__name__] += 1
            return PlainTextResponse("bad gateway", status_code=502)
        finally:
            self.finished += 1

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None


async def load(
    client: httpx.AsyncClient,
    requests: list[tuple[str, str, str]],
    concurrency: int = 8,
) -> list[tuple[str, int | str]]:
    """Send (method, path, req_id) requests, `concurrency` at a time.

    Returns (req_id, status) per request; an exception instead of a response
    is returned as its class name (the invariant says there must be none).
    """
    results: list[tuple[str, int | str]] = []
    queue = list(reversed(requests))

    async def worker() -> None:
        while queue:
            method, path, req_id = queue.pop()
            try:
                r = await client.request(method, path, headers={"x-req-id": req_id})
                results.append((req_id, r.status_code))
            except httpx.HTTPError as exc:
                results.append((req_id, type(exc).__name__))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results
