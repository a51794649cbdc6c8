"""out40: the outbound success path with fewer bytecodes, every behaviour kept.

- A service of one instance: the balancer's pick is `choose_only` (its breaker's known
  open time alone), not `choose` over views built per attempt: the same answer for every
  view, tried list, pause and threshold `choose` can be given (differential), and no
  view built for it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw import FidelityTransport, buildinfo
from fidelity_mw.context import _CURRENT
from fidelity_mw.decide.balance import (
    EWMA_TAU_S,
    PICK_BOUND,
    PICK_ONLY,
    PICK_P2C,
    PICK_PANIC,
    InstanceView,
    Pick,
    choose,
    choose_only,
    cost,
    decayed,
    ejected,
)
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.upstream import Instance
from fidelity_mw.policy import BreakerConfig, Policy, UpstreamConfig


def reference_choose(
    views: Sequence[InstanceView],
    tried: Collection[int],
    now: float,
    rng: Callable[[], float],
    *,
    panic_threshold: float = 0.5,
    max_ejected_ratio: float = 0.5,
    paused_at: float | None = None,
) -> Pick:
    """`choose` as of 386c0c7 (before its pass for a pick with nothing open or tried),
    with round 48's preference: an untried instance not known open over one the
    ejection bound keeps in rotation (tests/test_defects_review48_rcv_after_outage.py)."""
    n = len(views)
    out = ejected(views, now, max_ejected_ratio)
    admissible = [i for i in range(n) if i not in out]
    panic = len(admissible) < panic_threshold * n or not admissible
    candidates = list(range(n)) if panic else admissible
    fresh = [i for i in candidates if i not in tried]
    if fresh:
        candidates = fresh
        better = [i for i in candidates if views[i].open_until <= now or views[i].answered]
        if better and not panic:
            candidates = better
    elif len(candidates) > 1:
        at = now if paused_at is None else paused_at
        free = [i for i in candidates if views[i].paused_until <= at]
        if free:
            candidates = free
        else:
            first = min(views[i].paused_until for i in candidates)
            candidates = [i for i in candidates if views[i].paused_until == first]
    measured = [views[i].latency_s for i in candidates if views[i].latency_s > 0.0]
    # An unmeasured instance is assumed as fast as the fastest measured one: it gets tried.
    default_latency = min(measured) if measured else 1.0
    slowest = max(measured) if measured else default_latency
    if len(candidates) == 1:
        index, reason = candidates[0], PICK_ONLY
    else:
        a = candidates[min(len(candidates) - 1, int(rng() * len(candidates)))]
        rest = [i for i in candidates if i != a]
        b = rest[min(len(rest) - 1, int(rng() * len(rest)))]
        ca = cost(views[a], default_latency, now, slowest)
        cb = cost(views[b], default_latency, now, slowest)
        index = b if cb < ca else a
        reason = PICK_P2C
    bypass = views[index].open_until > now
    if panic:
        reason = PICK_PANIC
    elif bypass:
        reason = PICK_BOUND
    return Pick(index, reason, panic, bypass, len(admissible))


view_st = st.builds(
    InstanceView,
    st.integers(0, 4),
    st.sampled_from([0.0, 0.01, 0.05, 0.2]),
    st.sampled_from([0.0, 5.0, 10.0, 20.0]),
    st.just(0.0),
    st.sampled_from([0.0, 5.0, 10.0, 20.0]),
    st.sampled_from([0.0, 2.0, 9.5]),
    st.booleans(),
)


def recording(rnd: random.Random) -> tuple[Callable[[], float], list[float]]:
    draws: list[float] = []

    def rng() -> float:
        draws.append(rnd.random())
        return draws[-1]

    return rng, draws


@settings(max_examples=600, deadline=None)
@given(
    views=st.lists(view_st, min_size=1, max_size=5),
    tried=st.sets(st.integers(0, 4)),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    ratio=st.sampled_from([0.0, 0.34, 0.5, 1.0]),
    paused_at=st.none() | st.sampled_from([5.0, 10.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_choose_answers_as_before_with_the_same_draws(
    views: list[InstanceView],
    tried: set[int],
    threshold: float,
    ratio: float,
    paused_at: float | None,
    seed: int,
) -> None:
    """`choose` skips the ejection and the tried filter when nothing is open or tried:
    the same pick, reason and draws as before, for any views (differential)."""
    now = 10.0
    answers = []
    for impl in (reference_choose, choose):
        rng, draws = recording(random.Random(seed))
        pick = impl(
            views, sorted(tried), now, rng,
            panic_threshold=threshold, max_ejected_ratio=ratio, paused_at=paused_at,
        )  # fmt: skip
        answers.append((pick, draws))
    assert answers[0] == answers[1]


times = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(
    open_until=times,
    now=times,
    latency=times,
    outstanding=st.integers(0, 5),
    paused_until=times,
    failed_at=times,
    tried=st.sampled_from([[], [0]]),
    threshold=st.floats(min_value=0.0, max_value=1.0),
    ratio=st.floats(min_value=0.0, max_value=1.0),
    paused_at=st.none() | times,
)
def test_the_pick_of_one_instance_is_chooses_whatever_it_is_given(
    open_until: float,
    now: float,
    latency: float,
    outstanding: int,
    paused_until: float,
    failed_at: float,
    tried: list[int],
    threshold: float,
    ratio: float,
    paused_at: float | None,
) -> None:
    draws: list[int] = []

    def rng() -> float:
        draws.append(1)
        return 0.5

    view = InstanceView(outstanding, latency, open_until, 0.0, paused_until, failed_at)
    expected = choose(
        [view], tried, now, rng,
        panic_threshold=threshold, max_ejected_ratio=ratio, paused_at=paused_at,
    )  # fmt: skip
    assert choose_only(open_until, now, threshold) == expected
    assert draws == []  # (`choose` draws nothing for one: neither may its shortcut)


@pytest.mark.skipif(
    "fidelity_mw.outbound.loop" in buildinfo.compiled_modules(),
    reason="compiled, the loop calls Instance.view natively: a patched method is not seen",
)
def test_a_service_of_one_instance_builds_no_view_for_its_pick(monkeypatch: Any) -> None:
    """The attempt to a one-instance service picks it without the views `choose` needs
    (each an aged latency estimate and a named tuple): none is built; with two the views
    are built as before."""
    built: list[str] = []
    view = Instance.view

    def counted(self: Instance, now: float | None = None) -> InstanceView:
        built.append(self.key)
        return view(self, now)

    monkeypatch.setattr(Instance, "view", counted)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=request.url.host.encode())

    async def calls(instances: tuple[str, ...], reason: str) -> list[bytes]:
        policy = Policy(
            upstreams=(UpstreamConfig(host="svc", instances=instances, breaker=BreakerConfig()),)
        )
        transport = FidelityTransport(httpx.MockTransport(handler), policy=policy, telemetry=False)
        token = _CURRENT.set(None)
        try:
            out = []
            for _ in range(3):
                response = await transport.handle_async_request(
                    httpx.Request("GET", "http://svc/x")
                )
                out.append(response.content)
                ctx = response.extensions["fidelity_context"]
                picked = [d for d in ctx.decisions if d.layer == "lb"]
                assert [d.reason for d in picked] == [reason]
            return out
        finally:
            _CURRENT.reset(token)

    assert asyncio.run(calls(("http://10.0.0.1:8080",), "only_candidate")) == [b"10.0.0.1"] * 3
    assert built == []
    asyncio.run(calls(("http://10.0.0.1:8080", "http://10.0.0.2:8080"), "p2c"))
    assert len(built) == 3 * 2


@settings(max_examples=400, deadline=None)
@given(
    latency=st.sampled_from([0.0, 1e-6, 0.01, 0.25, 3.0]) | times,
    at=times,
    now=st.none() | times,
    outstanding=st.integers(0, 9),
    open_until=times,
    failed_at=times,
)
def test_an_instance_view_is_the_decayed_estimate_as_before(
    latency: float, at: float, now: float | None, outstanding: int, open_until: float,
    failed_at: float,
) -> None:  # fmt: skip
    """`Instance.view` ages the estimate without `decayed`'s call: the same view, to the
    bit, as `decayed` and the named tuple gave."""
    engine = Engine(Policy())
    instance = Instance("http://10.0.0.1:8080", engine)
    instance.latency_s, instance.latency_at = latency, at
    instance.outstanding, instance.open_until, instance.failed_at = (
        outstanding, open_until, failed_at,
    )  # fmt: skip
    instance.seen_at, instance.paused_until = 1.5, 2.5
    aged = latency if now is None else decayed(latency, at, now, EWMA_TAU_S)
    instance.answered = True
    expected = InstanceView(outstanding, aged, open_until, 1.5, 2.5, failed_at, True)
    view = instance.view(now)
    assert view == expected
    assert type(view) is InstanceView
    assert view.latency_s.hex() == expected.latency_s.hex()
