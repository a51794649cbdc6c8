"""A request's context and response watcher keep their attributes without a dict of their own,
whatever paths the process's first requests took.

CPython 3.11 shares one attribute table among a class's instances and closes it to new names
after the class's first ~30 instances. A field that the first requests never set (a limited
route's `client_key`, a caller's deadline header's `deadline_from_caller`, a refusal's) then
gave every later instance that set it a dict of its own: +3.5k to +3.7k machine
instructions a request in `benchmarks/features.py` (callgrind). `context.inline_fields`
puts every field in the table at import. Each check runs in a fresh interpreter: this
one's table was filled by whatever tests ran before.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fidelity_mw import context
from fidelity_mw.inbound import watch

ROOT = Path(__file__).resolve().parents[1]

FRESH = textwrap.dedent(
    """
    import asyncio, gc, sys
    sys.path.insert(0, {root!r})
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import Route
    from benchmarks._asgi import hello, make_scope, receive
    from fidelity_mw import FidelityMiddleware, Policy, RateLimit
    from fidelity_mw.inbound.watch import ResponseWatcher

    def own_dict(obj):
        # a dict among what the object refers to, holding its fields: its own __dict__
        return any(type(r) is dict and {{"route", "send"}} & set(r) for r in gc.get_referents(obj))

    def app(rate=None):
        limits = () if rate is None else (RateLimit(name="per-client", rate=rate),)
        policy = Policy(rate_limits=limits)
        return Starlette(
            routes=[Route("/hello", hello)],
            middleware=[Middleware(FidelityMiddleware, policy=policy, telemetry=False)],
        )

    async def serve(app, header=True):
        scope = make_scope()
        if not header:  # no caller's deadline: the route's default
            scope["headers"] = [h for h in scope["headers"] if h[0] != b"x-request-timeout-ms"]
        statuses = []
        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
        await app(scope, receive, send)
        return statuses[0], scope["state"]["fidelity"]

    async def main():
        # the process's first requests: a route without a limit, no deadline header (a
        # readiness probe's)
        probed, limited, strict = app(), app("1000000000/s"), app("1/minute")
        for _ in range(40):
            status, ctx = await serve(probed, header=False)
            assert status == 200 and not own_dict(ctx)
        found = {{}}
        # a limited route's client key and a caller's deadline: two names the table lacks
        status, found["limited, deadline header"] = await serve(limited)
        assert status == 200
        assert (await serve(strict))[0] == 200
        status, found["429"] = await serve(strict)
        assert status == 429
        for _ in range(40):  # watchers as the common path makes them
            w = ResponseWatcher()
            w.send, w.ctx, w.stall_s, w.slot, w.monotonic, w.expired, w.watch = (
                None, None, 0.0, None, None, False, None
            )
        held = ResponseWatcher()
        held.send = None
        held.held = []  # a 500 held while the middleware may answer the error
        held.held_exc = RuntimeError()
        found["held 500's watcher"] = held
        print(sorted(name for name, obj in found.items() if own_dict(obj)))

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not context.INTERPRETED, reason="compiled: native classes, no shared table")
def test_fields_first_set_after_the_first_requests_need_no_dict() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FRESH.format(root=str(ROOT))],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    # before: ["429", "held 500's watcher", "limited, deadline header"]
    assert out.strip().splitlines()[-1] == "[]"


def _fields(cls: type) -> set[str]:
    """The class's instance fields: its class-level defaults and annotations, not its
    methods, properties or constants."""
    names = set(getattr(cls, "__annotations__", {}))
    for name, value in vars(cls).items():
        if name.startswith("__") or name.isupper():
            continue
        if inspect.isfunction(value) or isinstance(value, property | staticmethod):
            continue
        names.add(name)
    return names


@pytest.mark.skipif(not context.INTERPRETED, reason="compiled: native classes, no shared table")
def test_every_field_is_listed_but_the_rare_ones() -> None:
    # the table holds 29 names: a new field must take a rare one's place, or be rare
    assert len(context.CONTEXT_FIELDS) == len(set(context.CONTEXT_FIELDS)) == 29
    init = {"_seq", "engine", "route", "method", "started_at", "_decisions"}
    # (`_sync_lock`: only a request whose context the blocking transport meets;
    # `_breakers_after`: only a shared store's answer that moved a breaker)
    rare = {"_dropped", "dropped_total", "refused_client_chosen", "_sync_lock", "_breakers_after"}
    assert _fields(context.DecisionContext) | init == set(context.CONTEXT_FIELDS) | rare
    assert _fields(watch.ResponseWatcher) == set(watch.WATCHER_FIELDS)
    assert len(watch.WATCHER_FIELDS) <= 29


def test_a_native_class_is_left_alone() -> None:
    # object.__new__ refuses a class with a native constructor (a compiled one, int): the
    # call does nothing and raises nothing
    context.inline_fields(int, ("a",))
