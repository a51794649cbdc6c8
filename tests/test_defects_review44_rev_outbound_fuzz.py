"""Review 44 (rev44): the outbound features beside the plain call, fuzzed.

test_fuzz_outbound.py fuzzes what an upstream answers to a plain call. Here hypothesis
draws, per attempt, how long the upstream takes (event-loop turns) and what it answers
(a status or a connection error), for hedged calls to a service of three instances, to a
plain host with retries, and with a body replayed across retries; and when (if ever) the
caller cancels the call. Invariants after every call:

- every response the upstream produced and the caller did not get is closed;
- no attempt is left running at the upstream, nor an instance's outstanding count up;
- a cancelled call raises CancelledError (the cancel is not swallowed), one not cancelled
  returns one of the upstream's answers or raises an httpx error;
- no task of ours is left pending once the call is over (but the drains of losers'
  bodies, which end on their own within a few turns).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, FidelitySyncTransport, FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import HedgeConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

INSTANCES = ("10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003")

ATTEMPTS = st.lists(
    st.tuples(
        st.integers(0, 12),  # event-loop turns before the answer
        st.sampled_from([200, 200, 404, 429, 500, 502, 503, 504, "connect", "read"]),
        st.integers(0, 3),  # body chunks
    ),
    min_size=1,
    max_size=6,
)


class Body(httpx.AsyncByteStream):
    def __init__(self, upstream: Upstream, chunks: int) -> None:
        self.upstream = upstream
        self.chunks = chunks
        upstream.open_bodies.add(self)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            await asyncio.sleep(0)
            yield b"chunk"

    async def aclose(self) -> None:
        self.upstream.open_bodies.discard(self)


class Upstream:
    def __init__(self, script: list[tuple[int, Any, int]]) -> None:
        self.script = script
        self.calls = 0
        self.running = 0
        self.open_bodies: set[Body] = set()
        self.bodies_seen: list[bytes] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        n = self.calls
        self.calls += 1
        turns, answer, chunks = self.script[n % len(self.script)]
        self.running += 1
        try:
            self.bodies_seen.append(await request.aread())
            for _ in range(turns):
                await asyncio.sleep(0)
            if answer == "connect":
                raise httpx.ConnectError("refused", request=request)
            if answer == "read":
                raise httpx.ReadError("reset", request=request)
            return httpx.Response(answer, stream=Body(self, chunks))
        finally:
            self.running -= 1


def transport(upstream: Upstream, service: bool, hedge: bool) -> FidelityTransport:
    clock = FakeClock()
    extra: dict[str, Any] = {"instances": tuple(f"http://{i}" for i in INSTANCES)}
    cfg = UpstreamConfig(
        host="svc",
        retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
        hedge=HedgeConfig(after_ms=5, max_hedges=2) if hedge else None,
        **(extra if service else {}),
    )
    engine = Engine(
        Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(3), store=MemoryStore()
    )
    return FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)


def outstanding(t: FidelityTransport) -> list[int]:
    found = t.upstream(t.engine, httpx.URL("http://svc/")).instances or []
    return [i.outstanding for i in found]


async def streamed() -> AsyncIterator[bytes]:
    for part in (b"pay", b"load"):
        await asyncio.sleep(0)
        yield part


async def call(
    t: FidelityTransport, method: str, body: str | None, cancel_after: int | None
) -> tuple[httpx.Response | None, BaseException | None, bool]:
    async def go() -> httpx.Response:
        content = None if body is None else b"payload" if body == "bytes" else streamed()
        request = httpx.Request(method, "http://svc/x", content=content)
        response = await t.handle_async_request(request)
        try:  # (as httpx.AsyncClient.send reads a response it does not stream)
            await response.aread()
        except BaseException:
            await response.aclose()
            raise
        return response

    task = asyncio.ensure_future(go())
    cancelled = False
    if cancel_after is not None:
        for _ in range(cancel_after):
            await asyncio.sleep(0)
        cancelled = task.cancel()
    try:
        return await task, None, cancelled
    except BaseException as exc:  # (what the call raised is the point)
        return None, exc, cancelled


@settings(
    max_examples=int(os.environ.get("REV44_N", 120)),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    script=ATTEMPTS,
    service=st.booleans(),
    hedge=st.booleans(),
    method=st.sampled_from(["GET", "PUT", "POST"]),
    body=st.sampled_from([None, "bytes", "stream"]),
    cancel_after=st.one_of(st.none(), st.integers(0, 40)),
)
def test_hedges_retries_and_cancels_leave_nothing_behind(
    script: list[tuple[int, Any, int]],
    service: bool,
    hedge: bool,
    method: str,
    body: str | None,
    cancel_after: int | None,
) -> None:
    upstream = Upstream(script)
    t = transport(upstream, service, hedge)

    async def run() -> tuple[httpx.Response | None, BaseException | None, bool, int]:
        before = asyncio.all_tasks()
        result = await call(t, method, body, cancel_after)
        for _ in range(60):  # (losers' drains end within a few turns)
            await asyncio.sleep(0)
        left = [task for task in asyncio.all_tasks() - before if not task.done()]
        return (*result, len(left))

    response, error, cancelled, tasks_left = asyncio.run(run())
    assert upstream.running == 0
    assert outstanding(t) == [0] * (len(INSTANCES) if service else 0)
    assert tasks_left == 0
    if response is not None:
        upstream.open_bodies.discard(response.stream)  # type: ignore[arg-type]
    assert not upstream.open_bodies, (upstream.open_bodies, response, error)
    if error is not None:
        if cancelled:
            assert isinstance(error, asyncio.CancelledError | httpx.HTTPError), error
        else:
            assert isinstance(error, httpx.HTTPError), error
    if cancelled and response is None:
        assert isinstance(error, asyncio.CancelledError), error
    # every attempt sent the whole body (replay); a streamed one is never sent twice
    expected = b"" if body is None else b"payload"
    assert all(seen == expected for seen in upstream.bodies_seen), upstream.bodies_seen
    if body == "stream":
        assert upstream.calls <= 1


@settings(
    max_examples=int(os.environ.get("REV44_N", 120)) // 3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(script=ATTEMPTS, service=st.booleans(), threads=st.integers(2, 6))
def test_the_sync_transport_under_threads_leaves_nothing_behind(
    script: list[tuple[int, Any, int]], service: bool, threads: int
) -> None:
    """The sync transport, one instance shared by threads, each making calls whose
    attempts the script answers: every call ends in a response or an httpx error, and
    every instance's outstanding count is back to 0."""
    lock = threading.Lock()
    calls = [0]
    running = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            n = calls[0]
            calls[0] += 1
            running[0] += 1
        try:
            request.read()
            _, answer, _ = script[n % len(script)]
            if answer == "connect":
                raise httpx.ConnectError("refused", request=request)
            if answer == "read":
                raise httpx.ReadError("reset", request=request)
            return httpx.Response(answer, content=b"x")
        finally:
            with lock:
                running[0] -= 1

    extra: dict[str, Any] = {"instances": tuple(f"http://{i}" for i in INSTANCES)}
    cfg = UpstreamConfig(
        host="svc",
        retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
        **(extra if service else {}),
    )
    engine = Engine(
        Policy(upstreams=(cfg,)), clock=FakeClock(), rng=seeded_random(3), store=MemoryStore()
    )
    t = FidelitySyncTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    errors: list[BaseException] = []

    def worker() -> None:
        with httpx.Client(transport=t) as client:
            for _ in range(8):
                try:
                    client.put("http://svc/x", content=b"payload")
                except httpx.HTTPError:
                    pass
                except BaseException as exc:  # (anything else is the defect)
                    errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(30)
    assert not errors, errors
    assert running[0] == 0
    found = t.upstream(engine, httpx.URL("http://svc/")).instances or []
    assert [i.outstanding for i in found] == [0] * (len(INSTANCES) if service else 0)


@settings(
    max_examples=int(os.environ.get("REV44_N", 120)) // 2,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    deadline_ms=st.integers(1, 3_000),
    before_ms=st.integers(0, 3_000),  # the app's own work before its call
    script=st.lists(
        st.tuples(st.integers(0, 1_500), st.sampled_from([200, 503, 504, "connect"])),
        min_size=1,
        max_size=4,
    ),
)
def test_the_deadline_passed_to_the_next_hop_is_never_more_than_what_is_left(
    deadline_ms: int, before_ms: int, script: list[tuple[int, Any]]
) -> None:
    """A request with a caller's deadline, whose app calls an upstream of the system: each
    attempt tells the next hop at most the time left (and at least 1 ms), none is sent
    once the deadline passed, and the request gets exactly one answer."""
    clock = FakeClock()
    told: list[tuple[int, float]] = []  # (ms told, ms left when sent)
    deadline_at: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        n = len(told)
        left_ms = (deadline_at[0] - clock.monotonic()) * 1000.0
        told.append((int(request.headers["x-request-timeout-ms"]), left_ms))
        took_ms, answer = script[n % len(script)]
        clock.advance(took_ms / 1000.0)
        if answer == "connect":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(answer)

    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="svc.internal",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
                attempt_timeout_ms=1_000,
                protocol_headers="always",
            ),
        ),
        breaker=None,
    )
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(handler), telemetry=False)
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        deadline_at.append(scope["state"]["fidelity"].deadline_at)
        clock.advance(before_ms / 1000.0)
        await asyncio.sleep(0)
        response = await client.get("http://svc.internal/x")
        await send({"type": "http.response.start", "status": response.status_code})
        await send({"type": "http.response.body", "body": b""})

    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("/a", headers=[(b"x-request-timeout-ms", str(deadline_ms).encode())])
    asyncio.run(mw(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    for ms, left in told:
        assert left > 0.0, (told, deadline_ms, before_ms)
        assert 1 <= ms <= max(1.0, left), (told, deadline_ms, before_ms)
