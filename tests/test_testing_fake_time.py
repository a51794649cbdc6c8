"""fidelity_mw.testing.fake_time(): an app that builds its middleware and transport at
import time runs on a fake clock in tests, its code untouched."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fidelity_mw import Engine, FidelityMiddleware, FidelityTransport, Policy, RateLimit
from fidelity_mw.clock import SYSTEM_CLOCK, TESTING
from fidelity_mw.testing import FakeClock, FakeTimeWarning, fake_time

UPSTREAM = "http://stock.internal"

# Blocks here without app= warn about the stacks other tests of the session built and
# keep (their module-level apps): expected; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore::fidelity_mw.testing.FakeTimeWarning")


def flaky() -> Callable[[httpx.Request], httpx.Response]:
    """Fails every odd call with 503, answers every even one."""
    calls = [0]

    def answer(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        if calls[0] % 2:
            return httpx.Response(503)
        return httpx.Response(200, json={"count": 3})

    return answer


def build_app(
    upstream: Callable[[httpx.Request], httpx.Response],
) -> tuple[Starlette, httpx.AsyncClient]:
    """An app as a module builds it at import time: a client on FidelityTransport(),
    the middleware added with a policy and nothing else."""
    http = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def stock(request: Request) -> Response:
        response = await http.get(f"{UPSTREAM}/stock/7")
        response.raise_for_status()
        return JSONResponse(response.json())

    app = Starlette(routes=[Route("/stock", stock)])
    policy = Policy(rate_limits=[RateLimit(name="per-client", rate="2/s", match="/stock")])
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)
    return app, http


async def get(app: Starlette, n: int = 1, path: str = "/stock") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return [await client.get(path) for _ in range(n)]


@pytest.fixture(autouse=True)
def _no_block_left() -> Iterator[None]:
    yield
    assert TESTING.current is None


def test_a_middleware_added_at_import_time_waits_on_the_blocks_clock() -> None:
    app, _ = build_app(flaky())
    with fake_time() as clock:
        (response,) = asyncio.run(get(app))
    assert response.status_code == 200
    assert len(clock.sleeps) == 1  # the 503's backoff, recorded, not slept
    assert 0.0 <= clock.sleeps[0] <= 0.1  # full jitter under base_ms = 100


def test_the_seed_makes_the_waits_the_same_run_after_run() -> None:
    waits = []
    for _ in range(2):
        app, _ = build_app(flaky())
        with fake_time(seed=7, app=app) as clock:
            asyncio.run(get(app))
        waits.append(clock.sleeps)
    assert waits[0] == waits[1]
    assert len(waits[0]) == 1


def test_limit_windows_move_only_with_the_clock() -> None:
    app, _ = build_app(lambda r: httpx.Response(200, json={}))
    with fake_time(app=app) as clock:
        first = asyncio.run(get(app, 3))
        again = asyncio.run(get(app))
        clock.advance(1.0)
        later = asyncio.run(get(app))
    assert [r.status_code for r in first] == [200, 200, 429]
    assert first[2].headers["retry-after"] == "1"
    assert again[0].status_code == 429  # no real time counts
    assert later[0].status_code == 200


def test_a_transport_built_before_the_block_waits_on_it_outside_a_request() -> None:
    _, http = build_app(flaky())
    own = http._transport.engine  # type: ignore[attr-defined]
    store = own.store
    assert own.clock is SYSTEM_CLOCK
    with fake_time() as clock:
        response = asyncio.run(http.get(f"{UPSTREAM}/stock/7"))  # a worker's call
        assert own.clock is clock
        assert own.store is not store  # fresh state for the block
    assert response.status_code == 200
    assert len(clock.sleeps) == 1
    assert own.clock is SYSTEM_CLOCK  # given back
    assert own.store is store


def test_app_rebuilds_a_stack_built_before_the_block() -> None:
    app, _ = build_app(flaky())
    with fake_time() as first:
        asyncio.run(get(app))
    with fake_time(app=app) as second:
        responses = asyncio.run(get(app, 3))
    assert len(first.sleeps) == 1
    assert len(second.sleeps) == 2  # the new stack's waits are on the new clock
    # and its limits are fresh: two allowed (one retry each), as in the first block
    assert [r.status_code for r in responses] == [200, 200, 429]


def test_a_stack_built_before_the_block_without_app_is_warned_about() -> None:
    app, _ = build_app(flaky())
    asyncio.run(get(app))  # built on the system clock, and kept
    with pytest.warns(FakeTimeWarning, match=r"fake_time\(app=app\)"), fake_time():
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fake_time(app=app) as clock:  # named: rebuilt, nothing to warn about
            asyncio.run(get(app))
    assert len(clock.sleeps) == 1


def test_an_explicit_clock_is_left_alone() -> None:
    mine = FakeClock()
    with fake_time() as clock:
        engine = Engine(clock=mine)
        transport = FidelityTransport(httpx.MockTransport(flaky()), clock=mine)
        asyncio.run(httpx.AsyncClient(transport=transport).get(f"{UPSTREAM}/x"))
    assert engine.clock is mine
    assert len(mine.sleeps) == 1
    assert clock.sleeps == []


def test_engines_outside_a_block_take_the_system_clock_and_blocks_nest() -> None:
    assert Engine().clock is SYSTEM_CLOCK
    with fake_time() as outer:
        with fake_time() as inner:
            assert Engine().clock is inner
        assert Engine().clock is outer
    assert Engine().clock is SYSTEM_CLOCK


def test_app_takes_a_starlette_app() -> None:
    with pytest.raises(TypeError, match="Starlette or FastAPI app"), fake_time(app=object()):
        pass


def test_a_test_client_with_its_lifespan_inside_the_block() -> None:
    with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app, _ = build_app(flaky())
    with fake_time(app=app) as clock, TestClient(app) as client:
        statuses = [client.get("/stock").status_code for _ in range(3)]
        clock.advance(1.0)
        statuses.append(client.get("/stock").status_code)
    assert statuses == [200, 200, 429, 200]
    assert len(clock.sleeps) == 3  # one backoff per served request


def test_the_fastapi_forms_own_engine_built_before_the_block_is_on_it() -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()  # no middleware: the forms decide on an engine of their own
    app = FastAPI()

    @app.get("/report", dependencies=[Depends(fidelity.limit("1/s"))])
    async def report() -> dict[str, str]:
        return {"ok": "yes"}

    fidelity.install(app)
    own = fidelity.engine  # built before the block
    asyncio.run(get(app, path="/report"))  # and used: its state is on the system clock
    with fake_time(app=app) as clock:
        first = asyncio.run(get(app, 2, "/report"))
        clock.advance(1.0)
        later = asyncio.run(get(app, path="/report"))
        assert own.clock is clock
    assert [r.status_code for r in first] == [200, 429]
    assert later[0].status_code == 200
    assert own.clock is SYSTEM_CLOCK
