"""The inbound hot path, round 38: work per request cut without a change of behaviour.

- The response's last message goes to the server after a reset of the middleware's own
  ContextVar token, not after `set(None)`: the context uvicorn's keep-alive timer copies
  inside that send then holds no mapping of our variable at all (`set(None)` left a new
  one, two objects per idle connection that the collector kept promoting).
- Telemetry's `before_response_end` acts only on the token of a span `start` began: with
  no OpenTelemetry SDK set up (the two-line default) the middleware no longer calls it
  per request, while any other observer's hook is called as before, token or none.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider

from fidelity_mw import FidelityMiddleware, Policy, RateLimit, current
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.testing import FakeClock

Scope = dict[str, Any]


def scope() -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/api/items",
        "raw_path": b"/api/items",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-request-timeout-ms", b"5000")],
        "client": ("192.0.2.7", 5000),
        "server": ("testserver", 80),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class App:
    """A response in two body messages, then "background" work after it."""

    def __init__(self) -> None:
        self.after: list[DecisionContext | None] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        self.after.append(current())


class Server:
    """A server's `send` copying the current context at every message (uvicorn's
    `call_later` for its keep-alive timer does at the last one)."""

    def __init__(self) -> None:
        self.copies: list[contextvars.Context] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.copies.append(contextvars.copy_context())


def policy() -> Policy:
    return Policy(rate_limits=[RateLimit(name="per-client", rate="100/s", match="/api/*")])


def test_the_last_message_is_sent_with_no_mapping_of_our_variable() -> None:
    app = App()
    mw = FidelityMiddleware(app, policy=policy(), clock=FakeClock(), telemetry=False)
    server = Server()

    async def request() -> tuple[bool, DecisionContext | None]:
        await mw(scope(), receive, server.send)
        return _CURRENT in contextvars.copy_context(), current()

    # a task of its own, as a server runs each request (a fresh copy of an empty context)
    left, now_current = asyncio.run(request())
    start, body, last = server.copies
    ctx = app.after[0]
    assert isinstance(ctx, DecisionContext)  # the background work still sees it
    assert start[_CURRENT] is ctx
    assert body[_CURRENT] is ctx
    # the timer's copy: not even a mapping to None (what `set(None)` left)
    assert _CURRENT not in last
    # and the request leaves the variable as it found it: unset
    assert not left
    assert now_current is None


def test_an_outer_context_is_current_for_the_last_message_and_after() -> None:
    app = App()
    mw = FidelityMiddleware(app, policy=policy(), clock=FakeClock(), telemetry=False)
    server = Server()
    outer = DecisionContext(mw.engine, "outer", "GET", 0.0)

    async def request() -> DecisionContext | None:
        _CURRENT.set(outer)
        await mw(scope(), receive, server.send)
        return current()

    assert asyncio.run(request()) is outer
    last = server.copies[-1]
    assert last[_CURRENT] is outer
    assert app.after[0] is not outer
    assert isinstance(app.after[0], DecisionContext)


def test_a_last_message_sent_by_a_child_task_still_leaves_our_context() -> None:
    """Starlette's streaming responses send from a task of their own (another context):
    the middleware's token cannot be reset there, and the variable is set as before."""
    seen: list[DecisionContext | None] = []

    async def streaming(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.create_task(send({"type": "http.response.body", "body": b"b"}))
        seen.append(current())

    mw = FidelityMiddleware(streaming, policy=policy(), clock=FakeClock(), telemetry=False)
    server = Server()

    async def request() -> DecisionContext | None:
        await mw(scope(), receive, server.send)
        return current()

    assert asyncio.run(request()) is None
    assert server.copies[-1][_CURRENT] is None
    assert isinstance(seen[0], DecisionContext)
    assert server.copies[0][_CURRENT] is seen[0]


class SpyTelemetry(Telemetry):
    hook_calls = 0
    ends = 0

    def before_response_end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.hook_calls += 1
        super().before_response_end(ctx, scope, token)

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.ends += 1
        super().end(ctx, scope, token)


class PlainObserver:
    """Another observer: no span, no token, and a hook at the response's end."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, ctx: DecisionContext, scope: Scope) -> Any:
        self.calls.append("start")
        return None

    def before_response_end(self, ctx: DecisionContext, scope: Scope, token: Any) -> None:
        self.calls.append(f"before_response_end {ctx.status}")

    def end(self, ctx: DecisionContext, scope: Scope, token: Any) -> None:
        self.calls.append("end")


def test_telemetry_without_a_span_is_not_asked_at_the_last_message() -> None:
    tel = SpyTelemetry(tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    mw = FidelityMiddleware(App(), policy=policy(), clock=FakeClock(), observer=tel)
    for _ in range(3):
        asyncio.run(mw(scope(), receive, Server().send))
    assert tel.ends == 3
    assert tel.hook_calls == 0


def test_another_observers_hook_is_called_without_a_token() -> None:
    observer = PlainObserver()
    mw = FidelityMiddleware(App(), policy=policy(), clock=FakeClock(), observer=observer)
    asyncio.run(mw(scope(), receive, Server().send))
    assert observer.calls == ["start", "before_response_end 200", "end"]


# ------------------------------------------------------------ the layer table's harness


def test_every_layer_step_is_a_served_variant_and_counts_its_requests() -> None:
    from benchmarks import server, server_inprocess

    names = [name for name, _, _ in server_inprocess.LAYERS]
    assert set(names) <= set(server.VARIANTS)
    # each step adds to the row above it, from bare
    assert [before for _, before, _ in server_inprocess.LAYERS] == ["bare", *names[:-1]]
    for variant in ("fidelity-telemetry", "fidelity-metrics"):
        counts = server_inprocess.count_calls(variant, 64)
        assert counts["calls"] > 0
        assert counts["bytecodes"] > counts["calls"]


def test_the_layer_table_has_a_row_per_step_in_each_build(monkeypatch: Any) -> None:
    from benchmarks import server_inprocess

    size = {name: i for i, name in enumerate(["bare", *(n for n, _, _ in server_inprocess.LAYERS)])}

    def instructions(variant: str, requests: int) -> float:
        plain = variant.removesuffix("+compiled")
        return 1000.0 * (size[plain] + 1) / (2 if plain != variant else 1)

    def calls(variant: str, requests: int) -> dict[str, float]:
        n = float(size[variant.removesuffix("+compiled")])
        return {"calls": 10 + n, "c_calls": 20 + n, "bytecodes": 100 + 10 * n}

    monkeypatch.setattr(server_inprocess, "count_instructions", instructions)
    monkeypatch.setattr(server_inprocess, "count_calls_in", calls)
    table = server_inprocess.layers(["pure", "compiled"], 64)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + len(server_inprocess.LAYERS)  # the head, bare, a row per step
    assert rows[1].startswith("| bare route | 1,000 | 10.0 | 20.0 | 100 | 500 |")
    # every step adds 1,000 instructions pure (500 compiled), one call, ten bytecodes
    assert all("+1,000 (" in row and "+500 (" in row and "+1.0" in row for row in rows[2:])
    assert rows[-1].endswith(
        "| +1,000 (+7,000) | +1.0 | +1.0 | +10 | +500 (+3,500) | +1.0 | +1.0 | +10 |"
    )
