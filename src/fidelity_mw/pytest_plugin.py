"""A pytest fixture for the tests of an app on fidelity_mw.

In the tests' root `conftest.py`:

    pytest_plugins = ["fidelity_mw.pytest_plugin"]

    @pytest.fixture
    def fidelity_app():
        from myservice.main import app
        return app

A test that takes `fidelity_clock` runs in `fidelity_mw.testing.fake_time(app=...)`
with the app `fidelity_app` returns (none defined: without `app=`), and gets its
FakeClock: waits recorded in `clock.sleeps`, never slept; time moves with
`clock.advance(...)`; every test starts with fresh limits and breakers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .testing import FakeClock, fake_time


@pytest.fixture
def fidelity_clock(request: pytest.FixtureRequest) -> Iterator[FakeClock]:
    """The test's FakeClock, every fidelity_mw engine of the app on it (`fake_time`)."""
    try:
        app = request.getfixturevalue("fidelity_app")
    except pytest.FixtureLookupError:
        app = None
    with fake_time(app=app) as clock:
        yield clock
