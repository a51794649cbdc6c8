"""Review 43 (fix43): `engine.transports` changed while it was iterated.

rev42 left it: `_forget_breakers` (a resolver dropped instances) built `{own,
*engine.transports}` from the engine's `WeakSet` while a sync transport's thread could
add itself to it (a new plan built for that engine: `engine.transports.add`); a set
changed during iteration raises `RuntimeError`, and the resolver's answer was lost with
the call that took it. The same for `Engine.__setattr__` (`list(transports)`) and the
admin page's balancer view. The engine's set now adds and is copied under one lock, and
every reader iterates the copy.

Driven deterministically: an object in the set whose `__hash__` (called while the set
is unpacked into `{own, *...}`) builds a transport on the engine, as the other thread
would in that instant.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.transport import _forget_breakers
from fidelity_mw.outbound.upstream import Instance
from fidelity_mw.policy import BreakerConfig, Policy, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

BREAKER = BreakerConfig(open_jitter=0.0)


class Intruder:
    """In the engine's transports; the first time it is hashed (the set being built
    from them), another transport is built on the engine: what a sync transport's
    thread does at that instant."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.armed = False  # (set once in the set: adding it hashes it too)
        self.built: list[Any] = []

    def __hash__(self) -> int:
        if self.armed and not self.built:
            self.built.append(FidelitySyncTransport(httpx.MockTransport(_ok), engine=self.engine))
        return id(self)


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


def _engine() -> Engine:
    policy = Policy(upstreams=(UpstreamConfig(host="c", breaker=BREAKER),))
    return Engine(policy, clock=FakeClock(), rng=seeded_random(1), store=MemoryStore())


def test_forgetting_breakers_while_a_transport_is_added() -> None:
    engine = _engine()
    own = FidelityTransport(httpx.MockTransport(_ok), engine=engine, telemetry=False)
    intruder = Intruder(engine)
    engine.transports.add(intruder)
    intruder.armed = True
    gone = Instance("http://10.0.0.9:80", engine, BREAKER)
    engine.store.breaker_state(gone.breaker_key, BREAKER)  # type: ignore[attr-defined]
    assert _forget_breakers(engine, [gone], own) == []  # before: RuntimeError
    assert intruder.built  # the add happened while the transports were read
    assert intruder.built[0] in set(engine.transports)
    assert gone.breaker_key not in engine.store.breakers  # type: ignore[attr-defined]


def test_adds_from_threads_while_reading() -> None:
    engine = _engine()
    keep: list[Any] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def add() -> None:
        while not stop.is_set() and len(keep) < 2000:
            keep.append(FidelitySyncTransport(httpx.MockTransport(_ok), engine=engine))

    thread = threading.Thread(target=add)
    thread.start()
    try:
        own = FidelityTransport(httpx.MockTransport(_ok), engine=engine, telemetry=False)
        for _ in range(200):
            try:
                _forget_breakers(engine, [], own)
                list(engine.transports)
            except RuntimeError as exc:  # (before: now and then)
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert errors == []
