"""Malformed policy files, as a user writes them: every error names the file, the key
and the problem, with the line under `fidelity-mw check`, and nothing escapes the
library as a traceback.

The defects fixed here: a state URL with an unclosed IPv6 bracket crashed `fidelity-mw
check`, `map` and `Policy.from_toml` with urllib's ValueError; URLs that validate but on
which no Redis connection ever opens (a unix:// URL without a socket path, a
`client_name` Redis refuses, an `ssl_cert_reqs` redis-py refuses, a database "number" of
non-ASCII digits) passed, so the middleware decided without its state from the first
request on; `Policy.from_toml(fd)` with an int opened that file descriptor, read it and
closed it behind its owner; a key that is not a string (plain data from JSON or YAML
loaders) was a TypeError; TOML dates were shown as Python's repr and a pasted
5,000-character value was repeated whole in its message; a key under a table only a
deeper header defines (`[breaker.extra.deep]`) had no line; `check --workers 0` was
taken (and the memory:// warning skipped); globs of another dialect (`[12]`, `{a,b}`)
passed silently although they match only themselves; a rate per capital M (`100/M`,
a month as often as a minute) was taken as per minute; a duration in the other unit
(`open_s = 5000`, `default_ms = 30`) passed `check` without a word; a typo of a
breaker's documented `enabled` key had no hint, and the list of allowed keys left it out.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from _policy_cli import issues_of, run
from fidelity_mw import Policy
from fidelity_mw.errors import PolicyError
from fidelity_mw.policy.reference import key_docs

# ---------------------------------------------------------------- state URLs


@pytest.mark.parametrize(
    "url", ["redis://[::1/0", "tiered+redis://[fe80::1:6379/0", "rediss://[::1/0?db=1"]
)
def test_an_unclosed_ipv6_bracket_is_a_policy_error(tmp_path: Path, url: str) -> None:
    problems = issues_of({"state": {"url": url}})
    assert set(problems) == {"state.url"}
    assert "not a URL" in problems["state.url"]
    assert "redis://[::1]:6379/0" in problems["state.url"]  # how to write one

    policy = tmp_path / "v6.toml"
    policy.write_text(f'version = 1\n\n[state]\nurl = "{url}"\n')
    code, out = run(["check", str(policy)])
    assert code == 1
    assert f"{policy}:4: state.url: " in out
    assert "Traceback" not in out
    code, out = run(["map", str(policy)])
    assert code == 1
    assert "not a URL" in out


def test_a_well_formed_ipv6_url_passes() -> None:
    assert Policy.from_dict({"state": {"url": "redis://[::1]:6379/0"}}).state.url


@pytest.mark.parametrize("url", ["unix://", "unix://localhost", "unix://?db=1", "unix:///"])
def test_a_unix_url_needs_the_socket_path(url: str) -> None:
    problems = issues_of({"state": {"url": url}})
    assert "needs the socket's path" in problems["state.url"]


def test_a_unix_url_with_its_path_passes() -> None:
    Policy.from_dict({"state": {"url": "unix:///run/redis/redis.sock?db=2"}})


@pytest.mark.parametrize("name", ["a b", "a%20b", "caf%C3%A9", "x%0Ay"])
def test_a_client_name_redis_refuses_is_an_error(name: str) -> None:
    # Redis answers CLIENT SETNAME with "Client names cannot contain spaces, newlines or
    # special characters", and redis-py sends it on every connect
    problems = issues_of({"state": {"url": f"redis://h:6379/0?client_name={name}"}})
    assert "client_name=" in problems["state.url"]
    assert "printable ASCII without spaces" in problems["state.url"]


def test_a_client_name_redis_takes_passes() -> None:
    Policy.from_dict({"state": {"url": "redis://h:6379/0?client_name=checkout-api.1"}})


@pytest.mark.parametrize("value", ["bogus", "Required", "CERT_REQUIRED"])
def test_an_ssl_cert_reqs_redis_py_refuses_is_an_error(value: str) -> None:
    problems = issues_of({"state": {"url": f"rediss://h:6380/0?ssl_cert_reqs={value}"}})
    assert (
        f"ssl_cert_reqs={value}: write one of none, optional, required" in (problems["state.url"])
    )


@pytest.mark.parametrize("value", ["none", "optional", "required"])
def test_the_ssl_cert_reqs_redis_py_takes_pass(value: str) -> None:
    Policy.from_dict({"state": {"url": f"rediss://h:6380/0?ssl_cert_reqs={value}"}})


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/\u00b2",
        "redis://h:6379/0?db=%C2%B2",
        "redis://h/0?health_check_interval=\u0663",
    ],
)
def test_digits_int_cannot_read_are_no_number(url: str) -> None:
    # "²".isdigit() is true and int("²") a ValueError inside redis-py
    problems = issues_of({"state": {"url": url}})
    assert "number" in problems["state.url"]


# ---------------------------------------------------------------- rates


@pytest.mark.parametrize("rate", ["100/M", "100/1M", "5 per M", "5/10M "])
def test_a_capital_m_is_no_minute(rate: str) -> None:
    # lower-cased, "100/M" was 100 per minute: a monthly quota 43,200 times over
    problems = issues_of({"rate_limit": [{"name": "a", "rate": rate}]})
    assert "M may be a minute or a month" in problems["rate_limit[0].rate"]


@pytest.mark.parametrize("rate", ["100/m", "100/min", "100/MIN", "100/Min", "100 per minute"])
def test_minutes_spelled_out_or_lower_case_pass(rate: str) -> None:
    assert Policy.from_dict({"rate_limit": [{"name": "a", "rate": rate}]}).rate_limits


# ---------------------------------------------------------------- plain data


def test_keys_that_are_not_strings_are_unknown_keys() -> None:
    # YAML's `1: 2`, a dict built in code: a PolicyError naming the key, not a TypeError
    problems = issues_of({1: 2, "breaker": {None: 1}, "rate_limit": [{2.5: "x"}]})  # type: ignore[dict-item]
    assert problems["1"].startswith("unknown key")
    assert problems["breaker.None"].startswith("unknown key")
    assert problems["rate_limit[0].2.5"].startswith("unknown key")


def test_a_file_descriptor_is_no_policy_path() -> None:
    # open() takes an int as a descriptor: from_toml(fd) read it (blocking on a pipe or a
    # socket with nothing to read) and closed it behind its owner's back
    read_end, write_end = os.pipe()
    os.write(write_end, b"version = 1\n")
    os.close(write_end)  # (so that a read ends: the test must not hang without the fix)
    try:
        with pytest.raises(PolicyError, match="expected the policy file's path"):
            Policy.from_toml(read_end)  # type: ignore[arg-type]
        os.fstat(read_end)  # still open: raises OSError once closed
        assert os.read(read_end, 100) == b"version = 1\n"  # and unread
    finally:
        os.close(read_end)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"breaker": {"enabeld": False}}, "breaker.enabeld"),
        ({"route": [{"match": "/x", "breaker": {"enable": False}}]}, "route[0].breaker.enable"),
        (
            {"upstream": [{"host": "a", "breaker": {"enabeld": False}}]},
            "upstream[0].breaker.enabeld",
        ),
    ],
)
def test_a_typo_of_a_breakers_enabled_is_pointed_at_it(data: dict[str, object], path: str) -> None:
    # `enabled = false` is a documented breaker key, read before the table's others: its
    # typo had no hint, and the allowed list left it out
    message = issues_of(data)[path]
    assert "did you mean 'enabled'?" in message
    assert "enabled, failure_ratio" in message


# ---------------------------------------------------------------- what messages show


def test_toml_dates_and_times_are_shown_as_written(tmp_path: Path) -> None:
    policy = tmp_path / "dates.toml"
    policy.write_text("[breaker]\nopen_s = 1979-05-27T07:32:00Z\nwindow_s = 07:32:00\n")
    code, out = run(["check", str(policy)])
    assert code == 1
    assert "breaker.open_s: expected a number, got date-time 1979-05-27T07:32:00+00:00" in out
    assert "breaker.window_s: expected a number, got time 07:32:00" in out
    assert "datetime" not in out


def test_a_long_value_is_not_repeated_whole(tmp_path: Path) -> None:
    pasted = "x" * 5000
    policy = tmp_path / "long.toml"
    policy.write_text(
        f'[breaker]\nopen_s = "{pasted}"\n\n[[rate_limit]]\nname = "a"\nkey = "{pasted}"\n'
    )
    code, out = run(["check", str(policy)])
    assert code == 1
    errors = [line for line in out.splitlines() if "error(s)" not in line]
    assert len(errors) == 2
    for line in errors:
        assert len(line) < 400, line
        assert "(5,000 characters)" in line


def test_a_key_under_a_table_a_deeper_header_defines_has_its_line(tmp_path: Path) -> None:
    policy = tmp_path / "deep.toml"
    policy.write_text("version = 1\n\n[breaker]\nmin_calls = 3\n\n[breaker.extra.deep]\nx = 1\n")
    code, out = run(["check", str(policy)])
    assert code == 1
    assert f"{policy}:6: breaker.extra: unknown key" in out


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("count", ["0", "-3"])
def test_check_refuses_a_worker_count_below_one(tmp_path: Path, count: str) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text("version = 1\n")
    code, out = run(["check", str(policy), "--workers", count])
    assert code == 2
    assert f"argument --workers: {count} is not a worker count: give 1 or more" in out


def test_check_warns_of_globs_of_another_dialect(tmp_path: Path) -> None:
    policy = tmp_path / "globs.toml"
    policy.write_text(
        "[[rate_limit]]\n"
        'name = "v1-and-v2"\n'
        'match = "/api/v[12]/*"\n'
        'exclude = ["/api/v1/{health,ready}"]\n'
        "\n[[route]]\n"
        'match = "/reports/*"\n'
        "\n[[upstream]]\n"
        'host = "pay[0-9].internal"\n'
    )
    code, out = run(["check", str(policy)])
    assert code == 0
    warned = re.findall(r":(\d+): warning: (\S+): .* literally", out)
    assert warned == [
        ("3", "rate_limit[0].match"),
        ("4", "rate_limit[0].exclude"),
        ("10", "upstream[0].host"),
    ]
    code, _ = run(["check", "--strict", str(policy)])
    assert code == 1


def test_check_warns_of_a_duration_in_the_other_unit(tmp_path: Path) -> None:
    policy = tmp_path / "units.toml"
    policy.write_text(
        "[deadline]\n"
        "default_ms = 30\n"  # 30 s meant
        "\n[breaker]\n"
        "open_s = 5000\n"  # 5 s meant
        "window_s = 30\n"
        "\n[[route]]\n"
        'match = "/fast"\n'
        "deadline_ms = 50\n"  # a fast route: fine
        "\n[[upstream]]\n"
        'host = "a"\n'
        "attempt_timeout_ms = 3\n"  # 3 s meant
        "retry = { base_ms = 1, max_ms = 5, retry_after_max_s = 3000 }\n"  # backoff: fine
    )
    code, out = run(["check", str(policy)])
    assert code == 0
    warned = re.findall(r":(\d+): warning: (\S+): (.*)", out)
    assert [(line, path) for line, path, _ in warned] == [
        ("2", "deadline.default_ms"),
        ("5", "breaker.open_s"),
        ("14", "upstream[0].attempt_timeout_ms"),
        ("15", "upstream[0].retry.retry_after_max_s"),
    ]
    said = {path: message for _, path, message in warned}
    assert "30 s is default_ms = 30000" in said["deadline.default_ms"]
    assert "5000 ms is open_s = 5" in said["breaker.open_s"]
    assert "50 min" in said["upstream[0].retry.retry_after_max_s"]


# ---------------------------------------------------------------- every key, bad values

BAD_VALUES = [
    '"x"',
    '""',
    "true",
    "-1",
    "0",
    "-0.0",
    "nan",
    "inf",
    "-inf",
    "1e308",
    "99999999999999999999",
    "[]",
    '["x"]',
    '[1, "a"]',
    "{}",
    "{ x = 1 }",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    '"' + "a" * 3000 + '"',
    "[{}]",
]


def _file_for(table: str, key: str, value: str) -> str:
    """`key = value` where the reference puts the key, in a file otherwise valid."""
    if not table:
        return f"{key} = {value}\n"
    first, _, rest = table.partition(".")
    if first in ("rate_limit", "route", "upstream"):
        own = {"rate_limit": 'name = "a"', "route": 'match = "/r"', "upstream": 'host = "h"'}
        head = f"[[{first}]]\n{own[first]}\n" if key not in ("name", "match", "host") else ""
        head = head or f"[[{first}]]\n"
        return head + (f"[{table}]\n" if rest else "") + f"{key} = {value}\n"
    return f"[{table}]\n{key} = {value}\n"


@pytest.mark.parametrize("doc", key_docs(), ids=lambda d: d.path)
def test_every_key_answers_bad_values_with_its_path_and_line(tmp_path: Path, doc) -> None:  # type: ignore[no-untyped-def]
    policy = tmp_path / "bad.toml"
    for value in BAD_VALUES:
        policy.write_text(_file_for(doc.table, doc.key, value))
        try:
            Policy.from_toml(policy)
            exc = None
        except PolicyError as caught:
            exc = caught
        if exc is not None:
            assert str(policy) in str(exc), (doc.path, value)
            for issue in exc.issues:
                assert issue.path, (doc.path, value, issue)  # every one names a key
                assert issue.message.strip(), (doc.path, value)
                assert len(issue.message) < 600, (doc.path, value, len(issue.message))
                assert "datetime." not in issue.message, (doc.path, value, issue.message)
                assert " object at 0x" not in issue.message, (doc.path, value, issue.message)
            # the key itself is among the keys named (another may be a cross-check's)
            named = {re.sub(r"\[\d+\]", "", issue.path) for issue in exc.issues}
            assert any(doc.key in path.split(".") for path in named), (doc.path, value, named)
        code, out = run(["check", str(policy)])
        assert code in (0, 1), (doc.path, value, out)
        for line in out.splitlines():
            if code == 1 and not line.endswith("error(s)"):
                # FILE:LINE: key.path: problem
                assert re.match(rf"{re.escape(str(policy))}:\d+: ", line), (doc.path, value, line)
