"""out43: the engine's and the memory store's attributes stay inline (CPython 3.11).

Reading an object's `__dict__` turns CPython 3.11's inline attribute values into a dict,
and its specializer serves no attribute read of such an object (LOAD_ATTR_WITH_HINT
misses a split dict's values): each read goes the generic way. `Engine.__setattr__`
read `self.__dict__` at the engine's first attribute, so every `engine.x` of every
request and outbound call did; out42's cells check (`loop.local_ops`) read the store's,
which cost its first attempts ~1k machine instructions a call. Whether an object's
values were made a dict shows in what it refers to (`gc.get_referents`): the dict, or
the values themselves.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import httpx

from fidelity_mw import FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.loop import local_ops
from fidelity_mw.policy import Policy, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random


def _as_dict(value: object, field: str) -> bool:
    """Whether `value`'s attributes (one of them `field`) are held in a dict object."""
    return any(isinstance(r, dict) and field in r for r in gc.get_referents(value))


def _engine(store: Any = None) -> Engine:
    policy = Policy(upstreams=[UpstreamConfig(host="svc.internal")])
    return Engine(policy, clock=FakeClock(), rng=seeded_random(3), store=store)


def test_the_probe_sees_a_dict_made() -> None:
    """The check itself: reading `__dict__` is seen (else the tests below prove nothing)."""
    engine = _engine()
    assert not _as_dict(engine, "plan_mark")
    engine.__dict__  # noqa: B018
    assert _as_dict(engine, "plan_mark")


def test_an_engine_keeps_its_attributes_inline() -> None:
    """Built, an attribute set, a policy swapped in, a transport listed: no dict made
    (at 9523791 the first attribute set made one)."""
    engine = _engine()
    assert not _as_dict(engine, "plan_mark")
    engine.request_observer = None
    engine.policy = Policy(upstreams=[UpstreamConfig(host="svc.internal")])
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )

    async def calls() -> None:
        for _ in range(3):
            await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))

    asyncio.run(calls())
    assert engine.transports  # (armed: a change of the engine is told to it)
    engine.attempt_observer = None  # (`engine_changed` read `engine.__dict__` too)
    asyncio.run(calls())
    assert not _as_dict(engine, "plan_mark")


def test_an_engine_still_tells_a_swap_and_its_transports() -> None:
    """`__setattr__` without `__dict__`: a policy swap is still told to the engine's
    readers, and not during construction."""
    told: list[int] = []
    engine = _engine()
    engine.policy_readers.append(lambda: told.append(1))
    engine.clock = FakeClock()
    assert told == []
    engine.policy = Policy()
    assert told == [1]


def test_the_cells_check_leaves_the_store_inline() -> None:
    """`local_ops` choosing the cells reads no `store.__dict__` (out42's read it), and a
    transport's calls on the cells leave it inline."""
    store = MemoryStore(rng=seeded_random(1))
    had = _as_dict(store, "breakers")  # (compiled, an interpreted subclass may have one)
    local = local_ops(store)
    assert local is not None
    assert local.begin_at == store.outbound_begin_cells
    assert _as_dict(store, "breakers") == had
    engine = _engine(store)
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )

    async def calls() -> None:
        for _ in range(3):
            await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))

    asyncio.run(calls())
    assert _as_dict(store, "breakers") == had
    assert store.breakers["upstream:svc.internal"].totals(engine.clock.monotonic()) == (3, 0, 0)


def test_an_instance_attribute_still_turns_the_cells_off() -> None:
    """An operation replaced on the instance (a function, or another bound method) is
    called by key, as before."""
    counted: list[str] = []
    store = MemoryStore(rng=seeded_random(1))
    record = store.record_now

    def counting(*args: Any) -> Any:
        counted.append("record")
        return record(*args)

    store.record_now = counting  # type: ignore[method-assign]
    local = local_ops(store)
    assert local is not None
    assert local.begin_at != store.outbound_begin_cells
    other = MemoryStore(rng=seeded_random(1))
    other.outbound_begin_now = other.outbound_gate_now  # type: ignore[method-assign]
    local = local_ops(other)
    assert local is not None
    assert local.begin_at != other.outbound_begin_cells
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)),
        engine=_engine(store),
        telemetry=False,
    )

    async def calls() -> None:
        for _ in range(2):
            await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))

    asyncio.run(calls())
    assert counted == ["record", "record"]
