"""Review 41: the sync transport armed the async transport's shortcut on every call.

`_Base._start` (shared by both transports) built a `_Seen` of the engine and added the
transport to the engine's weak set on each call it handed to `First`, for a shortcut
that only `FidelityTransport.handle_async_request` reads: per-call waste for
`FidelitySyncTransport` (and, from threads, a `WeakSet.add` per call on one set). The
sync transport now leaves it unarmed; its calls behave as before.
"""

from __future__ import annotations

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import Policy
from fidelity_mw.testing import FakeClock

URL = "http://svc.internal/x"


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, request=request)


def test_the_sync_transport_does_not_arm_the_async_shortcut() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    transport = FidelitySyncTransport(httpx.MockTransport(ok), engine=engine, telemetry=False)
    with httpx.Client(transport=transport) as client:
        statuses = [client.get(URL).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert transport._armed.seen is None
    assert transport._armed.engine is None
    # (still listed for the admin page's balancer view, from when it was made)
    assert transport in engine.transports


@pytest.mark.anyio
async def test_the_async_transport_still_arms_it() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    transport = FidelityTransport(httpx.MockTransport(ok), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        statuses = [(await client.get(URL)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert transport._armed.seen is not None
    assert transport._armed.engine is engine
