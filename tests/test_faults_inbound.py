"""The middleware's own moving parts fail: the request is still answered, never with our 500.

State stores that raise on admit or on record, key functions that raise,
telemetry observers that raise. The rule: never a 500 caused by the
middleware itself.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import fidelity_mw
from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class BrokenStore(MemoryStore):
    def __init__(self, fail_admit: bool, fail_record: bool) -> None:
        super().__init__()
        self.fail_admit = fail_admit
        self.fail_record = fail_record

    def admit_now(self, *args: Any) -> Any:
        if self.fail_admit:
            raise ConnectionError("state store unreachable")
        return super().admit_now(*args)

    def record_now(self, *args: Any) -> Any:
        if self.fail_record:
            raise ConnectionError("state store unreachable")
        return super().record_now(*args)


def get(mw: Any, n: int = 3) -> tuple[list[int], object]:
    async def run() -> tuple[list[int], object]:
        transport = httpx.ASGITransport(app=mw, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [(await client.get("/x")).status_code for _ in range(n)]
            return statuses, fidelity_mw.current()

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("on_error", "fail_admit", "fail_record", "expected"),
    [
        ("local", True, False, 200),
        ("open", True, False, 200),
        ("closed", True, False, 503),
        ("local", False, True, 200),
        ("closed", False, True, 200),  # the response was decided; recording is best effort
    ],
)
def test_a_failing_store_never_becomes_a_500(
    on_error: str, fail_admit: bool, fail_record: bool, expected: int
) -> None:
    policy = Policy(
        state=StateConfig(on_error=on_error),  # type: ignore[arg-type]
        rate_limits=(RateLimit(rate="100/s"),),
    )
    store = BrokenStore(fail_admit, fail_record)
    mw = FidelityMiddleware(ok_app, policy=policy, store=store, clock=FakeClock(), telemetry=False)
    statuses, leaked = get(mw)
    assert statuses == [expected] * 3
    assert leaked is None


def test_a_failing_key_function_falls_back_to_the_peer() -> None:
    def key(scope: Any) -> str:
        raise KeyError("tenant")

    policy = Policy(rate_limits=(RateLimit(rate="1/min", burst=2, key=key),))
    mw = FidelityMiddleware(ok_app, policy=policy, clock=FakeClock(), telemetry=False)
    statuses, _ = get(mw, 3)
    assert statuses == [200, 200, 429]  # limited per peer instead


class Observer:
    def __init__(self, fail_start: bool, fail_end: bool) -> None:
        self.fail_start = fail_start
        self.fail_end = fail_end

    def start(self, ctx: Any, scope: Any) -> Any:
        if self.fail_start:
            raise RuntimeError("exporter broke")
        return None

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        if self.fail_end:
            raise RuntimeError("exporter broke")


def test_a_failing_observer_end_is_logged_not_raised() -> None:
    mw = FidelityMiddleware(ok_app, policy=Policy(), observer=Observer(False, True))
    statuses, leaked = get(mw)
    assert statuses == [200] * 3
    assert leaked is None


def test_a_failing_observer_start_is_not_a_500() -> None:
    mw = FidelityMiddleware(ok_app, policy=Policy(), observer=Observer(True, False))
    statuses, leaked = get(mw)
    assert statuses == [200] * 3
    assert leaked is None
