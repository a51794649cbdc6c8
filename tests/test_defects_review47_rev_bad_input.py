"""Bad input a new user writes, each named with its field and problem (review 47).

Found: `instances` on an `[[upstream]]` whose `host` is a glob was accepted, and the
transport sent every host the glob matched to the service's instances: with `host = "*"`
a call to `https://example.com/z` went to `http://10.0.0.1/z` (and `api.github.com` too),
silently. Now a `PolicyError` on `upstream[N].instances` (`fidelity-mw check` gives its
line); a service named by a plain host is unchanged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from fidelity_mw import FidelityTransport, Policy, PolicyError
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.cli import main as cli

INSTANCES = ["http://10.0.0.1:80", "http://10.0.0.2:80"]


@pytest.mark.parametrize("host", ["*", "*.internal", "payments-?"])
def test_instances_under_a_glob_host_are_refused_naming_the_field(host: str) -> None:
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(
            {"upstream": [{"host": "a.internal"}, {"host": host, "instances": INSTANCES}]}
        )
    (issue,) = caught.value.issues
    assert issue.path == "upstream[1].instances"
    assert f'with host "{host}" every host it matches would be sent to these instances' in str(
        caught.value
    )


def test_instances_without_a_host_are_refused_too() -> None:
    """`host` defaults to "*": a service table that forgot its name caught every call."""
    with pytest.raises(PolicyError, match=r"upstream\[0\]\.instances: a service's host"):
        Policy.from_dict({"upstream": [{"instances": INSTANCES}]})


def test_check_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text(
        'version = 1\n\n[[upstream]]\nhost = "*.internal"\ninstances = ["http://10.0.0.7:8080"]\n',
        encoding="utf-8",
    )
    assert cli(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:5: upstream[0].instances: a service's host is the one name" in out


def test_a_named_service_still_sends_its_calls_to_its_instances_and_nothing_else() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    policy = Policy.from_dict({"upstream": [{"host": "payments", "instances": INSTANCES}]})
    transport = FidelityTransport(httpx.MockTransport(handler), policy=policy, clock=FakeClock())

    async def calls() -> list[int]:
        async with httpx.AsyncClient(transport=transport) as client:
            urls = ["http://payments/x", "https://example.com/z", "http://payments/y"]
            return [(await client.get(url)).status_code for url in urls]

    assert asyncio.run(calls()) == [200, 200, 200]
    assert seen[1] == "https://example.com/z"
    assert {seen[0].rsplit("/", 1)[0], seen[2].rsplit("/", 1)[0]} <= {
        "http://10.0.0.1",
        "http://10.0.0.2",
    }


@pytest.mark.parametrize(
    ("rate", "fix", "days"),
    [
        ("1000/month", '"1000/30d"', 30),
        ("1000 per month", '"1000/30d"', 30),
        ("10/2 months", '"10/60d"', 60),
        ("1/year", '"1/360d"', 360),
    ],
)
def test_slowapis_month_and_year_name_the_period_to_write(rate: str, fix: str, days: int) -> None:
    """slowapi (the limits library) takes `1000/month` (30 days) and `1/year` (360); the
    error said only "use s, min, h or d". It now gives the same period in days, which
    loads and is as long as the limits library's."""
    import limits

    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit": [{"name": "a", "match": "/x", "rate": rate}]})
    assert f"write {fix})" in str(caught.value)
    assert "rate_limit[0].rate: unknown period unit" in str(caught.value)
    fixed = Policy.from_dict({"rate_limit": [{"name": "a", "match": "/x", "rate": fix.strip('"')}]})
    from fidelity_mw.policy.model import parse_rate

    count, period_s = parse_rate(fixed.rate_limits[0].rate)
    item = limits.parse(rate)
    assert (count, period_s) == (item.amount, item.get_expiry()) == (item.amount, days * 86400)
