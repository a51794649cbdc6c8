"""The multi-hop rig of tests/_hops38.py and _hops39.py, with what review 40's scenarios need.

client -> A -> B -> C x3 on real uvicorn (loopback), as before, and:

- every hop on an `Engine` of its own (memory state), kept on the `Chain`: a test reads
  each hop's breakers, budgets, bulkheads (`engine.bulkheads`) and, at B, the balancer's
  instances (requests in flight) after a fault;
- a hop style `cancel`: the handler races its upstream call against its own client
  leaving (`receive` says `http.disconnect`) and cancels the call when it does, as a
  handler that checks `request.is_disconnected()` would, or a server that cancels
  (Hypercorn, Daphne): a client that drops its connection cancels the whole chain, hop
  by hop (uvicorn itself does not cancel a handler);
- optional policies per hop (`a_policy`, `b_policy(instances)`, `c_policy`), a bulkhead
  on every hop by default (`concurrency`), so a slot that leaks shows;
- C's handler is `_hops39.c_handler` (its modes: `500`, `503`, `503ra`, `hang` until
  the caller goes away, `slow`, `reset`), and one more mode: `trickle` (the head at
  once, then a byte of body every `TRICKLE_S`, for up to `TRICKLE_FOR_S`); every route
  takes POST too (each hop passes the body and an `Idempotency-Key` on; C keeps every
  body it received: `Chain.received`, (request id, body) per call);
- `dynamic=True`: B finds C's instances through a resolver that reads `Chain.c_urls`
  (a test changes it while traffic flows), and `Chain.start_c(index)` starts another
  instance of C (a rolling restart: new ports);
- `clock=`: every hop's engine on that clock: a test moves the chain's breakers past
  their open periods with `clock.advance` instead of sleeping them out, while the
  network's timeouts (httpx's, the clients') stay real. A `FakeClock`'s sleeps advance
  it: the hops' own waits (backoff, a hedge's delay, a `Retry-After`) then move time on
  at once for every hop and every request in flight: not for scenarios that hedge or
  wait (C's deadlines expire under calls still running; one request's wait for C's
  `Retry-After: 1` aged every other request's 0.2 s retry hint at B past its end, and
  their 502s went out without `Retry-After`). `JumpClock` runs in real time, waits
  included, and only `advance` moves it on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import _hops38
import _hops39
from _loopback import LoopbackServer
from fidelity_mw import ConcurrencyConfig, Engine, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.decide.breaker import BreakerState
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

CONCURRENCY = ConcurrencyConfig(limit=64)
TRICKLE_S = 0.1
TRICKLE_FOR_S = 20.0
GONE = 499  # what a `cancel` hop's handler returns once its client left (nobody reads it)


class JumpClock:
    """Real time, waits included, that a test moves on between a scenario's phases
    (`advance`: past the breakers' open periods, with nothing in flight). Unlike a
    `FakeClock`, one request's wait (a backoff, a `Retry-After`) does not move time on for
    the requests beside it, nor a deadline's timer: no `call_later` here, so the
    middleware keeps its deadlines on the event loop's own timers, in real time."""

    def __init__(self, start: float = 1_000.0) -> None:
        self._offset = start - time.monotonic()

    def monotonic(self) -> float:
        return time.monotonic() + self._offset

    def wall(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self._offset += seconds

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


def with_bulkhead(policy: Policy) -> Policy:
    return dataclasses.replace(policy, concurrency=CONCURRENCY)


async def _client_gone(request: Request) -> None:
    """Until the client leaves: after the (bodiless) request, `receive` waits for it."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def hop_app(
    name: str,
    next_url: str,
    seen: _hops38.Seen,
    engine: Engine,
    client: httpx.AsyncClient,
    style: str,
) -> Any:
    """A service whose route /x/{route} calls `next_url` + route. `style` "cancel": the
    call is cancelled when the client leaves; else "raise" (`_hops38`'s: what escapes is
    the middleware's to answer)."""

    async def handler(request: Request) -> Response:
        route = request.url.path.rsplit("/", 1)[-1]
        headers = {"x-hop-id": request.headers.get("x-hop-id", "?")}
        key = request.headers.get("idempotency-key")
        if key is not None:
            headers["idempotency-key"] = key
        body = await request.body() if request.method == "POST" else None
        call = asyncio.ensure_future(
            client.request(request.method, next_url + route, headers=headers, content=body)
        )
        if style == "cancel":
            gone = asyncio.ensure_future(_client_gone(request))
            await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
                return Response(b"client gone", GONE)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        upstream = await call
        upstream.raise_for_status()
        return Response(upstream.content, upstream.status_code)

    app = Starlette(
        routes=[Route(f"/x/{r}", handler, methods=["GET", "POST"]) for r in _hops38.ROUTES]
    )
    app.add_middleware(
        FidelityMiddleware, engine=engine, observer=_hops38.Recorder(name, seen), telemetry=False
    )
    return app


def c_app(index: int, faults: _hops38.Faults, seen: _hops38.Seen, knobs: _hops39.Knobs,
          engine: Engine, received: list[tuple[str, bytes]]) -> Any:  # fmt: skip
    base = _hops39.c_handler(index, faults, seen, knobs)

    async def handler(request: Request) -> Response:
        if request.method == "POST":
            body = await request.body()
            with seen.lock:
                received.append((request.headers.get("x-hop-id", "?"), body))
        answer = await base(request)  # (counts the call)
        if faults.on(index, request.url.path.rsplit("/", 1)[-1]) != "trickle":
            return answer

        async def body() -> AsyncIterator[bytes]:
            for _ in range(int(TRICKLE_FOR_S / TRICKLE_S)):
                yield b"."
                await asyncio.sleep(TRICKLE_S)

        return StreamingResponse(body())  # (Starlette's: it ends when the caller leaves)

    app = Starlette(
        routes=[Route(f"/c/{r}", handler, methods=["GET", "POST"]) for r in _hops38.ROUTES]
    )
    app.add_middleware(
        FidelityMiddleware,
        engine=engine,
        observer=_hops38.Recorder(f"C{index}", seen),
        telemetry=False,
    )
    return app


@dataclass
class Chain:
    faults: _hops38.Faults
    seen: _hops38.Seen
    url: str  # A's base: url + "/x/<route>"
    c_hosts: tuple[str, ...]
    engines: dict[str, Engine]  # "A", "B", "C0".."C2" (and the instances started later)
    b_transport: FidelityTransport
    c_urls: list[str]  # what B's resolver names (`dynamic`)
    c_servers: dict[int, LoopbackServer]
    start_c: Callable[[int], str]  # start instance `index` of C; its base URL
    received: list[tuple[str, bytes]]  # (request id, body) of every POST that reached C

    def store(self, hop: str) -> MemoryStore:
        store = self.engines[hop].store
        assert isinstance(store, MemoryStore)
        return store

    def failures(self) -> dict[str, tuple[int, int, int, str]]:
        """Every breaker of every hop that counted a failure: (hop key) -> (failures in
        its window, consecutive, epoch, state)."""
        out = {}
        for hop, engine in self.engines.items():
            store = self.store(hop)
            now = engine.clock.monotonic()
            for key, state in list(store.breakers.items()):
                _calls, failed, _slow = state.totals(now)
                if failed or state.consecutive or state.epoch:
                    out[f"{hop} {key}"] = (failed, state.consecutive, state.epoch, state.state)
        return out

    def in_flight(self) -> dict[str, int]:
        """Requests each hop's bulkheads hold, and B's balancer's outstanding calls per
        instance of C: all 0 once nothing is in flight."""
        out = {}
        for hop, engine in self.engines.items():
            for route, limiter in list(engine.bulkheads.items()):
                out[f"{hop} bulkhead {route}"] = limiter.in_flight
        for up in list(self.b_transport._upstreams.values()):  # (read, never changed)
            for inst in up.instances or ():
                out[f"B lb {inst.key}"] = inst.outstanding
        return out

    def b_breaker(self, index: int) -> BreakerState | None:
        return self.store("B").breakers.get(f"upstream:{self.c_hosts[index]}")


@contextmanager
def chain(
    style: str = "cancel",
    *,
    a_policy: Policy | None = None,
    b_policy: Callable[[tuple[str, ...]], Policy] | None = None,
    c_policy: Policy | None = None,
    knobs: _hops39.Knobs | None = None,
    dynamic: bool = False,
    clock: FakeClock | JumpClock | None = None,
) -> Iterator[Chain]:
    faults = _hops38.Faults()
    seen = _hops38.Seen()
    knobs = knobs or _hops39.Knobs()
    engines: dict[str, Engine] = {}
    servers: dict[int, LoopbackServer] = {}
    c_urls: list[str] = []
    received: list[tuple[str, bytes]] = []
    with ExitStack() as stack:

        def start_c(index: int) -> str:
            engine = engines[f"C{index}"] = Engine(
                c_policy or with_bulkhead(_hops38.policy()), clock=clock, store=MemoryStore()
            )
            server = LoopbackServer(c_app(index, faults, seen, knobs, engine, received))
            stack.enter_context(server)  # (stopped at the end, if the test did not)
            servers[index] = server
            return server.url

        urls = [start_c(i) for i in range(3)]
        c_urls.extend(urls)
        if dynamic:

            def resolver(host: str) -> tuple[str, ...] | None:
                return tuple(c_urls) if host == "c" else None

        instances = tuple(urls)
        engines["B"] = Engine(
            (b_policy or (lambda inst: with_bulkhead(_hops38.policy(inst))))(instances),
            clock=clock,
            store=MemoryStore(),
        )
        b_transport = FidelityTransport(telemetry=False, resolver=resolver if dynamic else None)
        b_client = httpx.AsyncClient(transport=b_transport, timeout=None)
        b = stack.enter_context(
            LoopbackServer(hop_app("B", "http://c/c/", seen, engines["B"], b_client, style))
        )
        engines["A"] = Engine(
            a_policy or with_bulkhead(_hops38.policy()), clock=clock, store=MemoryStore()
        )
        a_client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False), timeout=None)
        a = stack.enter_context(
            LoopbackServer(hop_app("A", b.url + "/x/", seen, engines["A"], a_client, style))
        )
        c_hosts = tuple(u.removeprefix("http://") for u in urls)
        yield Chain(
            faults, seen, a.url, c_hosts, engines, b_transport, c_urls, servers, start_c, received
        )
