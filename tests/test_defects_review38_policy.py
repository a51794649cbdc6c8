"""Review 38: policy and CLI messages a user meets, and what they mean.

- `version = 2` said "2 is out of range: allowed between 1 and 1": it now says which
  policy versions this release reads.
- `rate = " 5/s"` and `rate = "5/s"` (and "5/minute", "5 per minute", "5/60s", "5/min")
  are one rate, but gave different policy versions: the version hashes each rate in
  one spelling, and a rate keeps what was written without the spaces around it and its
  `/` (a form's default counter name, `<route>:<rate>`, is built from it; Redis keys
  hash the limit's name, never the rate).
- `fidelity-mw map ":app"` said "importing  raised ValueError: Empty module name": now a
  usage error naming the argument.
- `fidelity-mw audit config.yaml` parsed the file as Python (a SyntaxError skip, or
  "scanned" when the text happened to parse): now "not a Python file", counted apart
  from the files that could not be read.
- A Redis URL's `socket_keepalive=maybe` passed, and redis-py read it as true: the
  boolean parameters we pass on take true/false (1/0, yes/no, on/off) only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _policy_cli import issues_of, run
from fidelity_mw import Policy, RateLimit

# ------------------------------------------------------------------ version


def test_an_unsupported_file_version_names_the_supported_ones(tmp_path: Path) -> None:
    message = issues_of({"version": 2})["version"]
    assert "between 1 and 1" not in message
    assert message.startswith("2 is not a policy version")
    assert "supported versions: 1" in message
    path = tmp_path / "fidelity.toml"
    path.write_text("version = 2\n")
    code, out = run(["check", str(path)])
    assert code == 1
    assert "fidelity.toml:1: version: 2 is not a policy version" in out
    assert Policy.from_dict({"version": 1}).version == Policy().version
    assert "expected an integer" in issues_of({"version": "1"})["version"]


# ------------------------------------------------------------------ rates


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (" 5/s", "5/s"),
        ("5 / s", "5/s"),
        ("5/minute", "5/min"),
        ("5 per minute", "5/min"),
        ("5/60s", "5/min"),
        ("5/600s", "5/10min"),
        ("100/hour", "100/h"),
        ("100/1d", "100/day"),
    ],
)
def test_one_rate_written_two_ways_is_one_policy_version(one: str, other: str) -> None:
    def policy(rate: str) -> Policy:
        return Policy.from_dict({"rate_limit": [{"name": "a", "rate": rate}]})

    assert policy(one).version == policy(other).version
    # and a different rate, or a different burst, is another version still
    assert policy(one).version != policy("6/s").version
    assert policy("5/min").version != policy("300/h").version  # (burst 5 against 300)


def test_the_canonical_spelling_keeps_the_version_it_had() -> None:
    # the version of a policy written the documented way does not move with this change
    # (the hash of `{"rate_limit": [{... "rate": "100/s" ...}]}` as before)
    plain = Policy.from_dict({"rate_limit": [{"name": "a", "rate": "100/s"}]})
    spaced = Policy.from_dict({"rate_limit": [{"name": "a", "rate": " 100/s "}]})
    assert plain.version == spaced.version
    assert plain.to_dict()["rate_limit"][0]["rate"] == "100/s"
    assert plain.version == "fd9ea89441ab"  # (main before this change: the same)


def test_a_rate_keeps_what_was_written_without_its_spaces() -> None:
    assert RateLimit(rate=" 5 / s ").rate == "5/s"
    assert RateLimit(rate="5  per   minute").rate == "5 per minute"
    assert RateLimit(rate="5/minute").rate == "5/minute"  # (a spelling, kept)
    assert RateLimit(rate=" 5/s") == RateLimit(rate="5/s")


def test_a_forms_default_counter_name_does_not_depend_on_spaces() -> None:
    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity()
    spaced, plain = fidelity.limit(" 5/s"), fidelity.limit("5/s")
    assert spaced.rate == plain.rate == "5/s"  # (the counter: "<route>:5/s" for both)


# ------------------------------------------------------------------ map


@pytest.mark.parametrize("target", [":app", " :app", ":"])
def test_map_of_an_import_path_without_a_module_is_a_usage_error(target: str) -> None:
    code, out = run(["map", target])
    assert code == 2
    assert "Empty module name" not in out
    assert f"{target!r} names no module before its ':'" in out
    assert "module:attr" in out


def test_load_target_says_so_too() -> None:
    from fidelity_mw.tools.statemap import load_target

    with pytest.raises(ImportError, match="names no module"):
        load_target(":app")


# ------------------------------------------------------------------ audit


def test_audit_of_a_file_that_is_not_python(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("retry: tenacity\nattempts: 3\n")  # (parses as Python annotations)
    script = tmp_path / "deploy.sh"
    script.write_text('#!/bin/sh\nfor x in 1 2; do echo "$x"; done\n')
    tool = tmp_path / "worker"
    tool.write_text("#!/usr/bin/env python3\nimport tenacity\n\n@tenacity.retry\ndef f(): ...\n")
    code, out = run(["audit", str(config), str(script), str(tool)])
    assert code == 0
    assert "SyntaxError" not in out
    assert f"{config.as_posix()}: not a Python file, not scanned" in out
    assert f"{script.as_posix()}: not a Python file, not scanned" in out
    assert "1 retry" in out  # the script without a suffix that runs Python is scanned
    assert out.rstrip().endswith("1 file(s) scanned, 2 not Python")

    # a gate: not "could not be read" (exit 3 for unread files) ...
    code, out = run(["audit", "--fail-on", "breaker", str(config), str(tool)])
    assert code == 0
    # ... but a run that scanned no Python at all still fails it
    code, out = run(["audit", "--fail-on", "any", str(config)])
    assert code == 3
    assert "no Python files were scanned" in out
    code, out = run(["audit", "--json", str(config)])
    doc = json.loads(out)
    assert doc["not_python"] == [config.as_posix()]
    assert doc["skipped"] == []
    assert doc["scanned"] == 0


def test_a_broken_python_file_is_still_a_skip(tmp_path: Path) -> None:
    broken = tmp_path / "half.py"
    broken.write_text("x = (\n")
    code, out = run(["audit", "--fail-on", "any", str(broken)])
    assert code == 3
    assert "half.py: skipped, not scanned (SyntaxError" in out


# ------------------------------------------------------------------ Redis URL flags


@pytest.mark.parametrize(
    ("scheme", "name"),
    [
        ("redis", "socket_keepalive"),
        ("redis", "legacy_responses"),
        ("redis", "decode_responses"),
        ("rediss", "ssl_check_hostname"),
    ],
)
def test_a_redis_urls_boolean_parameter_takes_a_boolean(scheme: str, name: str) -> None:
    url = f"{scheme}://localhost:6379/0?{name}=maybe"
    message = issues_of({"state": {"url": url}})["state.url"]
    assert f"{name}=maybe: write {name}=true or {name}=false" in message
    for value in ("true", "FALSE", "1", "0", "yes", "off"):
        Policy.from_dict({"state": {"url": f"{scheme}://localhost:6379/0?{name}={value}"}})


def test_the_cli_check_names_it(tmp_path: Path) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text('[state]\nurl = "redis://localhost:6379/0?socket_keepalive=maybe"\n')
    code, out = run(["check", os.fspath(path)])
    assert code == 1
    assert "socket_keepalive=maybe: write socket_keepalive=true" in out
