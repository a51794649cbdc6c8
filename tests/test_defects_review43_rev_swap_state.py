"""A policy swapped in (`engine.policy = X`) whose `[state]` differs from the one the
engine's store was built from: the store stays (docs/operations.md, "Changing the
policy"), so the new `[state]` (a Redis URL, another `on_error`) does nothing until a
restart. Nothing said so: the operator who swapped in `on_error = "closed"` or a Redis
URL saw no sign that the process still decides on the old state. The swap now logs which
policy is in force and, when `[state]` changed, a warning naming what stays."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import StateConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _app() -> FidelityMiddleware:
    app = Starlette(routes=[Route("/x", _ok)])
    return FidelityMiddleware(app, policy=Policy(), clock=FakeClock(), telemetry=False)


async def test_a_changed_state_swapped_in_is_said_to_take_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _app()
    new = Policy(state=StateConfig(url="redis://:secret@redis:6379/0", on_error="closed"))
    with caplog.at_level(logging.INFO, logger="fidelity_mw"):
        app.engine.policy = new
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "[state]" in warnings[0]
    assert "restart" in warnings[0]
    assert "redis://:***@redis:6379/0" in warnings[0]  # (never the password)
    assert "secret" not in warnings[0]
    assert "MemoryStore" in warnings[0]  # what it still decides on
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(new.version in m and "swapped in" in m for m in infos), infos
    # ... and the swap itself took effect, on the memory store
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/x")).status_code == 200


async def test_a_swap_with_the_same_state_warns_nothing(caplog: pytest.LogCaptureFixture) -> None:
    app = _app()
    new = Policy(rate_limits=(RateLimit(name="tight", rate="2/minute"),))
    with caplog.at_level(logging.INFO, logger="fidelity_mw"):
        app.engine.policy = new
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any(new.version in r.getMessage() for r in caplog.records)
