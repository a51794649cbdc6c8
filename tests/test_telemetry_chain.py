"""Trace context and baggage across a two-service chain of real servers (uvicorn on
loopback): the second service's decisions land in the caller's trace."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry import baggage, propagate
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit, RetryConfig, UpstreamConfig
from fidelity_mw.telemetry import Telemetry, schema
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import Pipeline, UvicornThread, decision_events, pipeline

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT_SPAN = "00f067aa0ba902b7"


def backend(tel: Telemetry) -> Starlette:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"baggage": dict(baggage.get_all() or {})})

    app = Starlette(routes=[Route("/items/{id}", item)])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(RateLimit(name="backend-limit", rate="1/s", burst=1),)),
        observer=tel,
        # the limit refills on this clock only: the second request is refused however
        # long a busy machine takes between the two (on the real clock, a second apart
        # the second was served)
        clock=FakeClock(),
    )
    return app


def outbound_client(tel: Telemetry) -> httpx.AsyncClient:
    """FidelityTransport when it is available (it injects context per attempt through the
    observer); plain httpx with propagate.inject otherwise."""
    try:
        from fidelity_mw.outbound.transport import FidelityTransport
    except ImportError:  # pragma: no cover - before the outbound work lands
        return httpx.AsyncClient(event_hooks={"request": [_inject]})
    return httpx.AsyncClient(transport=FidelityTransport(observer=tel))


async def _inject(request: httpx.Request) -> None:
    propagate.inject(request.headers)


def frontend(tel: Telemetry, backend_url: str) -> Starlette:
    async def front(request: Request) -> JSONResponse:
        async with outbound_client(tel) as client:
            response = await client.get(backend_url + "/items/" + request.path_params["id"])
        return JSONResponse(
            {"backend_status": response.status_code, "backend": response.json()},
            status_code=200,
        )

    app = Starlette(routes=[Route("/front/{id}", front)])
    # a 429 from the backend is passed on, not retried after its Retry-After
    no_429_retry = UpstreamConfig(host="*", retry=RetryConfig(on_429=False))
    app.add_middleware(FidelityMiddleware, policy=Policy(upstreams=(no_429_retry,)), observer=tel)
    return app


@pytest.fixture
def two() -> Any:
    a, b = pipeline(), pipeline()
    yield a, b
    a.shutdown()
    b.shutdown()


def test_context_and_baggage_cross_two_real_services(two: tuple[Pipeline, Pipeline]) -> None:
    a, b = two
    with (
        UvicornThread(backend(b.telemetry)) as back,
        UvicornThread(frontend(a.telemetry, back.url)) as front,
    ):
        headers = {
            "traceparent": f"00-{TRACE_ID}-{ROOT_SPAN}-01",
            "baggage": "tenant=acme,request.class=gold",
        }
        with httpx.Client(base_url=front.url, timeout=10.0) as client:
            first = client.get("/front/1", headers=headers).json()
            second = client.get("/front/2", headers=headers).json()
    assert first == {
        "backend_status": 200,
        "backend": {"baggage": {"tenant": "acme", "request.class": "gold"}},
    }
    assert second["backend_status"] == 429  # the backend's limiter decided

    a_spans, b_spans = a.finished(), b.finished()
    a_servers = [s for s in a_spans if s.kind is SpanKind.SERVER]
    b_servers = [s for s in b_spans if s.kind is SpanKind.SERVER]
    assert len(a_servers) == 2
    assert len(b_servers) == 2
    for span in [*a_spans, *b_spans]:
        assert span.context is not None
        assert format(span.context.trace_id, "032x") == TRACE_ID
    a_ids = {s.context.span_id for s in a_spans if s.context is not None}
    for server in b_servers:
        # the backend's span hangs under a span of the frontend (its CLIENT span, or
        # its SERVER span when plain httpx injected the context)
        assert server.parent is not None
        assert server.parent.span_id in a_ids
        assert server.parent.is_remote
    clients = [s for s in a_spans if s.kind is SpanKind.CLIENT]
    if clients:  # through FidelityTransport: one CLIENT span per attempt, the backend's parent
        assert len(clients) == 2
        client_ids = {s.context.span_id for s in clients if s.context is not None}
        assert {s.parent.span_id for s in b_servers if s.parent is not None} == client_ids
        statuses = sorted(dict(s.attributes or {})["http.response.status_code"] for s in clients)
        assert statuses == [200, 429]
        for span in clients:
            attrs = dict(span.attributes or {})
            assert attrs["http.request.method"] == "GET"
            assert attrs["server.address"] == "127.0.0.1"
            assert attrs["url.full"].startswith(back.url + "/items/")
            assert "http.request.resend_count" not in attrs
    served, rejected = sorted(b_servers, key=lambda s: s.start_time or 0)
    assert dict(served.attributes or {}).get(schema.DECIDED_BY, "app") == "app"
    assert dict(rejected.attributes or {}).get(schema.DECIDED_BY, "app") == "ratelimit"
    reject = [e for e in decision_events(rejected) if e["fidelity.verdict"] == "reject"]
    assert [e["fidelity.subject"] for e in reject] == ["backend-limit"]
