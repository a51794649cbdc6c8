"""Review 39, the examples as a user copies them: the Jaeger example's frontend caught
`httpx.HTTPError` around its call and answered a 503 of its own, the handler
docs/migration.md ("Your error handlers around the calls") names as the one that hides
the middleware's answers: an open host breaker reached its callers (and Jaeger) as the
app's 503, `decided_by=app`, without the breaker's own Retry-After."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from fidelity_mw.telemetry import Telemetry
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "jaeger"


def services() -> ModuleType:
    name = "review39_jaeger_services"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE / "services.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_the_frontend_lets_the_middleware_answer_an_open_breaker() -> None:
    frontend = services().create_frontend(
        telemetry=Telemetry(),
        backend_url="http://backend:8001",
        backend_transport=httpx.MockTransport(refused),
        clock=FakeClock(),
    )
    transport = httpx.ASGITransport(frontend)
    async with httpx.AsyncClient(transport=transport, base_url="http://frontend") as client:
        answers = [await client.get("/orders/sku-3") for _ in range(3)]
    # the backend down: the retries' give-up, in the middleware's shape
    assert answers[0].status_code == 502
    assert answers[0].json()["type"] == "urn:fidelity-mw:problem:upstream-failed"
    # then the host breaker (6 failed attempts): the breaker's answer, not the app's
    shed = answers[2]
    assert shed.status_code == 503
    assert shed.headers["x-fidelity-decided-by"] == "breaker"
    assert "retry-after" in shed.headers
    assert shed.json()["type"] == "urn:fidelity-mw:problem:upstream-circuit-open"
