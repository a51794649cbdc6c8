"""Shared pieces of the telemetry tests: SDK pipelines, apps, loopback servers, a fake
retrying transport. (No tests here; the name keeps it inside tests/test_telemetry*.)

Every test passes its providers explicitly: the global providers can be set
once per process and other tests share this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw.context import current
from fidelity_mw.telemetry import Telemetry

# The bound on one collection's wall time: the patience of the rigs' other real-time waits.
COLLECT_TIMEOUT_MS = 60_000


class PatientMetricReader(InMemoryMetricReader):
    """An in-memory reader whose collection may take as long as a starved machine needs.

    The SDK gives all observable callbacks of one collection 10 s of wall time together,
    then raises `MetricsTimeoutError`; a test process at `nice 19` beside CPU-bound work
    (load 16 on 2 cores) once ran the breaker gauge's ~0.1 s of CPU past that. What is
    collected is unchanged: only the wall-time bound is wider."""

    def get_metrics_data(self) -> MetricsData | None:
        with self._lock:
            self.collect(timeout_millis=COLLECT_TIMEOUT_MS)
            data = self._metrics_data
            self._metrics_data = None
        return data


@dataclass
class Pipeline:
    tracer_provider: TracerProvider
    spans: InMemorySpanExporter
    meter_provider: MeterProvider
    metrics: InMemoryMetricReader
    telemetry: Telemetry

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def pipeline(**telemetry_kwargs: Any) -> Pipeline:
    tp = TracerProvider()
    exporter = InMemorySpanExporter()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    reader = PatientMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    telemetry_kwargs.setdefault("client_key_salt", b"test-salt")
    # most tests read every decision's event; the default (events for non-allow
    # decisions only) has its own tests in test_telemetry.py
    telemetry_kwargs.setdefault("decision_events", "all")
    tel = Telemetry(tracer_provider=tp, meter_provider=mp, **telemetry_kwargs)
    return Pipeline(tp, exporter, mp, reader, tel)


# ------------------------------------------------------------ metrics


def metric_points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, data point) for every point of metric `name`."""
    data = reader.get_metrics_data()
    out: list[tuple[dict[str, Any], Any]] = []
    if data is None:
        return out
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        out.append((dict(point.attributes or {}), point))
    return out


def counter_values(
    reader: InMemoryMetricReader, name: str, *keys: str
) -> dict[tuple[Any, ...], Any]:
    """Sum of a counter by the given attribute keys."""
    out: dict[tuple[Any, ...], Any] = {}
    for attrs, point in metric_points(reader, name):
        key = tuple(attrs.get(k) for k in keys)
        out[key] = out.get(key, 0) + point.value
    return out


# ------------------------------------------------------------ spans


def span_strings(spans: Sequence[ReadableSpan]) -> str:
    """Everything a span exports as text (names, attributes, events), for privacy checks."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts.extend(f"{k}={v}" for k, v in (span.attributes or {}).items())
        for event in span.events:
            parts.append(event.name)
            parts.extend(f"{k}={v}" for k, v in (event.attributes or {}).items())
    return "\n".join(parts)


def decision_events(span: ReadableSpan) -> list[Mapping[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == "fidelity.decision"]


# ------------------------------------------------------------ apps

SEEN: dict[str, Any] = {}


async def _ok(request: Request) -> Response:
    SEEN["ctx"] = current()
    return PlainTextResponse("ok")


async def _item(request: Request) -> Response:
    SEEN["ctx"] = current()
    from opentelemetry import baggage

    return JSONResponse({"id": request.path_params["id"], "baggage": dict(baggage.get_all() or {})})


async def _fail(request: Request) -> Response:
    SEEN["ctx"] = current()
    return PlainTextResponse("nope", status_code=500)


async def _boom(request: Request) -> Response:
    SEEN["ctx"] = current()
    raise RuntimeError("the app broke")


def routes() -> list[Route]:
    return [
        Route("/ok", _ok),
        Route("/items/{id}", _item),
        Route("/fail", _fail),
        Route("/boom", _boom),
    ]


def starlette_app() -> Starlette:
    return Starlette(routes=routes())


async def call(
    app: Any, path: str, method: str = "GET", headers: Mapping[str, str] | None = None, **kw: Any
) -> httpx.Response:
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, path, headers=headers, **kw)


# ------------------------------------------------------------ a transport that retries


class RetryingFakeTransport(httpx.AsyncBaseTransport):
    """Calls an observer around each attempt the way FidelityTransport does
    (attempt_start -> inner -> attempt_end), retrying 503s up to `attempts`."""

    def __init__(self, inner: httpx.AsyncBaseTransport, observer: Any, attempts: int = 3) -> None:
        self.inner = inner
        self.observer = observer
        self.attempts = attempts
        self.ctx: Any = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        from fidelity_mw.context import DecisionContext
        from fidelity_mw.engine import Engine

        ctx = current() or DecisionContext(
            engine=Engine(), route="outbound", method=request.method, started_at=0.0
        )
        self.ctx = ctx
        subject = (
            request.url.host
            if request.url.port is None
            else (f"{request.url.host}:{request.url.port}")
        )
        for attempt in range(1, self.attempts + 1):
            ctx.decide("retry", subject, "allow" if attempt == 1 else "retry", "attempt")
            token = self.observer.attempt_start(ctx, request, attempt)
            try:
                response = await self.inner.handle_async_request(request)
            except Exception as exc:
                self.observer.attempt_end(token, None, exc)
                raise
            self.observer.attempt_end(token, response, None)
            if response.status_code != 503 or attempt == self.attempts:
                return response
            await response.aclose()
        raise AssertionError("unreachable")


# ------------------------------------------------------------ loopback servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class UvicornThread:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        # bound here and handed to uvicorn (as _loopback does): a port let go until
        # uvicorn binds it could go to another process on a machine test sessions share
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 10.0
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10.0)
        self.sock.close()


@contextlib.contextmanager
def servers(*apps: Any) -> Iterator[list[UvicornThread]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(UvicornThread(app)) for app in apps]


def run(coro: Any) -> Any:
    return asyncio.run(coro)
