"""Two services for the Jaeger example: `frontend` calls `backend`.

backend   GET /inventory/{sku}   rate limit per client, route breaker; `?fail=1` answers 503
frontend  GET /orders/{sku}      calls the backend through FidelityTransport (retries,
                                 host breaker, deadline); passes `?fail=1` on

Both export traces over OTLP/HTTP, set up by `configure_otel` from the standard
OTEL_* variables (docker-compose.yml points them at Jaeger):

    uvicorn services:create_backend --factory --port 8001
    BACKEND_URL=http://localhost:8001 uvicorn services:create_frontend --factory --port 8000

State lives in `FIDELITY_STATE_URL` (`memory://` by default; compose uses Redis).
The factories take `telemetry=`, `backend_transport=` and `clock=` so the tests can
run the chain in-process with their own providers and a fake clock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
    upstream_failure_response,
)
from fidelity_mw.telemetry import Telemetry, configure_otel


def _state() -> StateConfig:
    return StateConfig(url=os.environ.get("FIDELITY_STATE_URL", "memory://"))


def backend_policy() -> Policy:
    return Policy(
        state=_state(),
        rate_limits=(
            RateLimit(name="per-client", rate=os.environ.get("BACKEND_RATE", "20/s"), burst=5),
        ),
        # small numbers so a few failing requests open the breaker in the demo
        breaker=BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=10.0, open_s=5.0),
    )


def frontend_policy() -> Policy:
    return Policy(
        state=_state(),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=50, max_ms=500),
                breaker=BreakerConfig(failure_ratio=0.5, min_calls=6, window_s=10.0, open_s=5.0),
            ),
        ),
    )


def _observer(service: str, telemetry: Telemetry | None) -> Telemetry | None:
    """The given observer, or the default one after configuring the global SDK."""
    if telemetry is not None:
        return telemetry
    configure_otel(service_name=service)
    return None  # FidelityMiddleware / FidelityTransport use the global providers


def create_backend(telemetry: Telemetry | None = None, clock: Any = None) -> Starlette:
    async def inventory(request: Request) -> JSONResponse:
        sku = request.path_params["sku"]
        if request.query_params.get("fail") == "1":
            return JSONResponse({"sku": sku, "error": "warehouse offline"}, status_code=503)
        return JSONResponse({"sku": sku, "in_stock": 7})

    app = Starlette(routes=[Route("/inventory/{sku}", inventory)])
    app.add_middleware(
        FidelityMiddleware,
        policy=backend_policy(),
        observer=_observer("backend", telemetry),
        clock=clock,
    )
    return app


def create_frontend(
    telemetry: Telemetry | None = None,
    backend_url: str | None = None,
    backend_transport: httpx.AsyncBaseTransport | None = None,
    clock: Any = None,
) -> Starlette:
    observer = _observer("frontend", telemetry)
    base_url = backend_url or os.environ.get("BACKEND_URL", "http://localhost:8001")
    client = httpx.AsyncClient(
        base_url=base_url,
        transport=FidelityTransport(backend_transport, observer=observer),
        timeout=10.0,
    )

    async def order(request: Request) -> JSONResponse:
        sku = request.path_params["sku"]
        params: dict[str, Any] = dict(request.query_params)
        try:
            upstream = await client.get(f"/inventory/{sku}", params=params)
        except httpx.HTTPError as exc:
            # A connect error the retries could not get past: 502 problem+json. An open
            # host breaker (CircuitOpen) or the deadline (DeadlineExceeded) is raised
            # again, for the middleware to answer 503/504 with Retry-After and the layer
            # that decided (docs/migration.md, "Your error handlers around the calls"):
            # answered here, as a 503 of the app's, Jaeger showed decided_by=app.
            return upstream_failure_response(exc)
        body = {"sku": sku, "inventory_status": upstream.status_code}
        return JSONResponse(body, status_code=200 if upstream.status_code < 400 else 502)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(routes=[Route("/orders/{sku}", order)], lifespan=lifespan)
    # the transport decides with the engine of the request it serves: this middleware's
    app.add_middleware(FidelityMiddleware, policy=frontend_policy(), observer=observer, clock=clock)
    return app
