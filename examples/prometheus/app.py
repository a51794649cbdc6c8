"""fidelity_mw's metrics for Prometheus to scrape, through OpenTelemetry's Prometheus reader.

    pip install 'fidelity-mw[prometheus]' uvicorn
    uvicorn app:create_app --factory --port 8000      # the API, and /metrics (one process:
                                                      # no --workers, docs/operations.md)
    prometheus --config.file=prometheus.yml           # scrapes localhost:8000/metrics

The meter provider is the app's own (`meter_provider=`), so nothing global is
touched; `/metrics` serves the registry the reader fills at each scrape. See
docs/operations.md ("Prometheus") for the series and alerts.yml for alert rules.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit, RouteConfig

POLICY = Policy(
    rate_limits=[RateLimit(name="per-client", rate="50/s", burst=100, match="/orders/*")],
    breaker=BreakerConfig(consecutive_failures=3, open_s=30.0),
    # The scrape asks no state: no breaker and no limit on it. With Redis state and
    # on_error = "closed" it would otherwise be answered 503 while Redis is away,
    # hiding the metrics of the outage itself.
    routes=[RouteConfig(match="/metrics", breaker=False)],
)


class MetricsEndpoint:
    """prometheus_client's ASGI app as a Starlette endpoint (a class: Starlette routes plain
    functions as request/response handlers)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.app = make_asgi_app(registry=registry)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def order(request: Request) -> PlainTextResponse:
    if request.query_params.get("fail"):  # a way to see the breaker open
        return PlainTextResponse("backend down", status_code=503)
    return PlainTextResponse(f"order {request.path_params['id']}")


def create_app(policy: Policy = POLICY, registry: CollectorRegistry | None = None) -> Starlette:
    registry = registry if registry is not None else CollectorRegistry()
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    app = Starlette(
        routes=[
            Route("/orders/{id}", order),
            Route("/metrics", MetricsEndpoint(registry)),
        ]
    )
    app.add_middleware(FidelityMiddleware, policy=policy, meter_provider=meter_provider)
    return app
