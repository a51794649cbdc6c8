"""Policy: construction in Python, TOML loading, validation messages, version hash."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fidelity_mw import (
    BreakerConfig,
    DeadlineConfig,
    Policy,
    PolicyError,
    RateLimit,
    RetryConfig,
    RouteConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.errors import PolicyIssue
from fidelity_mw.policy import parse_rate


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fidelity.toml"
    path.write_text(textwrap.dedent(text))
    return path


def issues_of(exc: pytest.ExceptionInfo[PolicyError]) -> dict[str, str]:
    return {issue.path: issue.message for issue in exc.value.issues}


FULL = """
version = 1
trusted_proxies = ["10.0.0.0/8"]
rate_limit_headers = "on_reject"

[state]
url = "memory://"
on_error = "closed"
timeout_ms = 100

[deadline]
header = ["X-Request-Timeout-Ms", "grpc-timeout"]
default_ms = 5000

[[rate_limit]]
name = "per-client"
match = "/api/*"
key = "client_ip"
rate = "100/s"
burst = 200

[[rate_limit]]
name = "per-key"
key = "header:X-Api-Key"
rate = "5/10min"
cost = 2
methods = ["get", "POST"]
shadow = true

[breaker]
failure_ratio = 0.25
min_calls = 10
window_s = 60
open_s = 2.5
half_open_probes = 1
failure_statuses = ["5xx", 429]

[[route]]
match = "/health"
breaker = false
deadline_ms = 100

[[route]]
match = "/slow/*"
name = "slow"
breaker = { failure_ratio = 0.9, min_calls = 5 }

[[upstream]]
host = "payments.internal"
retry = { attempts = 4, base_ms = 50, max_ms = 1000, jitter = "equal" }
breaker = { failure_ratio = 0.5, min_calls = 20, window_s = 30, open_s = 5 }
attempt_timeout_ms = 2000
"""


# ---------------------------------------------------------------- construction


def test_defaults_match_design() -> None:
    policy = Policy()
    assert policy.state.url == "memory://"
    assert policy.state.on_error == "local"
    assert policy.state.timeout_ms == 250
    assert policy.deadline.default_ms == 30_000
    assert policy.rate_limits == ()
    breaker = policy.breaker
    assert breaker is not None
    assert (breaker.failure_ratio, breaker.min_calls, breaker.window_s) == (0.5, 20, 30.0)
    assert (breaker.open_s, breaker.open_jitter, breaker.half_open_probes) == (5.0, 0.2, 3)
    assert breaker.failure_statuses == frozenset(range(500, 600))
    retry = policy.upstream_for("anything.example")
    assert retry.retry.attempts == 3
    assert (retry.retry.base_ms, retry.retry.max_ms, retry.retry.jitter) == (100, 2000, "full")


def test_python_construction() -> None:
    limit = RateLimit(name="api", rate="10/s", burst=20, cost=2, key="header:X-Api-Key")
    policy = Policy(
        rate_limits=[limit],  # a list is accepted and frozen into a tuple
        breaker=BreakerConfig(min_calls=5, consecutive_failures=3),
        routes=(RouteConfig(match="/health", breaker=False),),
        trusted_proxies=("10.0.0.0/8",),
    )
    assert policy.rate_limits == (limit,)
    assert isinstance(policy.rate_limits, tuple)
    assert limit.limit == 10
    assert limit.period_s == 1.0
    assert limit.burst_size == 20
    assert limit.emission_interval_s == pytest.approx(0.1)
    assert RateLimit(rate="10/s").burst_size == 10  # burst defaults to the count
    with pytest.raises(AttributeError):
        policy.breaker = None  # type: ignore[misc]


def test_python_construction_errors_name_the_field() -> None:
    with pytest.raises(PolicyError) as exc:
        RateLimit(rate="lots", burst=0)
    found = issues_of(exc)
    assert "is not a rate" in found["rate"]
    assert "N/s" in found["rate"]
    assert "allowed between 1 and" in found["burst"]
    with pytest.raises(PolicyError) as exc:
        Policy(rate_limits=("not a limit",))  # type: ignore[arg-type]
    assert "expected a RateLimit" in issues_of(exc)["rate_limit"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/s", (100, 1.0)),
        ("5/10min", (5, 600.0)),
        ("1/h", (1, 3600.0)),
        ("7 / 2 d", (7, 172_800.0)),
        ("60/minute", (60, 60.0)),
    ],
)
def test_parse_rate(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "100", "0/s", "-1/s", "1.5/s", "10/fortnight", "5/0s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 per minute", (5, 60.0)),
        ("10 per 2 minutes", (10, 120.0)),
        ("100/hours", (100, 3600.0)),
        ("3/secs", (3, 1.0)),
        ("2 PER Day", (2, 86_400.0)),
    ],
)
def test_parse_rate_takes_slowapi_spellings(text: str, expected: tuple[int, float]) -> None:
    """What a slowapi / limits user writes in @limiter.limit(...) works as a rate."""
    assert parse_rate(text) == expected


def test_parse_rate_ms_is_not_minutes() -> None:
    with pytest.raises(ValueError, match='unknown period unit "ms"'):
        parse_rate("5/ms")


def test_several_rates_in_one_string_name_the_fix() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"rate_limit": [{"name": "a", "rate": "5/minute;100/hour"}]})
    assert issues_of(exc)["rate_limit[0].rate"] == (
        '"5/minute;100/hour" holds several rates: write one [[rate_limit]] per rate, '
        "each with its own name"
    )


def test_route_template_as_match_is_an_error_naming_the_glob() -> None:
    """`match` globs the request path: "/items/{item_id}" never matches a request."""
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(
            {
                "rate_limit": [{"name": "a", "match": "/items/{item_id}"}],
                "route": [{"match": "/files/{path:path}"}],
            }
        )
    problems = {i.path: i.message for i in exc.value.issues}
    assert problems == {
        "rate_limit[0].match": '"/items/{item_id}" never matches: match is a glob over the '
        'request path, not a route template (write "/items/*")',
        "route[0].match": '"/files/{path:path}" never matches: match is a glob over the '
        'request path, not a route template (write "/files/*")',
    }


def test_breaker_of_the_wrong_type_says_what_it_may_be() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(
            {"route": [{"match": "/a", "breaker": "off"}], "upstream": [{"breaker": 0}]}
        )
    problems = {i.path: i.message for i in exc.value.issues}
    assert problems["route[0].breaker"] == (
        'expected a table of breaker keys, true or false (no breaker), got string "off"'
    )
    assert problems["upstream[0].breaker"].startswith(
        "expected a table of breaker keys, true or false"
    )


def test_max_ms_below_base_ms_names_the_default_and_the_fix() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"upstream": [{"retry": {"base_ms": 5000}}]})
    assert {i.path: i.message for i in exc.value.issues} == {
        "upstream[0].retry.max_ms": "max_ms 2000 (the default) is below base_ms 5000: "
        "set max_ms >= 5000"
    }


# ---------------------------------------------------------------- TOML


def test_full_toml_loads(tmp_path: Path) -> None:
    policy = Policy.from_toml(write(tmp_path, FULL))
    assert policy.trusted_proxies == ("10.0.0.0/8",)
    assert policy.rate_limit_headers == "on_reject"
    assert policy.state.on_error == "closed"
    assert policy.deadline.header == ("x-request-timeout-ms", "grpc-timeout")  # lowercased
    assert policy.deadline.default_ms == 5000
    first, second = policy.rate_limits
    assert (first.name, first.match, first.burst_size, first.limit) == (
        "per-client",
        "/api/*",
        200,
        100,
    )
    assert second.key == "header:X-Api-Key"
    assert second.period_s == 600.0
    assert second.methods == ("GET", "POST")
    assert second.shadow is True
    assert second.cost == 2
    breaker = policy.breaker
    assert breaker is not None
    assert breaker.failure_ratio == 0.25
    assert breaker.half_open_probes == 1
    assert breaker.failure_statuses == frozenset([*range(500, 600), 429])
    health, slow = policy.routes
    assert health.breaker is False
    assert health.deadline_ms == 100
    assert isinstance(slow.breaker, BreakerConfig)
    assert slow.breaker.failure_ratio == 0.9
    assert slow.breaker.min_calls == 5
    assert slow.name == "slow"
    upstream = policy.upstream_for("payments.internal")
    assert upstream.retry.attempts == 4
    assert upstream.retry.jitter == "equal"
    assert upstream.attempt_timeout_ms == 2000
    assert policy.upstream_for("other.internal") == UpstreamConfig()


def test_toml_and_python_give_the_same_policy(tmp_path: Path) -> None:
    from_file = Policy.from_toml(
        write(
            tmp_path,
            """
            [[rate_limit]]
            name = "api"
            rate = "10/s"
            burst = 20

            [breaker]
            min_calls = 5
            """,
        )
    )
    in_python = Policy(
        rate_limits=(RateLimit(name="api", rate="10/s", burst=20),),
        breaker=BreakerConfig(min_calls=5),
    )
    assert from_file == in_python
    assert from_file.version == in_python.version


def test_bad_toml_syntax_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[[rate_limit]\nrate = \n")
    with pytest.raises(PolicyError) as exc:
        Policy.from_toml(path)
    assert exc.value.source == str(path)
    assert "not valid TOML" in str(exc.value)
    assert str(path) in str(exc.value)


def test_missing_file() -> None:
    with pytest.raises(PolicyError, match="cannot read policy file"):
        Policy.from_toml("/nonexistent/fidelity.toml")


def test_file_errors_carry_source_and_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[rate_limit]]
        name = "a"
        rate = "10/s"

        [[rate_limit]]
        name = "b"
        rate = "ten per second"
        """,
    )
    with pytest.raises(PolicyError) as exc:
        Policy.from_toml(path)
    assert exc.value.source == str(path)
    message = str(exc.value)
    assert str(path) in message
    assert "rate_limit[1].rate" in message
    assert '"ten per second" is not a rate' in message
    assert "N/s, N/min, N/h or N/d" in message  # what is allowed


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "path", "wrong", "allowed"),
    [
        (
            {"rate_limit": [{"name": "a"}, {"name": "b", "rate": "fast"}]},
            "rate_limit[1].rate",
            '"fast" is not a rate',
            "N/s",
        ),
        (
            {"rate_limit": [{"burst": -1}]},
            "rate_limit[0].burst",
            "-1 is out of range",
            "allowed between 1 and",
        ),
        (
            {"rate_limit": [{"burst": 2.5}]},
            "rate_limit[0].burst",
            "expected an integer, got float 2.5",
            "integer",
        ),
        (
            {"rate_limit": [{"cost": 5, "burst": 2}]},
            "rate_limit[0].cost",
            "cost 5 exceeds burst 2",
            "admitted",
        ),
        (
            {"rate_limit": [{"rate": "2/s", "cost": 3}]},
            "rate_limit[0].cost",
            "exceeds the default burst 2",
            "set burst >= cost",
        ),
        (
            {"rate_limit": [{"key": "cookie:session"}]},
            "rate_limit[0].key",
            '"cookie:session" is not a key',
            '"header:NAME"',
        ),
        (
            {"rate_limit": [{"methods": ["FETCH"]}]},
            "rate_limit[0].methods",
            '"FETCH" is not an HTTP method',
            "GET",
        ),
        (
            {"rate_limit": [{"shadow": "yes"}]},
            "rate_limit[0].shadow",
            'got "yes"',
            "true or false",
        ),
        (
            {"breaker": {"failure_ratio": 1.5}},
            "breaker.failure_ratio",
            "1.5 is out of range",
            "<= 1.0",
        ),
        (
            {"breaker": {"failure_ratio": 0}},
            "breaker.failure_ratio",
            "0 is out of range",
            "> 0.0",
        ),
        (
            {"breaker": {"slow_call_ms": 200}},
            "breaker.slow_call_ms",
            "go together",
            "set both",
        ),
        (
            {"breaker": {"failure_statuses": [200, 700]}},
            "breaker.failure_statuses",
            "700 is not an HTTP status code",
            "between 100 and 599",
        ),
        (
            {"breaker": {"enabled": "no"}},
            "breaker.enabled",
            'got "no"',
            "true or false",
        ),
        (
            {"route": [{"match": "/a"}, {"match": "/b", "breaker": {"open_s": 0}}]},
            "route[1].breaker.open_s",
            "0 is out of range",
            ">= 0.001",
        ),
        (
            {"route": [{"match": ""}]},
            "route[0].match",
            "expected a glob",
            '"/api/*"',
        ),
        (
            {"state": {"url": "http://redis:6379"}},
            "state.url",
            "unknown scheme",
            "redis://",
        ),
        (
            {"state": {"on_error": "explode"}},
            "state.on_error",
            '"explode" is not allowed',
            '"local", "open", "closed"',
        ),
        (
            {"deadline": {"header": ["bad header"]}},
            "deadline.header",
            '"bad header" is not a valid header name',
            "header name",
        ),
        (
            {"upstream": [{"retry": {"attempts": 11}}]},
            "upstream[0].retry.attempts",
            "11 is out of range",
            "between 1 and 10",
        ),
        (
            {"upstream": [{"retry": {"base_ms": 500, "max_ms": 100}}]},
            "upstream[0].retry.max_ms",
            "max_ms 100 is below base_ms 500",
            "base_ms",
        ),
        (
            {"upstream": [{"retry": {"jitter": "some"}}]},
            "upstream[0].retry.jitter",
            '"some" is not allowed',
            '"full"',
        ),
        (
            {"trusted_proxies": ["10.0.0.0/8", "not-a-net"]},
            "trusted_proxies",
            'item 1: "not-a-net" is not an IP network',
            "10.0.0.0/8",
        ),
        (
            {"rate_limit_headers": "sometimes"},
            "rate_limit_headers",
            '"sometimes" is not allowed',
            '"on_reject"',
        ),
        (
            {"version": 2},
            "version",
            "2 is not a policy version this fidelity_mw reads",
            "supported versions: 1",
        ),
        (
            {"rate_limit": 5},
            "rate_limit",
            "expected an array of tables",
            "[[rate_limit]]",
        ),
        (
            {"breaker": [1, 2]},
            "breaker",
            "expected a table",
            "table",
        ),
    ],
)
def test_validation_error_names_path_problem_and_allowed(
    data: dict[str, Any], path: str, wrong: str, allowed: str
) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(data)
    found = issues_of(exc)
    assert path in found, found
    assert wrong in found[path]
    assert allowed in found[path]
    assert f"{path}: " in str(exc.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(
            {
                "breaker": {"failure_ratio": 2, "min_calls": 0},
                "rate_limit": [{"rate": "x"}],
                "state": {"timeout_ms": 0},
            }
        )
    assert set(issues_of(exc)) == {
        "breaker.failure_ratio",
        "breaker.min_calls",
        "rate_limit[0].rate",
        "state.timeout_ms",
    }


@pytest.mark.parametrize(
    ("data", "path", "suggestion"),
    [
        ({"breakr": {}}, "breakr", "breaker"),
        ({"rate_limit": [{"name": "a", "rat": "1/s"}]}, "rate_limit[0].rat", "rate"),
        ({"breaker": {"min_call": 3}}, "breaker.min_call", "min_calls"),
        ({"route": [{"math": "/x"}]}, "route[0].math", "match"),
        ({"upstream": [{"retry": {"atempts": 2}}]}, "upstream[0].retry.atempts", "attempts"),
        ({"deadline": {"headers": ["x-a"]}}, "deadline.headers", "header"),
    ],
)
def test_unknown_keys_are_rejected_with_a_suggestion(
    data: dict[str, Any], path: str, suggestion: str
) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(data)
    found = issues_of(exc)
    assert path in found
    assert "unknown key" in found[path]
    assert f"did you mean {suggestion!r}?" in found[path]
    assert "allowed:" in found[path]


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"rate_limit": [{"zzzzzz": 1}]})
    message = issues_of(exc)["rate_limit[0].zzzzzz"]
    assert "did you mean" not in message
    assert (
        "allowed: burst, charge, client_ipv6_prefix, cost, exclude, key, match, methods, "
        "name, rate, "
        "retry_credit_s, shadow" in message
    )


def test_internal_fields_are_not_keys() -> None:
    # `_version` is computed, never read from a file: it is an unknown key.
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"_version": "abc"})
    found = issues_of(exc)
    assert "unknown key" in found["_version"]
    assert "_version" not in found["_version"].split("allowed:")[1]


def test_typo_in_limit_does_not_silently_disable_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[rate_limit]]
        name = "api"
        rate = "10/s"
        sahdow = true
        """,
    )
    with pytest.raises(
        PolicyError, match=r"rate_limit\[0\]\.sahdow: unknown key; did you mean 'shadow'"
    ):
        Policy.from_toml(path)


def test_duplicate_limit_names() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(
            {"rate_limit": [{"name": "a"}, {"name": "b"}, {"name": "a", "rate": "5/s"}]}
        )
    found = issues_of(exc)
    assert list(found) == ["rate_limit[2].name"]
    assert '"a" is already the name of rate_limit[0]' in found["rate_limit[2].name"]
    assert "unique" in found["rate_limit[2].name"]


# ---------------------------------------------------------------- breaker switches


def test_breaker_enabled_false_disables_it(tmp_path: Path) -> None:
    policy = Policy.from_toml(write(tmp_path, "[breaker]\nenabled = false\nmin_calls = 3\n"))
    assert policy.breaker is None


def test_breaker_false_disables_it() -> None:
    assert Policy.from_dict({"breaker": False}).breaker is None
    assert Policy.from_dict({"breaker": True}).breaker == BreakerConfig()


def test_breaker_enabled_true_keeps_settings(tmp_path: Path) -> None:
    policy = Policy.from_toml(write(tmp_path, "[breaker]\nenabled = true\nmin_calls = 3\n"))
    assert policy.breaker == BreakerConfig(min_calls=3)


def test_route_breaker_switches() -> None:
    policy = Policy.from_dict(
        {
            "route": [
                {"match": "/a", "breaker": False},
                {"match": "/b", "breaker": {"enabled": False}},
                {"match": "/c", "breaker": {"enabled": True, "min_calls": 2}},
                {"match": "/d"},
            ]
        }
    )
    a, b, c, d = policy.routes
    assert a.breaker is False
    assert b.breaker is False
    assert c.breaker == BreakerConfig(min_calls=2)
    assert d.breaker is True  # the policy's [breaker]


def test_upstream_breaker_can_be_disabled() -> None:
    policy = Policy.from_dict({"upstream": [{"host": "a", "breaker": {"enabled": False}}]})
    assert policy.upstreams[0].breaker is None


def test_route_overrides(tmp_path: Path) -> None:
    policy = Policy.from_toml(
        write(
            tmp_path,
            """
            [[route]]
            match = "/reports/*"
            methods = ["get"]
            name = "reports"
            deadline_ms = 60000
            breaker = { consecutive_failures = 3, open_s = 10 }
            """,
        )
    )
    (route,) = policy.routes
    assert route.match == "/reports/*"
    assert route.methods == ("GET",)
    assert route.name == "reports"
    assert route.deadline_ms == 60000
    assert route.breaker == BreakerConfig(consecutive_failures=3, open_s=10)


def test_route_breaker_of_wrong_type_in_python() -> None:
    with pytest.raises(PolicyError) as exc:
        RouteConfig(breaker="yes")  # type: ignore[arg-type]
    assert "expected true, false or a breaker table" in issues_of(exc)["breaker"]


# ---------------------------------------------------------------- version


def test_version_is_a_short_stable_hash(tmp_path: Path) -> None:
    a = Policy.from_toml(write(tmp_path, FULL))
    b = Policy.from_toml(write(tmp_path, FULL))
    assert a.version == b.version
    assert len(a.version) == 12
    int(a.version, 16)  # hex
    assert Policy().version == Policy.from_dict({}).version


def test_version_ignores_formatting_order_and_case(tmp_path: Path) -> None:
    one = write(tmp_path, '[breaker]\nmin_calls = 5\nopen_s = 2\n\n[deadline]\nheader = ["X-A"]\n')
    v1 = Policy.from_toml(one).version
    two = write(
        tmp_path, '[deadline]\nheader = ["x-a"]\n[breaker]\nopen_s = 2\nmin_calls = 5 # c\n'
    )
    assert Policy.from_toml(two).version == v1


@pytest.mark.parametrize(
    "change",
    [
        {"breaker": {"min_calls": 21}},
        {"breaker": False},
        {"rate_limit": [{"rate": "101/s"}]},
        {"rate_limit": [{"rate": "100/s", "shadow": True}]},
        {"rate_limit": [{"rate": "100/s", "name": "other"}]},
        {"trusted_proxies": ["10.0.0.0/8"]},
        {"route": [{"match": "/x", "breaker": False}]},
        {"deadline": {"default_ms": 1000}},
    ],
)
def test_different_content_different_version(change: dict[str, Any]) -> None:
    base = Policy.from_dict({"rate_limit": [{"rate": "100/s"}]})
    assert Policy.from_dict(change).version != base.version


def test_defaults_written_out_do_not_change_the_version() -> None:
    explicit = Policy.from_dict({"breaker": {"failure_ratio": 0.5, "min_calls": 20}})
    assert explicit.version == Policy().version


# ---------------------------------------------------------------- never another exception

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "100/s",
            "5/0s",
            "1/min",
            "client_ip",
            "header:X-Key",
            "route",
            "global",
            "5xx",
            "GET",
            "*",
            "/api/*",
            "memory://",
            "redis://x",
            "local",
            "full",
            "10.0.0.0/8",
            "::1/128",
        ]
    ),
)
_keys = st.sampled_from(
    [
        "name",
        "rate",
        "burst",
        "cost",
        "key",
        "match",
        "methods",
        "shadow",
        "enabled",
        "failure_ratio",
        "min_calls",
        "window_s",
        "open_s",
        "half_open_probes",
        "slow_call_ms",
        "slow_call_ratio",
        "consecutive_failures",
        "failure_statuses",
        "url",
        "on_error",
        "header",
        "default_ms",
        "max_ms",
        "host",
        "retry",
        "breaker",
        "attempts",
        "base_ms",
        "jitter",
        "deadline_ms",
        "on_status",
        "bogus",
        "_version",
        "version",
    ]
) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=20,
)
_top_keys = st.sampled_from(
    [
        "state",
        "deadline",
        "rate_limit",
        "breaker",
        "route",
        "upstream",
        "trusted_proxies",
        "trusted_peers",
        "rate_limit_headers",
        "version",
        "_version",
        "typo",
    ]
)


def build(data: dict[str, Any]) -> tuple[Policy | None, list[PolicyIssue]]:
    """from_dict, with any PolicyError turned into its issues (any other error escapes)."""
    try:
        return Policy.from_dict(data), []
    except PolicyError as exc:
        return None, exc.issues


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_top_keys, _values, max_size=5))
def test_random_policy_builds_or_raises_policy_error(data: dict[str, Any]) -> None:
    policy, issues = build(data)
    if policy is None:
        assert issues
        for issue in issues:
            assert issue.message
            assert issue.path.split(".")[0].split("[")[0] in data
        return
    # Whatever built is fully usable: hashable content, usable limits.
    assert len(policy.version) == 12
    for limit in policy.rate_limits:
        assert limit.emission_interval_s > 0
        assert limit.burst_size >= limit.cost


@settings(max_examples=100, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(min_size=1, max_size=5),
            "rate": _scalars,
            "burst": _scalars,
            "cost": _scalars,
            "key": _scalars,
            "match": _scalars,
            "methods": st.lists(_scalars, max_size=3),
            "shadow": _scalars,
        },
    )
)
def test_random_rate_limit_builds_or_raises_policy_error(limit: dict[str, Any]) -> None:
    _, issues = build({"rate_limit": [limit]})
    assert all(issue.path.startswith("rate_limit[0]") for issue in issues)


def test_sections_are_exported() -> None:
    # Every section class constructs with defaults (the documented public names).
    for cls in (StateConfig, DeadlineConfig, BreakerConfig, RetryConfig, RouteConfig):
        assert cls() == cls()


def test_stale_shedding_needs_a_tolerance_above_one() -> None:
    """(tolerance - 1) x floor is the wait a request may have had: at 1.0 every request
    beside one in flight would be shed, so the policy says so instead."""
    from fidelity_mw.policy.model import ConcurrencyConfig

    with pytest.raises(PolicyError) as exc:
        ConcurrencyConfig(limit=4, adaptive=True, shed_stale=True, tolerance=1.0)
    assert issues_of(exc)["shed_stale"] == "needs tolerance > 1"
    assert ConcurrencyConfig(limit=4, adaptive=True, shed_stale=True, tolerance=1.1).shed_stale


def test_an_unknown_state_url_scheme_is_named_without_its_password() -> None:
    """The error goes to startup logs and CI output: the URL's password does not."""
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"state": {"url": "Redis://app:s3cr3t-pw@redis.internal:6379/0"}})
    message = str(caught.value)
    assert "s3cr3t-pw" not in message
    assert '"Redis://app:***@redis.internal:6379/0" has an unknown scheme' in message
