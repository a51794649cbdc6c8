"""The inbound hot path's allocations (cmp42, issue 17).

A limit keyed by client address alone: the request's storage keys are kept per client
(`routeplan.ip_keys_of`), not concatenated per request (a new string, hashed anew by
both of the store's dict operations, and a tuple). Bounded: past `_MAX_IP_KEYS` clients
a limit's table starts again, and the keys stay the same strings.

Compiled, the app's `receive` is a `GoneReceive` (one native object) rather than
`partial(gone_receive, ...)` (three objects); interpreted, a method of the request's
`ResponseWatcher` (one allocation; inb47: the partial before). Both note a client leaving
before the response started."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from tests._asgi import http_scope

from fidelity_mw import Engine, FidelityMiddleware, Policy, RateLimit, routeplan
from fidelity_mw.context import INTERPRETED, DecisionContext
from fidelity_mw.inbound.watch import GoneReceive, ResponseWatcher
from fidelity_mw.testing import FakeClock


async def raw_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def middleware(app: Any = raw_app, **limit: Any) -> tuple[FidelityMiddleware, list[Any]]:
    """The benchmarks' default policy; the keys of every admission, as the store got them."""
    policy = Policy(rate_limits=[RateLimit(name="per-client", rate="1000/s", **limit)])
    mw = FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)
    seen: list[Any] = []
    admit_now = mw._admit_now
    assert admit_now is not None

    def recording(breaker_key: Any, breaker: Any, keys: Any, specs: Any, now: float) -> Any:
        seen.append(keys)
        return admit_now(breaker_key, breaker, keys, specs, now)

    mw._admit_now = recording
    return mw, seen


async def call(mw: FidelityMiddleware, path: str, client: str) -> dict[str, str]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(path, headers=[(b"x-request-timeout-ms", b"800")], client=(client, 5000))
    await mw(scope, receive, send)
    assert sent[0]["status"] == 200
    return {k.decode(): v.decode() for k, v in sent[0]["headers"]}


def test_a_clients_limit_keys_are_made_once_and_shared_by_the_limits_plans() -> None:
    async def go() -> list[Any]:
        mw, seen = middleware()
        for path in ("/a", "/a", "/b", "/a"):
            await call(mw, path, "10.0.0.1")
        await call(mw, "/a", "10.0.0.2")
        return seen

    seen = asyncio.run(go())
    assert [tuple(k) for k in seen] == [("per-client|10.0.0.1",)] * 4 + [("per-client|10.0.0.2",)]
    # the same object for every request of the client, whichever route's plan: the old
    # code concatenated a new key per request
    assert all(k is seen[0] for k in seen[:4]), [id(k) for k in seen]
    assert seen[4] is not seen[0]


def test_ipv6_clients_are_kept_by_their_prefix() -> None:
    async def go() -> tuple[list[Any], list[str]]:
        mw, seen = middleware()
        remaining = []
        for ip in ("2001:db8::1", "2001:db8::2", "2001:db8::1"):
            headers = await call(mw, "/a", ip)
            remaining.append(headers["ratelimit"])
        return seen, remaining

    seen, remaining = asyncio.run(go())
    # one /64 (the policy's default prefix): one bucket, one key object
    assert len({tuple(k) for k in seen}) == 1
    assert seen[0] is seen[1] is seen[2]
    assert [r.split(";")[1] for r in remaining] == ["r=999", "r=998", "r=997"]


def test_the_table_is_bounded_and_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routeplan, "_MAX_IP_KEYS", 3)

    async def go() -> tuple[list[Any], dict[str, tuple[str, ...]]]:
        mw, seen = middleware()
        for i in range(5):
            await call(mw, "/a", f"10.1.0.{i}")
        await call(mw, "/a", "10.1.0.0")  # dropped when the table started again
        plan = mw.engine.plan_for(http_scope("/a"))
        return seen, plan.ip_keys

    seen, table = asyncio.run(go())
    if INTERPRETED:  # (compiled, the bound is a static read once at build time: not patched)
        assert len(table) <= 3
    assert [k[0] for k in seen] == [f"per-client|10.1.0.{i}" for i in (0, 1, 2, 3, 4, 0)]
    assert seen[5] is not seen[0]


def test_a_limit_with_its_own_ipv6_prefix_takes_the_general_path() -> None:
    async def go() -> list[Any]:
        mw, seen = middleware(client_ipv6_prefix=48)
        await call(mw, "/a", "2001:db8:1:2::1")
        await call(mw, "/a", "2001:db8:1:3::1")
        return seen

    seen = asyncio.run(go())
    assert seen[0] == seen[1]  # one /48
    plan = routeplan.RoutePlan(
        "r", None, (RateLimit(name="x", rate="1/s", client_ipv6_prefix=48),), None, None
    )
    assert plan.ip_key_prefix is None
    assert plan.ip_keys == {}
    with pytest.raises(ValueError, match="no limit keyed by client IP alone"):
        routeplan.ip_keys_of(plan, "10.0.0.1")


def test_the_apps_receive_notes_a_client_leaving_in_both_builds() -> None:
    got: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        got.append(receive)
        message = await receive()
        assert message["type"] == "http.disconnect"
        await send({"type": "http.response.start", "status": 499, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def go() -> DecisionContext:
        mw, _seen = middleware(app=app)
        ctxs: list[DecisionContext] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            ctx = scope["state"]["fidelity"]
            if not ctxs:
                ctxs.append(ctx)

        scope = http_scope("/a", client=("10.0.0.9", 1))
        await mw(scope, receive, send)
        return ctxs[0]

    ctx = asyncio.run(go())
    assert ctx.client_disconnected
    # compiled: one native object; interpreted: a bound method of the watcher (a Python
    # class's instance is called through slot_tp_call; a partial is three objects)
    if INTERPRETED:
        assert isinstance(got[0].__self__, ResponseWatcher)
        assert got[0].__func__ is ResponseWatcher.gone_receive
    else:
        assert isinstance(got[0], GoneReceive)


def test_gone_receive_reads_as_gone_receive() -> None:
    engine = Engine(Policy(), clock=FakeClock())

    async def go() -> list[bool]:
        marks = []
        for kind, status in (
            ("http.disconnect", None),
            ("http.disconnect", 200),
            ("http.request", None),
        ):
            ctx = DecisionContext(engine, "r", "GET", 0.0)
            ctx.status = status

            async def receive(kind: str = kind) -> dict[str, Any]:
                return {"type": kind}

            message = await GoneReceive(receive, ctx)()
            assert message == {"type": kind}
            marks.append(ctx.client_disconnected)
            # the interpreted form, the watcher's method, reads the same
            twin = DecisionContext(engine, "r", "GET", 0.0)
            twin.status = status
            watcher = ResponseWatcher()
            watcher.receive = receive
            watcher.ctx = twin
            assert await watcher.gone_receive() == {"type": kind}
            assert twin.client_disconnected is ctx.client_disconnected
        return marks

    # the client leaving is news only before the response started, as for gone_receive
    assert asyncio.run(go()) == [True, False, False]
