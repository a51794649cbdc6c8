"""Shared fixtures. Time is a FakeClock; randomness is seeded."""

from __future__ import annotations

import pytest

from fidelity_mw import _logs
from fidelity_mw.testing import FakeClock, seeded_random

# real redis-server / cluster fixtures (tests/redis_server.py); a pinned clock for the Lua
# scripts (tests/redis_clock.py)
pytest_plugins = ["redis_server", "redis_clock"]


@pytest.fixture(autouse=True)
def _fresh_log_throttle() -> None:
    """Each test sees the first of its repeated warnings (fidelity_mw._logs)."""
    _logs.reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rng():  # type: ignore[no-untyped-def]
    return seeded_random(1234)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
