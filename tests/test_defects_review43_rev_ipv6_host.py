"""An `[[upstream]]` host written as an IPv6 address is read as in a URL: in brackets,
perhaps with a port (`[fd00::5]`, `[fd00::5]:8080`). The entry is matched against the
URL's host, which httpx gives without brackets (`fd00::5`), so it never matched: every
call to that address took the default entry. `check` passed it with a warning about
character classes (exit 0), and `Policy` took it. A host with a port (`api.x:8080`) was
already an error; a bracketed address is one now, naming the form that matches."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from _policy_cli import issues_of, run
from fidelity_mw import Policy


@pytest.mark.parametrize("host", ["[fd00::5]", "[fd00::5]:8080", "[fd00::*]"])
def test_a_bracketed_ipv6_host_is_an_error_naming_the_form_that_matches(host: str) -> None:
    message = issues_of({"version": 1, "upstream": [{"host": host}]})["upstream[0].host"]
    assert "never matches" in message
    assert "without brackets" in message


def test_the_unbracketed_address_is_the_form_calls_are_matched_by() -> None:
    policy = Policy.from_dict(
        {"version": 1, "upstream": [{"host": "fd00::5", "retry": {"attempts": 1}}]}
    )
    host = httpx.URL("http://[fd00::5]:8080/x").host
    assert host == "fd00::5"
    assert policy.upstream_for(host).retry.attempts == 1
    # a glob over IPv6 addresses is written the same way
    Policy.from_dict({"version": 1, "upstream": [{"host": "fd00::*"}]})


def test_check_exits_1_and_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text('version = 1\n\n[[upstream]]\nhost = "[fd00::5]:8080"\n')
    code, out = run(["check", str(path)])
    assert code == 1, out
    assert "fidelity.toml:4: upstream[0].host:" in out
    assert '"fd00::5"' in out
