"""The multi-hop rig of tests/_hops38.py, with the knobs review 39's scenarios need.

client -> A -> B -> C x3 on real uvicorn (loopback), as in `_hops38`, and:

- C's instances with or without FidelityMiddleware (`c_plain`: a bare Starlette app, a
  callee that knows nothing of deadlines);
- B's policy given whole (`b_policy`: a Redis state store, hedging, other timeouts);
- more fault modes for C: `hang`, `slow` (`slow_s`), `reset` (a 200 whose body stops
  after its first chunk: the connection is dropped mid-body), `503ra` (503 with a
  `Retry-After` of `retry_after` seconds, marked by C's own control layer when
  `decided` is set);
- a client deadline (`x-request-timeout-ms`) per request.

`_hops38`'s behaviour and its tests are left alone: its `Faults`, `Seen`, `Recorder`
and summaries are reused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

import _hops38 as hops
from _loopback import LoopbackServer
from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.decide.breaker import BreakerState
from fidelity_mw.state.memory import MemoryStore


@dataclass
class Knobs(hops.Knobs):
    # (a plain C is never cancelled by a deadline: it hangs until B goes away)
    hang_until_gone: bool = True


c_handler = hops.c_handler  # (one handler for both rigs)


def c_app(index: int, faults: hops.Faults, seen: hops.Seen, knobs: Knobs, plain: bool) -> Any:
    handler = c_handler(index, faults, seen, knobs)
    app = Starlette(routes=[Route(f"/c/{route}", handler) for route in hops.ROUTES])
    if plain:
        return app
    app.add_middleware(
        FidelityMiddleware,
        policy=hops.policy(),
        observer=hops.Recorder(f"C{index}", seen),
        telemetry=False,
    )
    return app


def hop_app(
    name: str, next_url: str, seen: hops.Seen, style: str, policy: Policy, store: Any = None
) -> Any:
    """As `_hops38.hop_app`, with the hop's policy given; the client's read timeout is
    left to fidelity_mw (`timeout=None`), so the attempt timeout and the deadline bound
    every wait. `style` "stream": the upstream's body is read as a stream and passed on
    whole (B's app reads C's body to its end, as "raise" does, through `client.stream`)."""
    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False), timeout=None)
    handler = hops.hop_handler(name, client, next_url, style)
    app = Starlette(routes=[Route(f"/x/{route}", handler) for route in hops.ROUTES])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        store=store,
        observer=hops.Recorder(name, seen),
        telemetry=False,
    )
    return app


@dataclass
class Chain:
    faults: hops.Faults
    seen: hops.Seen
    url: str  # A's base: url + "/x/<route>"
    c_hosts: tuple[str, ...]
    knobs: Knobs
    a_store: MemoryStore
    b_store: Any  # a MemoryStore unless B's policy names its own (`b_store=None`)

    def b_breakers(self) -> dict[str, BreakerState]:
        """B's breakers for C's instances (memory state), by instance index."""
        assert isinstance(self.b_store, MemoryStore)
        out = {}
        for i, host in enumerate(self.c_hosts):
            state = self.b_store.breakers.get(f"upstream:{host}")
            if state is not None:
                out[str(i)] = state
        return out


@contextmanager
def chain(
    style: str = "raise",
    *,
    c_plain: bool = False,
    b_policy: Any = None,  # (instances) -> Policy; default `_hops38.policy(instances)`
    a_policy: Policy | None = None,
    knobs: Knobs | None = None,
    b_store: Any = "memory",
) -> Iterator[Chain]:
    faults = hops.Faults()
    seen = hops.Seen()
    knobs = knobs or Knobs()
    a_store = MemoryStore()
    b_store = MemoryStore() if b_store == "memory" else b_store
    with ExitStack() as stack:
        urls = tuple(
            stack.enter_context(LoopbackServer(c_app(i, faults, seen, knobs, c_plain))).url
            for i in range(3)
        )
        b_pol = (b_policy or (lambda inst: hops.policy(inst)))(urls)
        b = stack.enter_context(
            LoopbackServer(hop_app("B", "http://c/c/", seen, style, b_pol, b_store))
        )
        a_style = "raise" if style == "stream" else style
        a = stack.enter_context(
            LoopbackServer(
                hop_app("A", b.url + "/x/", seen, a_style, a_policy or hops.policy(), a_store)
            )
        )
        c_hosts = tuple(u.removeprefix("http://") for u in urls)
        yield Chain(faults, seen, a.url, c_hosts, knobs, a_store, b_store)


@dataclass
class Answer:
    rid: str
    status: int
    headers: dict[str, str]
    body: bytes


def send(
    client: httpx.Client, rig: Chain, rid: str, route: str = "ok", timeout_ms: int | None = None
) -> Answer:
    headers = {"x-hop-id": rid}
    if timeout_ms is not None:
        headers["x-request-timeout-ms"] = str(timeout_ms)
    response = client.get(f"{rig.url}/x/{route}", headers=headers)
    return Answer(rid, response.status_code, dict(response.headers), response.content)


def decisions(seen: hops.Seen, hop: str, rid: str) -> list[Any]:
    return [d for rec in seen.by(hop) if rec.rid == rid for d in rec.decisions]


def record(seen: hops.Seen, hop: str, rid: str) -> hops.HopRecord | None:
    found = [rec for rec in seen.by(hop) if rec.rid == rid]
    return found[-1] if found else None


def gates(seen: hops.Seen, hop: str, rid: str) -> list[str]:
    """The breaker gate answers of the hop's outbound calls for one request."""
    return [d.reason for d in decisions(seen, hop, rid) if d.layer == "breaker"]


def reasons(seen: hops.Seen, hop: str, rid: str) -> Counter[tuple[str, str, str]]:
    return Counter((d.layer, d.verdict, d.reason) for d in decisions(seen, hop, rid))
