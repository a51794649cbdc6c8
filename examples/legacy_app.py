"""A service before migration: four control layers that do not know about each other.

`fidelity-mw map examples/legacy_app.py:app` finds each of them; docs/map-example.md
shows the output, docs/migration.md how to fold them into one policy.
"""

from __future__ import annotations

import httpx
import redis.asyncio as redis
from fastapi import FastAPI, Request
from httpx_retries import Retry, RetryTransport
from slowapi import Limiter
from slowapi.middleware import SlowAPIMiddleware
from slowapi.util import get_remote_address
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy

limiter = Limiter(key_func=get_remote_address, default_limits=["100/minute"])

# A retrying transport *inside* FidelityTransport: attempts multiply.
payments = httpx.AsyncClient(
    base_url="http://payments.internal",
    transport=FidelityTransport(httpx.AsyncHTTPTransport(retries=2)),
)
# A second client that retries on its own, outside any policy.
inventory = httpx.AsyncClient(
    base_url="http://inventory.internal", transport=RetryTransport(retry=Retry(total=5))
)
# redis-py 8 retries 10 times by default.
cache = redis.Redis(host="localhost", port=6379)


class TimingMiddleware(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["x-served-by"] = "legacy"
        return response


app = FastAPI()
app.state.limiter = limiter
app.add_middleware(FidelityMiddleware, policy=Policy())
app.add_middleware(SlowAPIMiddleware)
app.add_middleware(TimingMiddleware)


@app.get("/search")
@limiter.limit("5/minute")
async def search(request: Request, q: str = "") -> dict[str, str]:
    return {"q": q}
