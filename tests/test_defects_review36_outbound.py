"""Review 36, outbound: a resolver that raises for every host it does not know is not an
ERROR with a traceback per new host; power of two choices when calls come one at a time."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport, Policy, UpstreamConfig
from fidelity_mw.engine import Engine
from fidelity_mw.testing import FakeClock, seeded_random

SERVICE = ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]


class _NotAServiceOfOurs(LookupError):
    """(a name of its own: the log throttle is keyed by the kind of failure)"""


def test_a_resolver_failing_for_each_new_host_logs_once_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def resolver(host: str) -> Any:
        if host == "payments":
            return SERVICE
        raise _NotAServiceOfOurs(host)  # an SRV lookup's NXDOMAIN, a registry's KeyError

    engine = Engine(Policy(), clock=FakeClock(), rng=seeded_random(7))
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        engine=engine,
        telemetry=False,
        resolver=resolver,
    )

    async def calls() -> list[int]:
        async with httpx.AsyncClient(transport=transport) as client:
            hooks = [f"http://hook{i}.example/" for i in range(30)]
            return [(await client.get(url)).status_code for url in hooks]

    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        assert asyncio.run(calls()) == [200] * 30  # each call still goes to its host
    failed = [r for r in caplog.records if "resolver failed" in r.getMessage()]
    assert len(failed) == 1  # (was 30: one ERROR with its traceback per new host)
    assert failed[0].exc_info is not None
    assert "hook0.example" in failed[0].getMessage()


def _sequential(latency_s: dict[str, float], calls: int = 600, gap_s: float = 0.0) -> Counter[str]:
    """`calls` calls one at a time to a service of the instances in `latency_s` (each
    answers after its latency, on a fake clock): the instances they landed on."""
    clock = FakeClock()
    landed: Counter[str] = Counter()

    def handler(request: httpx.Request) -> httpx.Response:
        landed[request.url.host] += 1
        clock.advance(latency_s[request.url.host])
        return httpx.Response(200)

    instances = tuple(f"http://{host}:80" for host in latency_s)
    policy = Policy(upstreams=(UpstreamConfig(host="svc", instances=instances),))
    transport = FidelityTransport(
        httpx.MockTransport(handler), policy=policy, clock=clock, rng=seeded_random(1),
        telemetry=False,
    )  # fmt: skip

    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(calls):
                assert (await client.get("http://svc/x")).status_code == 200
                clock.advance(gap_s)

    asyncio.run(go())
    return landed


def test_calls_one_at_a_time_are_not_all_sent_to_one_instance() -> None:
    # Nothing is ever outstanding, so the two choices compare latency alone: alike, the
    # calls spread evenly; one instance faster, it takes most, and the slower ones are
    # still tried (their estimates age until they win a comparison: decide/balance.py).
    even = _sequential({"10.0.0.1": 0.010, "10.0.0.2": 0.010, "10.0.0.3": 0.010})
    assert min(even.values()) >= 150
    skewed = _sequential({"10.0.0.1": 0.010, "10.0.0.2": 0.020, "10.0.0.3": 0.030})
    assert skewed["10.0.0.1"] > skewed["10.0.0.2"] > skewed["10.0.0.3"] > 0
    assert skewed["10.0.0.1"] < 0.8 * 600
    sparse = _sequential({"10.0.0.1": 0.010, "10.0.0.2": 0.100}, gap_s=1.0)
    assert sparse["10.0.0.2"] > 0
