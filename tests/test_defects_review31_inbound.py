"""Review 31: the inbound work of inb30 and rev30c, as a demanding user would drive it.

1. A queued request is listened to while it waits (rev30c): the listener's read of the
   request was cancelled when the wait ended. A server's `receive` need not survive a
   cancel (ASGI promises nothing of the kind): httpx's ASGITransport reads a streaming
   upload from an async generator, and a read cancelled mid-way left that generator
   "already running", so the app's own read of the body failed (a 500). A read under way
   when the wait ends is handed to the app instead (its next `receive` awaits it); only
   the read for the client leaving, after the whole body, is cancelled. An app read that
   gives up (Starlette's `is_disconnected`) leaves that read under way, shielded.
2. A refusal from the queue took the `receive` it hands on (to an `on_reject` response)
   before the listener's read under way was handed over: two reads at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.policy import ConcurrencyConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


def _queued_service(queue_timeout_ms: int = 30_000) -> tuple[Any, asyncio.Event, list[bytes]]:
    gate = asyncio.Event()
    bodies: list[bytes] = []

    async def work(request: Request) -> Response:
        if request.query_params.get("hold"):
            await gate.wait()
        body = await request.body()
        bodies.append(body)
        return PlainTextResponse(f"{len(body)}:{body.decode()}")

    app = Starlette(routes=[Route("/w", work, methods=["GET", "POST"])])
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=queue_timeout_ms),
    )
    return FidelityMiddleware(app, policy=policy, telemetry=False), gate, bodies


async def test_a_streaming_upload_read_while_queued_reaches_the_app_whole() -> None:
    """The slot comes while the listener waits for the upload's first chunk: the app
    still reads the whole body (the read under way is handed over, not cancelled)."""
    mw, gate, bodies = _queued_service()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=mw), base_url="http://svc"
    ) as client:
        held = asyncio.create_task(client.get("/w?hold=1"))
        limiter = None
        for _ in range(100):
            await asyncio.sleep(0)
            limiter = mw.engine.bulkheads.get("/w")
            if limiter is not None and limiter.in_flight == 1:
                break
        assert limiter is not None
        sent = asyncio.Event()
        first = asyncio.Event()

        async def upload() -> AsyncIterator[bytes]:
            sent.set()
            await first.wait()  # the first chunk comes after the slot is free
            yield b"hello "
            yield b"world"

        posted = asyncio.create_task(client.post("/w", content=upload()))
        await sent.wait()
        for _ in range(100):
            await asyncio.sleep(0)
            if limiter.waiting == 1:
                break
        assert limiter.waiting == 1
        gate.set()  # the held request ends; the queued one takes its slot
        assert (await held).status_code == 200
        for _ in range(20):
            await asyncio.sleep(0)
        first.set()
        answer = await posted
        assert answer.status_code == 200, answer.text
        assert answer.text == "11:hello world"
        assert bodies == [b"", b"hello world"]
        assert limiter.in_flight == 0


async def test_an_app_that_asks_whether_its_client_left_still_reads_the_whole_upload() -> None:
    """Starlette's `Request.is_disconnected` reads and gives up at once when nothing is
    there. The read it gave up was the one under way when the queue wait ended: it is
    left under way (shielded), and the app's body read gets it."""
    gate = asyncio.Event()

    async def work(request: Request) -> Response:
        if request.query_params.get("hold"):
            await gate.wait()
            return PlainTextResponse("held")
        assert not await request.is_disconnected()
        body = await request.body()
        return PlainTextResponse(body.decode())

    app = Starlette(routes=[Route("/w", work, methods=["GET", "POST"])])
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=30_000),
    )
    mw = FidelityMiddleware(app, policy=policy, telemetry=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=mw), base_url="http://svc"
    ) as client:
        held = asyncio.create_task(client.get("/w?hold=1"))
        for _ in range(100):
            await asyncio.sleep(0)
            if "/w" in mw.engine.bulkheads and mw.engine.bulkheads["/w"].in_flight == 1:
                break
        limiter = mw.engine.bulkheads["/w"]
        first = asyncio.Event()

        async def upload() -> AsyncIterator[bytes]:
            await first.wait()
            yield b"late body"

        posted = asyncio.create_task(client.post("/w", content=upload()))
        for _ in range(100):
            await asyncio.sleep(0)
            if limiter.waiting == 1:
                break
        assert limiter.waiting == 1
        gate.set()
        assert (await held).text == "held"
        for _ in range(20):
            await asyncio.sleep(0)
        first.set()
        answer = await posted
        assert (answer.status_code, answer.text) == (200, "late body")
        assert limiter.in_flight == 0


async def test_a_refusal_after_listening_reads_from_one_reader_at_a_time(
    clock: FakeClock,
) -> None:
    """The queue timeout refuses a request whose listener still waits for its upload's
    first chunk; the `on_reject` response (a StreamingResponse listens for the client
    leaving) was handed the server's own `receive` while the listener's read was under
    way: two reads at once ("anext(): asynchronous generator is already running" under
    httpx's ASGITransport). It is handed the listener's read instead."""
    gate = asyncio.Event()

    async def work(request: Request) -> Response:
        await gate.wait()
        return PlainTextResponse("held")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"busy"

    def on_reject(ctx: Any, decision: Any) -> Response:
        return StreamingResponse(chunks(), status_code=503)

    app = Starlette(routes=[Route("/w", work, methods=["GET", "POST"])])
    policy = Policy(
        breaker=None,
        concurrency=ConcurrencyConfig(limit=1, max_queue=4, queue_timeout_ms=1_000),
    )
    mw = FidelityMiddleware(app, policy=policy, clock=clock, telemetry=False, on_reject=on_reject)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=mw), base_url="http://svc"
    ) as client:
        held = asyncio.create_task(client.get("/w"))
        for _ in range(100):
            await asyncio.sleep(0)
            if "/w" in mw.engine.bulkheads and mw.engine.bulkheads["/w"].in_flight == 1:
                break
        limiter = mw.engine.bulkheads["/w"]
        first = asyncio.Event()

        async def upload() -> AsyncIterator[bytes]:
            await first.wait()
            yield b"body"

        posted = asyncio.create_task(client.post("/w", content=upload()))
        for _ in range(100):
            await asyncio.sleep(0)
            if limiter.waiting == 1:
                break
        assert limiter.waiting == 1
        clock.advance(1.0)  # the queue timeout
        for _ in range(20):
            await asyncio.sleep(0)
        first.set()
        answer = await asyncio.wait_for(posted, 5)
        assert (answer.status_code, answer.text) == (503, "busy")
        gate.set()
        assert (await held).text == "held"
        assert (limiter.in_flight, limiter.waiting) == (0, 0)
