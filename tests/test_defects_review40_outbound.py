"""out40: the outbound success path with fewer bytecodes, every behaviour kept.

- A service of one instance: the balancer's pick is `choose_only` (its breaker's known
  open time alone), not `choose` over views built per attempt: the same answer for every
  view, tried list, pause and threshold `choose` can be given (differential), and no
  view built for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw import FidelityTransport
from fidelity_mw.context import _CURRENT
from fidelity_mw.decide.balance import InstanceView, choose, choose_only
from fidelity_mw.outbound.upstream import Instance
from fidelity_mw.policy import BreakerConfig, Policy, UpstreamConfig

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
