"""`on_reject` that cannot be called is refused when the middleware is built.

Accepted before, it was found only at the first refusal: each refusal logged a TypeError
and fell back to the default answer, so the app's own shaping was silently never used.
"""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.fastapi import Fidelity

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("bad", [5, "my_handler", {"status": 429}])
def test_the_middleware_refuses_an_on_reject_it_cannot_call(bad: object) -> None:
    with pytest.raises(TypeError, match=r"FidelityMiddleware\(on_reject=\.\.\.\) takes a callable"):
        FidelityMiddleware(Starlette(), on_reject=bad)  # type: ignore[arg-type]


def test_the_fastapi_forms_refuse_it_too() -> None:
    with pytest.raises(TypeError, match=r"Fidelity\(on_reject=\.\.\.\) takes a callable.*int"):
        Fidelity(on_reject=5)  # type: ignore[arg-type]


async def test_a_callable_on_reject_still_shapes_the_refusal() -> None:
    def shaped(ctx: object, decision: object) -> PlainTextResponse:
        return PlainTextResponse("slow down, friend", status_code=429)

    policy = Policy(rate_limits=(RateLimit(key="global", rate="1/min", burst=1),))
    app = FidelityMiddleware(Starlette(), policy=policy, on_reject=shaped, telemetry=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        admitted = await client.get("/")
        refused = await client.get("/")
    assert admitted.status_code == 404  # (the app has no routes: its own answer, admitted)
    assert refused.status_code == 429
    assert refused.text == "slow down, friend"
