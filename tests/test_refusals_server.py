"""A new user's FastAPI route under uvicorn, calling an upstream through FidelityTransport
with no `try`, while the upstream's breaker is open (issue 13.3): the client gets a 503
with Retry-After and a problem document, the server logs no traceback, and the span
says the breaker shed it."""

from __future__ import annotations

import logging
import random
from typing import Any

import httpx
from fastapi import FastAPI

from fidelity_mw import (
    BreakerConfig,
    Engine,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.telemetry import schema
from test_telemetry_helpers import UvicornThread, pipeline

HOST_BREAKER = BreakerConfig(consecutive_failures=1, open_s=60.0, open_min_s=60.0, open_jitter=0.0)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_fastapi_route_without_try_gets_a_503_not_a_500() -> None:
    telemetry = pipeline()
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="payments.internal", retry=RetryConfig(attempts=1), breaker=HOST_BREAKER
            ),
        )
    )
    engine = Engine(policy)
    store = engine.store
    assert isinstance(store, MemoryStore)
    store.breaker_state("upstream:payments.internal", HOST_BREAKER).force(
        OPEN, engine.clock.monotonic(), random.Random(1).random
    )
    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False))
    app = FastAPI()

    @app.get("/pay")
    async def pay() -> dict[str, Any]:
        answer = await client.get("http://payments.internal/charge")  # the README's two lines
        return {"upstream": answer.status_code}

    app.add_middleware(FidelityMiddleware, engine=engine, observer=telemetry.telemetry)
    records = Records()
    watched = [logging.getLogger(name) for name in ("uvicorn.error", "fidelity_mw", "")]
    with UvicornThread(app) as server:
        for logger in watched:
            logger.addHandler(records)
        try:
            response = httpx.get(server.url + "/pay", timeout=10.0)
        finally:
            for logger in watched:
                logger.removeHandler(records)
    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
    assert int(response.headers["retry-after"]) >= 1  # until the breaker lets a probe in
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-fidelity-decided-by"] == "breaker"
    doc = response.json()
    assert doc["status"] == 503
    assert (doc["layer"], doc["upstream"]) == ("breaker", "payments.internal")
    # no traceback, no error: uvicorn never saw an exception
    assert not [r for r in records.records if r.levelno >= logging.ERROR or r.exc_info]
    spans = [s for s in telemetry.finished() if s.attributes.get(schema.OUTCOME) is not None]
    assert spans, "the request has a span"
    attributes = spans[-1].attributes
    assert attributes[schema.OUTCOME] == "shed"
    assert attributes[schema.DECIDED_BY] == "breaker"
    assert attributes[schema.HTTP_RESPONSE_STATUS_CODE] == 503
    telemetry.shutdown()
