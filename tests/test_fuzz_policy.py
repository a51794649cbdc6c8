"""Fuzzing policies: any TOML text, any data -> a Policy or a PolicyError naming key paths.

Never another exception, never a silently accepted typo. Structured inputs
follow the documented shape (docs/policy.md) with every value drawn from
plausible, borderline and absurd candidates, plus unknown keys; they go
through `Policy.from_dict` directly and, serialized to TOML text, through
`Policy.from_toml`. Unstructured inputs are arbitrary text and bytes.

On success the policy must survive a round trip (`from_dict(to_dict())`
gives the same version); on failure every issue must carry a key path made
of names that really occur in the input (or no path for whole-file errors).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fidelity_mw import Policy
from fidelity_mw.errors import PolicyError
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    RateLimit,
    RetryConfig,
    RouteConfig,
    StateConfig,
    UpstreamConfig,
)

PLAIN_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
PATH = re.compile(r"^[A-Za-z0-9_\-]+(\[\d+\])?(\.[A-Za-z0-9_\-]+(\[\d+\])?)*$")


# ---------------------------------------------------------------- a tiny TOML writer


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(data: Mapping[str, Any]) -> str:
    """Scalars first, then tables, then arrays of tables ([[name]])."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for k, v in data.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, table in tables:
        lines.append(f"\n[{_key(k)}]")
        lines.extend(f"{_key(sk)} = {_value(sv)}" for sk, sv in table.items())
    for k, items in arrays:
        for item in items:
            lines.append(f"\n[[{_key(k)}]]")
            lines.extend(f"{_key(sk)} = {_value(sv)}" for sk, sv in item.items())
    return "\n".join(lines) + "\n"


def without_none(v: Any) -> Any:
    """TOML has no null: drop None values (and the keys that held them)."""
    if isinstance(v, Mapping):
        return {k: without_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [without_none(x) for x in v if x is not None]
    return v


# ---------------------------------------------------------------- strategies

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 700), st.text(max_size=6)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def field(*plausible: Any, extra: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    options: list[st.SearchStrategy[Any]] = [st.sampled_from(plausible)]
    if extra is not None:
        options.append(extra)
    options.append(junk)
    return st.one_of(*options)


ints = st.integers(-3, 200_000)
ratios = st.floats(-0.5, 1.5)
rates = st.from_regex(r"\s?[0-9]{0,4}\s?/\s?[0-9]{0,3}[a-z]{0,7}", fullmatch=True)
methods = st.lists(
    st.sampled_from(["GET", "get", "POST", "PUT", "DELETE", "BREW", "", "PATCH"]), max_size=3
)
cidrs = st.lists(
    st.sampled_from(["10.0.0.0/8", "::1/128", "10.0.0.1", "300.0.0.0/8", "x", "", "fc00::/7"]),
    max_size=3,
)
statuses = st.lists(st.sampled_from([500, 503, 429, 99, 600, "5xx", "4xx", "6xx", "x"]), max_size=4)


def table(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the known keys, sometimes with an unknown (typo'd) one."""
    typo = st.sampled_from(["rate_limt", "burts", "failure_rate", "urll", "enabeld", "x"])
    return st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.one_of(
            st.just(d), st.tuples(typo, junk).map(lambda kv, d=d: {**d, kv[0]: kv[1]})
        )
    )


breaker_fields = {
    "failure_ratio": field(0.5, 1.0, 0.0, extra=ratios),
    "min_calls": field(1, 20, 0, extra=ints),
    "window_s": field(30, 0.1, 0.05, 86_401),
    "open_s": field(5, 0.001, 0),
    "open_jitter": field(0.2, 0.0, 0.95),
    "half_open_probes": field(3, 1, 0, 1001),
    "probe_lease_s": field(30.0, 0.0),
    "slow_call_ms": field(100, 0),
    "slow_call_ratio": field(0.5, 0.0, 1.0),
    "consecutive_failures": field(5, 0),
    "failure_statuses": field(["5xx"], [500], extra=statuses),
    "enabled": field(True, False),
}
retry_fields = {
    "attempts": field(3, 1, 10, 11, 0),
    "base_ms": field(100, 0, -1),
    "max_ms": field(2000, 50, 0),
    "jitter": field("full", "equal", "decorrelated", "none", "FULL", "random"),
    "budget_ratio": field(0.2, 0.0, 10.0, 10.5),
    "budget_min_per_s": field(3.0, 0.0, -1.0),
    "budget_window_s": field(10.0, 0.1, 0.01),
    "retry_after_max_s": field(30.0, 0.0),
    "on_status": field([502, 503], ["5xx"], extra=statuses),
    "on_connect_error": field(True, False),
    "on_read_timeout": field(True, False),
    "on_429": field(True, False),
}
policy_tables = {
    "version": field(1, 2, 0),
    "state": table(
        {
            "url": field(
                "memory://",
                "redis://127.0.0.1:6379/0",
                "tiered+redis://h:1/0",
                "unix:///tmp/r.sock",
                "ftp://x",
                "",
            ),
            "on_error": field("local", "open", "closed", "LOCAL", "fallback"),
            "timeout_ms": field(250, 0, 60_001),
            "connect_timeout_ms": field(250, 0),
            "pool_size": field(32, 0),
            "max_keys": field(100_000, 15, 16),
            "sync_interval_ms": field(100, 0),
            "key_prefix": field("fmw", "", " "),
        }
    ),
    "deadline": table(
        {
            "header": field(
                ["x-request-timeout-ms"],
                "grpc-timeout",
                [],
                ["bad header"],
                ["X-Request-Timeout-Ms", "grpc-timeout"],
            ),
            "default_ms": field(30_000, 0, 86_400_001),
            "max_ms": field(60_000, 0),
        }
    ),
    "rate_limit": st.lists(
        table(
            {
                "name": field("per-client", "default", "", "dup"),
                "rate": field("100/s", "5/0s", "0/s", "1/fortnight", "10/10min", extra=rates),
                "burst": field(200, 0, 1, 10**10),
                "cost": field(1, 0, 300, 10**7),
                "key": field(
                    "client_ip", "route", "global", "header:X-Api-Key", "header:", "ip", "cookie:x"
                ),
                "match": field("/api/*", "*", ""),
                "methods": field(["GET"], [], extra=methods),
                "shadow": field(True, False, "yes"),
            }
        ),
        max_size=3,
    ),
    "breaker": st.one_of(table(breaker_fields), st.booleans()),
    "route": st.lists(
        table(
            {
                "match": field("/api/*", ""),
                "methods": field(["POST"], extra=methods),
                "name": field("api", ""),
                "deadline_ms": field(1000, 0),
                "breaker": st.one_of(st.booleans(), table(breaker_fields)),
            }
        ),
        max_size=2,
    ),
    "upstream": st.lists(
        table(
            {
                "host": field("*", "payments.internal", ""),
                "retry": st.one_of(table(retry_fields), junk),
                "breaker": st.one_of(table(breaker_fields), st.booleans()),
                "attempt_timeout_ms": field(10_000, 0),
            }
        ),
        max_size=2,
    ),
    "trusted_proxies": field(["10.0.0.0/8"], extra=cidrs),
    "trusted_peers": field(["127.0.0.0/8"], extra=cidrs),
    "rate_limit_headers": field("always", "on_reject", "never", "sometimes"),
}
policies = table(policy_tables)


# ---------------------------------------------------------------- checks


KNOWN_KEYS = {
    f.metadata.get("toml", f.name)
    for cls in (
        Policy,
        StateConfig,
        DeadlineConfig,
        RateLimit,
        BreakerConfig,
        RouteConfig,
        RetryConfig,
        UpstreamConfig,
    )
    for f in dataclasses.fields(cls)
    if f.init
}


def names_in(data: Any) -> set[str]:
    """Every key name occurring anywhere in `data`."""
    names: set[str] = set()
    if isinstance(data, Mapping):
        for k, v in data.items():
            names.add(str(k))
            names |= names_in(v)
    elif isinstance(data, list | tuple):
        for v in data:
            names |= names_in(v)
    return names


def attempt(load: Any) -> tuple[Policy | None, PolicyError | None]:
    """Run `load`; a PolicyError is an answer, any other exception fails the test."""
    try:
        return load(), None
    except PolicyError as exc:
        return None, exc


def check_outcome(data: Mapping[str, Any], load: Any) -> str:
    policy, exc = attempt(load)
    if exc is not None:
        assert exc.issues, "a PolicyError lists its problems"
        present = names_in(data)
        for issue in exc.issues:
            assert issue.message.strip(), issue
            if issue.path and all(PLAIN_KEY.match(name) for name in present):
                assert PATH.match(issue.path), issue.path
                parts = [re.sub(r"\[\d+\]$", "", part) for part in issue.path.split(".")]
                # the table is one the input has; the key is one it has, or a
                # documented key whose default is the problem (two unnamed
                # limits share the name 'default')
                assert parts[0] in present, (issue.path, data)
                for part in parts[1:]:
                    assert part in present or part in KNOWN_KEYS, (issue.path, data)
            assert str(issue) in str(exc)
        return "PolicyError"
    assert isinstance(policy, Policy)
    again = Policy.from_dict(policy.to_dict())
    assert again.version == policy.version, "to_dict() must load back to the same policy"
    assert again == policy
    return "Policy"


@settings(max_examples=400, deadline=None)
@given(data=policies)
def test_from_dict_gives_a_policy_or_a_policy_error(data: dict[str, Any]) -> None:
    event(check_outcome(data, lambda: Policy.from_dict(data)))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=policies)
def test_from_toml_gives_a_policy_or_a_policy_error(tmp_path: Path, data: dict[str, Any]) -> None:
    data = without_none(data)
    text = to_toml(data)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", dir=tmp_path, delete=False) as fh:
        fh.write(text)
    event(check_outcome(data, lambda: Policy.from_toml(fh.name)))


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_arbitrary_bytes_are_a_policy_error_with_the_file_name(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "policy.toml"
    path.write_bytes(raw)
    policy, exc = attempt(lambda: Policy.from_toml(path))
    if exc is not None:
        assert exc.source == str(path)
        assert str(path) in str(exc)
    else:
        assert isinstance(policy, Policy)  # e.g. an empty file or comments only


@pytest.mark.parametrize(
    "raw",
    [
        b"version = 1\n# caf\xe9\n",  # latin-1, not UTF-8
        b"\xff\xfe[\x00s\x00",  # UTF-16 with a BOM
        b'[state]\nurl = "memory://\xc3"\n',
    ],
)
def test_a_file_that_is_not_utf8_is_a_policy_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(raw)
    with pytest.raises(PolicyError, match="not valid TOML"):
        Policy.from_toml(path)


def test_errors_name_the_key_path() -> None:
    data = {
        "rate_limit": [{"rate": "5/s"}, {"rate": "5/fortnight", "burts": 3}],
        "upstream": [{"retry": {"attempts": 11}}],
        "breaker": {"failure_ratio": 1.5},
    }
    with pytest.raises(PolicyError) as info:
        Policy.from_dict(data)
    paths = {issue.path for issue in info.value.issues}
    assert "rate_limit[1].burts" in paths
    assert "upstream[0].retry.attempts" in paths
    assert "breaker.failure_ratio" in paths


@pytest.mark.parametrize(
    "data",
    [
        {"breaker": False},
        {"upstream": [{"host": "a.internal", "breaker": False}]},
        {"breaker": {"enabled": False}, "route": [{"match": "/x", "breaker": False}]},
    ],
)
def test_a_disabled_breaker_survives_the_to_dict_round_trip(data: dict[str, Any]) -> None:
    policy = Policy.from_dict(data)
    plain = policy.to_dict()
    assert Policy.from_dict(plain) == policy
    assert Policy.from_dict(json.loads(json.dumps(plain))).version == policy.version
