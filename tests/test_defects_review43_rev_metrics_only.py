"""A metrics-only setup (the Prometheus recipe: `meter_provider=` to the middleware, no
tracer provider anywhere): a `FidelityTransport` used inside the app's requests without
an observer of its own is to report to the middleware's providers (docs/telemetry.md:
"A `Telemetry` given to the middleware also becomes its engine's attempt observer"; and
`http.client.request.duration` "per attempt through `FidelityTransport` when metrics are
set up without tracing"). The engine took the middleware's observer as its attempt
observer only in `Telemetry.start` after a tracer was found, so without tracing the
transport fell back to the global providers: the attempts' durations never reached the
app's meter provider (and the global default, once set on the engine, stayed)."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


def _metric_names(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    names: dict[str, int] = {}
    if data is None:
        return names
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = list(metric.data.data_points)
                # (a histogram's points count their records; a counter's, its value)
                names[metric.name] = sum(int(getattr(p, "count", None) or p.value) for p in points)
    return names


def _app(upstream: Starlette, **middleware: object) -> FidelityMiddleware:
    async def orders(request: Request) -> Response:
        transport = FidelityTransport(httpx.ASGITransport(app=upstream))
        async with httpx.AsyncClient(transport=transport) as client:
            answer = await client.get("http://inventory.internal/x")
        return PlainTextResponse("ok", status_code=answer.status_code)

    app = Starlette(routes=[Route("/orders", orders)])
    return FidelityMiddleware(app, policy=Policy(), clock=FakeClock(), **middleware)  # type: ignore[arg-type]


async def _inventory(request: Request) -> Response:
    return PlainTextResponse("x")


@pytest.mark.parametrize("given", ["meter_provider", "observer"])
async def test_a_transport_inside_requests_reports_to_the_middlewares_meter_provider(
    given: str,
) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    wiring: dict[str, object] = (
        {"meter_provider": provider}
        if given == "meter_provider"
        else {"observer": Telemetry(meter_provider=provider)}
    )
    app = _app(Starlette(routes=[Route("/x", _inventory)]), **wiring)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await client.get("/orders")).status_code for _ in range(3)]
    assert statuses == [200] * 3
    names = _metric_names(reader)
    assert names.get("fidelity.requests") == 3
    assert names.get("http.client.request.duration") == 3, names
