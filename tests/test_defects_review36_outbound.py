"""Review 36, outbound: a resolver that raises for every host it does not know is not an
ERROR with a traceback per new host; power of two choices when calls come one at a time."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport, Policy
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
