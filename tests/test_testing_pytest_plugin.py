"""fidelity_mw.pytest_plugin: the `fidelity_clock` fixture, on the app of `fidelity_app`.

(A conftest names the plugin in `pytest_plugins`, as this module does.)"""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette

from fidelity_mw.testing import FakeClock
from test_testing_fake_time import build_app, flaky, get

pytest_plugins = ["fidelity_mw.pytest_plugin"]

APP, _ = build_app(flaky())


@pytest.fixture
def fidelity_app() -> Starlette:
    return APP


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_clock_and_fresh_limits(fidelity_clock: FakeClock, run: int) -> None:
    responses = asyncio.run(get(APP, 3))
    assert [r.status_code for r in responses] == [200, 200, 429]  # 2/s, fresh each run
    assert len(fidelity_clock.sleeps) == 2  # every odd upstream call fails: a backoff each
    fidelity_clock.advance(1.0)
    assert asyncio.run(get(APP))[0].status_code == 200
