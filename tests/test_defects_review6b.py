"""Defects a sixth review found (a second reviewer, beside test_defects_review6.py).

1. A bulkhead request refused because others of its class wait ahead of it in the queue
   (paced there while the event loop is the bottleneck), with room under the limit and
   under its class's share: the refusal said `priority_share`, and a queue that was full
   turned it into a 503 whose record blamed the class's share; it also marked the limit
   as binding, so with `shed_stale` the adaptive limit grew for a refusal it never made.
2. A hedged multipart upload whose file is a file object (`files={"f": open(...)}`): the
   hedge read the same file as the primary attempt, still sending it (httpx rewinds the
   file and reads it in chunks), so each attempt sent part of the file, or none of it.
   A hedge needs a body two attempts can read at once: bytes in memory.
3. A policy file nested deeper than `tomllib` can recurse (`x = [[[[...]]]]`): the loader
   and `fidelity-mw check` raised RecursionError with a parser traceback, where every
   other unparseable file is a `PolicyError` / a finding saying "not valid TOML".
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.decide.concurrency import (
    AT_LIMIT,
    DEFAULT,
    PACED,
    PRIORITY_SHARE,
    SHEDDABLE,
    ConcurrencyLimiter,
    ConcurrencySpec,
)
from fidelity_mw.engine import Engine
from fidelity_mw.errors import PolicyError
from fidelity_mw.outbound.hedge import hedgeable
from fidelity_mw.policy import HedgeConfig, Policy, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.check import check_file

# --------------------------- 1. refused behind the queue, not by the limit or the share


def _paced_with_one_queued(shed_stale: bool = False) -> ConcurrencyLimiter:
    """A route paced by a lagging loop: one request in flight, one queued as `paced`."""
    limiter = ConcurrencyLimiter(
        ConcurrencySpec(
            limit=10, adaptive=True, measure_samples=0, max_queue=1, shed_stale=shed_stale
        )
    )
    assert limiter.try_acquire(DEFAULT, 0.0).admitted
    limiter.release(0.01, lag_s=0.01)  # floor 20 ms, a lag of 10 ms: the loop is the bottleneck
    assert limiter.pacing
    assert limiter.try_acquire(DEFAULT, 1.0).admitted
    refused = limiter.try_acquire(DEFAULT, 1.0)
    assert refused.reason == PACED
    assert not limiter.enqueue(DEFAULT, object(), paced=True)
    limiter.new_turn()
    return limiter


def test_a_request_behind_a_paced_queue_is_not_refused_for_its_class_share() -> None:
    limiter = _paced_with_one_queued()
    refused = limiter.try_acquire(DEFAULT, 2.0)
    assert not refused.admitted
    assert (refused.in_flight, refused.limit) == (1, 10)  # room under the limit and the share
    assert refused.reason not in (PRIORITY_SHARE, AT_LIMIT)
    assert refused.reason == PACED  # it waits its turn behind them, as they do


def test_that_refusal_does_not_count_as_the_limit_binding() -> None:
    limiter = _paced_with_one_queued(shed_stale=True)
    limiter.binding = False
    limiter.try_acquire(DEFAULT, 2.0)
    assert not limiter.binding


def test_a_refusal_by_the_share_still_says_so() -> None:
    limiter = ConcurrencyLimiter(ConcurrencySpec(limit=4, sheddable_share=0.5))
    assert limiter.try_acquire(SHEDDABLE).admitted
    assert limiter.try_acquire(SHEDDABLE).admitted
    refused = limiter.try_acquire(SHEDDABLE)
    assert (refused.admitted, refused.reason) == (False, PRIORITY_SHARE)
    assert limiter.binding
    assert limiter.try_acquire(DEFAULT).admitted
    assert limiter.try_acquire(DEFAULT).admitted
    assert limiter.try_acquire(DEFAULT).reason == AT_LIMIT


# ------------------------------- 2. a hedge reading the file the primary is still sending

_FILE = bytes(range(256)) * 1024  # 256 KiB: httpx sends it in four 64 KiB chunks


class _Wire(httpx.AsyncBaseTransport):
    """Hands the request to `handler` with its body unread, as a socket transport reads
    it while sending (httpx.MockTransport reads the whole body first)."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = await self.handler(request)
        return response


@pytest.mark.anyio
async def test_a_hedged_upload_of_a_file_object_sends_the_whole_file_in_every_attempt() -> None:
    bodies: list[bytes] = []
    primary_done = asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        first = (
            not bodies
            and not primary_done.is_set()
            and request.headers["x-fidelity-attempt"] == "1"
        )
        body = b""
        async for chunk in request.stream:  # type: ignore[union-attr]
            body += chunk
            if first and len(body) > 100_000:
                for _ in range(50):  # a slow upload: the hedge's delay passes meanwhile
                    await asyncio.sleep(0)
        bodies.append(body)
        if first:
            primary_done.set()
            return httpx.Response(200)
        await primary_done.wait()  # the primary answers first, as it finished first
        return httpx.Response(200)

    clock = FakeClock()
    engine = Engine(
        Policy(upstreams=(UpstreamConfig(host="store", hedge=HedgeConfig(after_ms=50)),)),
        clock=clock,
        rng=seeded_random(6),
        store=MemoryStore(),
    )
    transport = FidelityTransport(_Wire(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.put("http://store/blob", files={"f": io.BytesIO(_FILE)})
    assert response.status_code == 200
    assert bodies
    assert all(_FILE in body for body in bodies), [len(b) for b in bodies]


def test_only_a_body_two_attempts_can_read_at_once_is_hedged() -> None:
    def put(**kwargs: object) -> httpx.Request:
        return httpx.Request("PUT", "http://store/blob", **kwargs)  # type: ignore[arg-type]

    assert hedgeable(put(content=b"x"))
    assert hedgeable(put(files={"f": b"bytes in memory"}, data={"a": "b"}))
    assert not hedgeable(put(files={"f": io.BytesIO(b"a file object")}))
    assert not hedgeable(put(files={"f": ("name", io.BytesIO(b"x"), "text/plain")}))


# ------------------------------------------ 3. a policy file nested past the parser's depth


def _deep(tmp_path: Path) -> Path:
    path = tmp_path / "deep.toml"
    path.write_text('version = "1"\nx = ' + "[" * 5000 + "1" + "]" * 5000 + "\n")
    return path


def test_a_policy_file_nested_too_deep_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_toml(_deep(tmp_path))
    assert [i.path for i in caught.value.issues] == [""]
    assert "not valid TOML" in caught.value.issues[0].message
    assert "nested" in caught.value.issues[0].message


def test_check_reports_it_as_a_finding(tmp_path: Path) -> None:
    result = check_file(_deep(tmp_path))
    assert not result.ok
    assert [f.message.split(":")[0] for f in result.errors] == ["not valid TOML"]
