"""The example service of docs/quickstart.md and docs/map-example.md.

One FastAPI app, one policy file, one control layer per concern:
`FidelityMiddleware` decides inbound (deadline, route breaker, rate limits),
`FidelityTransport` decides outbound (deadline, host breaker, retries).

    uvicorn examples.app:app
    fidelity-mw map examples/app.py:app
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy

POLICY = Policy.from_toml(Path(__file__).with_name("fidelity.toml"))

# The transport reads the decision context of the request being handled:
# deadline, retry ownership and the decisions list are shared with the middleware.
payments = httpx.AsyncClient(
    base_url="http://payments.internal", transport=FidelityTransport(policy=POLICY)
)

app = FastAPI()
app.add_middleware(FidelityMiddleware, policy=POLICY)


@app.get("/api/orders/{order_id}")
async def get_order(order_id: str) -> dict[str, str]:
    return {"order": order_id, "status": "open"}


@app.post("/api/orders/{order_id}/pay")
async def pay(order_id: str, request: Request) -> dict[str, object]:
    key = request.headers.get("idempotency-key", f"pay-{order_id}")
    response = await payments.post(
        "/charges", json={"order": order_id}, headers={"Idempotency-Key": key}
    )
    return {"order": order_id, "payment": response.status_code}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
