"""Seeded fault schedules over a chain of services: A -> B -> C (three instances).

The randomized part runs in process on one FakeClock (tests/_chaos_chain.py: what a
schedule is, how it is driven, the invariants). Each seed draws one to four faults, each
on for a window of fake time (an instance's 503/500 burst, slow tail, refused
connections, bodies reset mid-way, 429s with a sane, huge or malformed Retry-After; B's
own handler raising; deadlines shorter than the chain; clients that disconnect), a
hundred-odd top-level requests through them, and a quiet stretch after. The seeds are
fixed; `FIDELITY_CHAOS_SEEDS=500` runs seeds 0..499 instead (about 0.2 s each).

The real-server part (uvicorn on loopback, tests/_loopback.py) covers what only a real
connection shows: an instance refusing connections, and one resetting its connection
mid-body. Its asserts are counts, with slack.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import _chaos_chain as chaos
from _loopback import LoopbackServer, refused_port
from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, RetryConfig, UpstreamConfig

# Fixed seeds: the regression seeds of the defects found (test_defects_review34_chaos.py;
# seed 1 is in the range) first, then a plain range. Enough to meet every fault kind
# several times (checked).
FOUND = (148, 285)
SEEDS = (
    tuple(range(int(os.environ["FIDELITY_CHAOS_SEEDS"])))
    if os.environ.get("FIDELITY_CHAOS_SEEDS")
    else FOUND + tuple(range(18))
)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_invariant_holds_under_a_seeded_fault_schedule(seed: int) -> None:
    schedule, chain, problems = chaos.run_and_check(seed)
    faults = [(f.kind, f.target, f.param, f.start, f.end) for f in schedule.faults]
    assert not problems, f"seed {seed}: {faults}, hedge={schedule.hedge}, " + "\n".join(
        problems[:10]
    )
    # the schedule ran: every request got an answer, and the quiet stretch was reached
    assert len(chain.seen.top) == len(schedule.sends)
    assert any(t >= schedule.faults_end + chaos.RECOVERY_S for _, t, *_ in chain.seen.top)


def test_the_fixed_seeds_meet_every_fault_kind_and_handler_style() -> None:
    kinds: Counter[str] = Counter()
    styles: set[tuple[str, bool, bool]] = set()
    for seed in SEEDS:
        schedule = chaos.draw(seed)
        kinds.update(f.kind for f in schedule.faults)
        styles.add((schedule.handler_style, schedule.hedge, schedule.tight))
    every = (*chaos.INSTANCE_FAULTS, "b_raise", "short_deadline", "disconnect")
    assert all(kinds[kind] >= 2 for kind in every), kinds
    assert {style[:2] for style in styles} == {
        (handler, hedge) for handler in ("map", "raise") for hedge in (False, True)
    }
    assert {style[2] for style in styles} == {False, True}
    retry_afters = {f.param for s in map(chaos.draw, SEEDS) for f in s.faults if f.kind == "r429"}
    assert {"1", "3600"} <= retry_afters  # sane, huge
    assert retry_afters - {"1", "3600"}  # and malformed


def test_a_schedule_is_the_same_run_again() -> None:
    # deterministic: the same seed gives the same answers, call for call
    first = chaos.run_and_check(148)[1].seen
    again = chaos.run_and_check(148)[1].seen
    assert [(t[0], t[3]) for t in first.top] == [(t[0], t[3]) for t in again.top]
    assert first.c_calls_at == again.c_calls_at


# ---------------------------------------------------------------- real servers


class Leaf:
    """A healthy instance of C: 200, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"c" * 64})


class ResettingServer:
    """An instance that answers 200 with a Content-Length of 4096, sends 10 bytes of the
    body and drops the connection (a raw socket: uvicorn will not send a broken body)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        self.calls = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2.0)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        continue
                    self.calls += 1
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4096\r\n"
                        b"content-type: text/plain\r\n\r\n0123456789"
                    )
                except OSError:
                    continue
                # an RST, not a FIN: the connection is reset mid-body
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def __enter__(self) -> ResettingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def _real_policy(instances: tuple[str, ...]) -> Policy:
    retry = RetryConfig(attempts=3, base_ms=2, max_ms=5)
    upstreams = [UpstreamConfig(host="*", retry=retry)]
    if instances:
        upstreams.insert(0, UpstreamConfig(host="c", instances=instances, retry=retry))
    return Policy(upstreams=tuple(upstreams))


def _real_hop(next_url: str, instances: tuple[str, ...] = ()) -> Any:
    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False), timeout=5.0)

    async def handler(request: Request) -> Response:
        try:
            async with client.stream("GET", next_url) as upstream:
                await upstream.aread()
        except httpx.HTTPError as exc:  # (named: a breaker's refusal shows)
            return Response(f"upstream failed: {type(exc).__name__}".encode(), 502)
        return Response(b"ok" if upstream.status_code < 500 else b"upstream failed",
                        200 if upstream.status_code < 500 else 502)  # fmt: skip

    app = Starlette(routes=[Route("/", handler)])
    app.add_middleware(FidelityMiddleware, policy=_real_policy(instances), telemetry=False)
    return app


@contextmanager
def _real_chain(bad: str) -> Iterator[tuple[list[Leaf], Any, str]]:
    """C1 bad (`refused` or `reset`), C2 and C3 healthy uvicorn servers; B balancing
    them; A calling B. Yields (the healthy leaves, the bad one or None, A's URL)."""
    leaves = [Leaf(), Leaf()]
    with ExitStack() as stack:
        urls = [stack.enter_context(LoopbackServer(leaf)).url for leaf in leaves]
        resetting = None
        if bad == "refused":
            bad_url = f"http://127.0.0.1:{refused_port()}"
        else:
            resetting = stack.enter_context(ResettingServer())
            bad_url = resetting.url
        b = stack.enter_context(LoopbackServer(_real_hop("http://c/", (bad_url, *urls))))
        a = stack.enter_context(LoopbackServer(_real_hop(b.url + "/")))
        yield leaves, resetting, a.url + "/"


REAL_REQUESTS = 60


@pytest.mark.parametrize("bad", ["refused", "reset"])
def test_real_servers_an_instance_that_refuses_or_resets_loses_its_share(bad: str) -> None:
    async def drive(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10.0) as client:
            return [await client.get(url) for _ in range(REAL_REQUESTS)]

    with _real_chain(bad) as (leaves, resetting, url):
        responses = asyncio.run(drive(url))
    statuses = [r.status_code for r in responses]
    healthy = [leaf.calls for leaf in leaves]
    bad_calls = resetting.calls if resetting is not None else None
    print(f"\n{bad}: statuses {Counter(statuses)}, healthy calls {healthy}, bad {bad_calls}")
    assert 500 not in statuses
    # A's breaker for B never opened: the fault was C1's, and B's breaker for C1 owns
    # it (before the fix, A's breaker shed as many as 46 of 60 here, when the balancer
    # had taken to the resetting instance)
    assert not [r.text for r in responses if "CircuitOpen" in r.text]
    # the retry goes elsewhere (a refused connection: at B; a broken body, not retried
    # at B since its head was handed back: at A), so most succeed. (Not all: until its
    # breaker opens, at `min_calls`, the resetting instance answers its heads fastest,
    # and the balancer, which takes its latency at the head, keeps picking it.)
    assert statuses.count(200) >= REAL_REQUESTS * 3 // 4
    # the healthy instances served them (between them: with one call at a time, the
    # balancer keeps to the one that answered fastest, by design)
    assert sum(healthy) >= statuses.count(200)
    if resetting is not None:
        # its breaker opened on the broken bodies: it lost its share
        assert resetting.calls < max(healthy)
