"""Real HTTP servers on loopback: uvicorn servers run as tasks of the demo's event loop.

The upstream instances are tiny pure-ASGI apps that follow the fault script
and count every request they receive (that count is the retry amplification's
numerator: upstream calls counted at the upstream servers).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections import Counter
from collections.abc import Generator

import uvicorn

from .._types import ASGIApp, Receive, Scope, Send
from .records import RunClock
from .scenario import INSTANCE_NAMES, FaultScript

_START_POLLS = 500  # x 10 ms: a server that has not started in 5 s is an error
_STOP_TIMEOUT_S = 5.0


class _QuietServer(uvicorn.Server):
    """No signal handlers: several servers share one loop (and maybe pytest's)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class RunningServer:
    """A uvicorn server bound to 127.0.0.1 on a free port, serving as a task."""

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            timeout_graceful_shutdown=1,
            backlog=1024,
        )
        self.server = _QuietServer(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(_START_POLLS):
            if self.server.started:
                return
            if self.task.done():
                self.task.result()  # raise what stopped it
                raise RuntimeError(f"server {self.name} exited during start-up")
            await asyncio.sleep(0.01)
        raise RuntimeError(f"server {self.name} did not start within 5 s")

    async def stop(self) -> None:
        task = self.task
        if task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), _STOP_TIMEOUT_S)
        except TimeoutError:
            self.server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        finally:
            self.sock.close()
            self.task = None


class Instance:
    """One upstream instance: `GET /work` answers 200, or 503 when the script says so."""

    def __init__(self, index: int, script: FaultScript, clock: RunClock, seed: int) -> None:
        self.index = index
        self.name = INSTANCE_NAMES[index]
        self.script = script
        self.clock = clock
        self.rng = random.Random(f"{seed}-instance-{index}")
        self.calls = 0
        self.statuses: Counter[int] = Counter()
        self.per_tick: Counter[int] = Counter()  # calls per 0.1 s of the run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        t = self.clock.now()
        self.calls += 1
        self.per_tick[int(t * 10)] += 1
        state = self.script.state(self.index, t)
        if state.added_latency_s > 0.0:
            await asyncio.sleep(state.added_latency_s)
        failed = state.error_rate > 0.0 and self.rng.random() < state.error_rate
        status = 503 if failed else 200
        self.statuses[status] += 1
        body = b'{"error":"unavailable"}' if failed else b'{"ok":true}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-instance", self.name.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class Fleet:
    """The upstream instances and their servers."""

    def __init__(self, script: FaultScript, clock: RunClock, seed: int) -> None:
        self.instances = [Instance(i, script, clock, seed) for i in range(script.instances)]
        self.servers = [RunningServer(inst, inst.name) for inst in self.instances]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def name_of(self, host_port: str) -> str:
        for server in self.servers:
            if host_port.endswith(f":{server.port}"):
                return server.name
        return host_port

    @property
    def calls(self) -> int:
        return sum(i.calls for i in self.instances)

    async def start(self) -> None:
        for server in self.servers:
            await server.start()

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers))
