"""Review 39, the testing helpers: `Fidelity()` made at import builds its engine at its
first request. When that request came inside a `fake_time()` block (the first test that
took `fidelity_clock`), the engine was built on the block's clock and kept it, stopped,
with the block's state, for the rest of the process: a limit that never refilled in the
tests that followed, whose requests all counted on the first block's state. quickstart.md
says the forms' own engine is put on the block's clock and given back its clock and state
when the block ends; now it is, wherever its first request falls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from fastapi import Depends, FastAPI

from fidelity_mw import Policy
from fidelity_mw.clock import SYSTEM_CLOCK, TESTING
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.testing import FakeClock, fake_time

pytestmark = pytest.mark.filterwarnings("ignore::fidelity_mw.testing.FakeTimeWarning")


@pytest.fixture(autouse=True)
def _no_block_left() -> Iterator[None]:
    yield
    assert TESTING.current is None


def forms_app() -> tuple[FastAPI, Fidelity]:
    """An app as a module builds it: forms without the middleware, made at import."""
    fidelity = Fidelity(policy=Policy())
    app = FastAPI()

    @app.get("/a", dependencies=[Depends(fidelity.limit("1/min"))])
    async def a() -> dict[str, str]:
        return {}

    fidelity.install(app)
    return app, fidelity


async def get(app: FastAPI, n: int) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return [(await client.get("/a")).status_code for _ in range(n)]


def test_the_forms_engine_first_used_in_a_block_is_given_back_when_it_ends() -> None:
    app, fidelity = forms_app()
    with fake_time(app=app) as clock:
        assert asyncio.run(get(app, 2)) == [200, 429]
        assert fidelity.engine.clock is clock
    assert fidelity.engine.clock is SYSTEM_CLOCK
    # the block's state went with it: outside, the first request is admitted
    assert asyncio.run(get(app, 2)) == [200, 429]


def test_every_block_starts_afresh() -> None:
    app, _ = forms_app()
    for _round in range(2):
        with fake_time(app=app) as clock:
            assert asyncio.run(get(app, 2)) == [200, 429]
            clock.advance(60)
            assert asyncio.run(get(app, 1)) == [200]


def test_in_a_nested_block_it_goes_back_to_the_outer_clock() -> None:
    app, fidelity = forms_app()
    with fake_time() as outer:
        with fake_time() as inner:
            assert asyncio.run(get(app, 1)) == [200]
            assert fidelity.engine.clock is inner
        assert fidelity.engine.clock is outer
    assert fidelity.engine.clock is SYSTEM_CLOCK


def test_forms_made_in_a_block_keep_its_clock_as_before() -> None:
    with fake_time() as clock:
        app, fidelity = forms_app()
        assert asyncio.run(get(app, 1)) == [200]
        assert fidelity.engine.clock is clock


def test_an_explicit_clock_is_left_as_it_is() -> None:
    mine = FakeClock()
    fidelity = Fidelity(clock=mine)
    with fake_time():
        assert fidelity.engine.clock is mine
    assert fidelity.engine.clock is mine
