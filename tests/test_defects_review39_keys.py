"""Review 39: a middleware key function returning an object whose text is its address.

A `[[rate_limit]]` (or `RateLimit(key=fn)`) whose key function returns the request's
user as an ORM gives it (a class with no `__str__` or `__repr__` of its own) keyed each
request by `str(user)`: `<User object at 0x...>`, a new key per request, no limit at
all. FastAPI's form limits learned it in this review (test_defects_review39_fastapi.py);
the middleware's key functions now do the same: the request counts by the client's
address, and an ERROR says to return the id. A key of a class with its own text (an
int, a dataclass) keys by that text as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


class User:
    """A user as an ORM returns it: no `__str__` or `__repr__` of its own."""

    def __init__(self, user_id: int) -> None:
        self.id = user_id


@dataclass
class Tenant:
    name: str  # (a dataclass has a __repr__ of its own: its fields)


async def _statuses(key: Any, clock: FakeClock) -> tuple[list[int], MemoryStore]:
    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/x", ok)])
    store = MemoryStore(rng=seeded_random(1))
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(breaker=None, rate_limits=[RateLimit(name="t", rate="2/min", key=key)]),
        clock=clock,
        store=store,
        telemetry=False,
    )
    transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [(await client.get("/x")).status_code for _ in range(3)], store


async def test_a_key_whose_text_is_its_address_counts_by_the_client(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    held: list[User] = []  # each kept alive: a freed one's address (its text) is reused

    def key(scope: Any) -> Any:
        held.append(User(1))
        return held[-1]

    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        statuses, store = await _statuses(key, clock)
    assert statuses == [200, 200, 429]  # one counter: the client's address (was: none)
    assert set(store.limits.tats) == {"t|10.0.0.7"}
    assert "whose text is its" in caplog.text
    assert "User" in caplog.text


async def test_a_key_with_text_of_its_own_keys_by_it(clock: FakeClock) -> None:
    statuses, store = await _statuses(lambda scope: Tenant("acme"), clock)
    assert statuses == [200, 200, 429]
    (key,) = store.limits.tats
    assert key.startswith("t|k:")
    assert "acme" in key
