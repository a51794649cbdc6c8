"""A rate limit's `exclude`: paths its `match` covers that it leaves out (slowapi's exempt)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.errors import PolicyError
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.cli import main
from fidelity_mw.tools.statemap import from_policy

pytestmark = pytest.mark.anyio


def app_with(policy: Policy) -> Starlette:
    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route(p, ok) for p in ("/healthz", "/metrics/cpu", "/orders")])
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock())
    return app


async def statuses(app: Starlette, path: str, n: int) -> list[tuple[int, str | None]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        out = []
        for _ in range(n):
            response = await client.get(path)
            out.append((response.status_code, response.headers.get("ratelimit")))
        return out


async def test_excluded_paths_are_never_counted_nor_refused():
    policy = Policy(
        breaker=None,
        rate_limits=(
            RateLimit(name="all", match="*", exclude=("/healthz", "/metrics/*"), rate="2/min"),
        ),
    )
    app = app_with(policy)
    # the excluded paths: no limit applies, so no RateLimit field and never a 429
    assert await statuses(app, "/healthz", 5) == [(200, None)] * 5
    assert await statuses(app, "/metrics/cpu", 5) == [(200, None)] * 5
    # and they spent none of the bucket the other routes share
    orders = await statuses(app, "/orders", 3)
    assert [status for status, _ in orders] == [200, 200, 429]
    assert orders[0][1] == '"all";r=1;t=30'


def test_exclude_is_checked_item_by_item():
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit": [{"match": "*", "exclude": ["/ok", "healthz"]}]})
    (issue,) = caught.value.issues
    assert issue.path == "rate_limit[0].exclude"
    assert "item 1" in issue.message
    assert 'write "/healthz"' in issue.message
    with pytest.raises(PolicyError, match="expected a list of path globs"):
        Policy.from_dict({"rate_limit": [{"match": "*", "exclude": "/healthz"}]})


def test_from_toml_and_the_map_show_the_exclusion(tmp_path: Path):
    path = tmp_path / "policy.toml"
    path.write_text('[[rate_limit]]\nname = "all"\nmatch = "/api/*"\nexclude = ["/api/health"]\n')
    policy = Policy.from_toml(path)
    assert policy.rate_limits[0].exclude == ("/api/health",)
    assert policy.rate_limits[0].applies_to("/api/orders")
    assert not policy.rate_limits[0].applies_to("/api/health")
    subjects = [layer.subject for layer in from_policy(policy, "policy.toml").layers]
    assert "limit 'all' on /api/* except /api/health, per client_ip" in subjects


def test_check_warns_about_an_exclude_that_does_nothing_or_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "policy.toml"
    path.write_text(
        '[[rate_limit]]\nname = "typo"\nmatch = "/api/*"\nexclude = ["/healthz"]\n\n'
        '[[rate_limit]]\nname = "idle"\nmatch = "/v1/*"\nexclude = ["*"]\n\n'
        '[[rate_limit]]\nname = "fine"\nmatch = "*"\nexclude = ["/healthz", "/static/*"]\n'
    )
    assert main(["check", str(path)]) == 0
    assert main(["check", "--strict", str(path)]) == 1
    out = capsys.readouterr().out
    assert 'rate_limit[0].exclude: exclude[0] ("/healthz") leaves out nothing' in out
    assert "rate_limit[1].exclude: the limit never applies" in out
    assert "rate_limit[2]" not in out
