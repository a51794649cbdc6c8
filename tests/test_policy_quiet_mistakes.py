"""Mistakes a policy file could make quietly: keys of a breaker table switched off
(checked all the same), a network written with host bits, a success status retried."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fidelity_mw import Policy
from fidelity_mw.errors import PolicyError
from fidelity_mw.tools.check import check_file


@pytest.mark.parametrize(
    ("text", "path", "said"),
    [
        (
            "[breaker]\nenabled = false\nfailure_ratoi = 0.5\n",
            "breaker.failure_ratoi",
            "did you mean",
        ),
        (
            '[[route]]\nmatch = "/x"\n[route.breaker]\nenabled = false\nopen_s = -3\n',
            "route[0].breaker.open_s",
            "out of range",
        ),
        (
            '[[upstream]]\nhost = "pay"\nbreaker = { enabled = false, min_calls = "ten" }\n',
            "upstream[0].breaker.min_calls",
            "expected",
        ),
    ],
)
def test_a_breaker_switched_off_still_has_its_keys_checked(text: str, path: str, said: str) -> None:
    """`enabled = false` skipped the rest of the table: a typo kept in it surfaced only
    on the day the breaker was switched back on (as a refusal to start)."""
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict(tomllib.loads(text))
    (issue,) = caught.value.issues
    assert issue.path == path
    assert said in issue.message


def test_a_breaker_switched_off_with_good_keys_is_off() -> None:
    policy = Policy.from_dict(
        tomllib.loads(
            "[breaker]\nenabled = false\nopen_s = 10\n"
            '[[route]]\nmatch = "/x"\nbreaker = { enabled = false, open_s = 2 }\n'
        )
    )
    assert policy.breaker is None
    assert policy.routes[0].breaker is False


def _warnings(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    file = tmp_path / "fidelity.toml"
    file.write_text(text)
    result = check_file(file)
    assert not result.errors
    return [(w.path, w.message) for w in result.warnings]


def test_check_warns_of_a_network_written_with_host_bits(tmp_path: Path) -> None:
    said = _warnings(
        tmp_path,
        'trusted_proxies = ["10.0.0.1/8", "192.168.1.0/24", "10.1.2.3"]\n'
        'trusted_peers = ["fd00::1/64"]\n',
    )
    assert [path for path, _ in said] == ["trusted_proxies", "trusted_peers"]
    assert '"10.0.0.1/8"' in said[0][1]
    assert '"10.0.0.0/8" for the network' in said[0][1]
    assert '"10.0.0.1/32" for the one address' in said[0][1]
    assert '"fd00::1/128"' in said[1][1]


def test_check_warns_of_a_success_status_retried(tmp_path: Path) -> None:
    said = _warnings(
        tmp_path,
        '[[upstream]]\nhost = "pay"\n[upstream.retry]\non_status = [200, 304, 503]\n'
        '[[upstream]]\nhost = "once"\n[upstream.retry]\nattempts = 1\non_status = [200]\n',
    )
    assert [path for path, _ in said] == ["upstream[0].retry.on_status"]
    assert "retries after 200, 304" in said[0][1]
