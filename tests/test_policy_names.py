"""Names in a policy: safe to send in a header, unique, and every problem in one pass.

Limit names travel in `RateLimit-Policy` / `RateLimit` as RFC 8941 sf-strings;
a name that cannot be encoded used to disable every layer at request time, so
it is refused at load time instead, with its key path. Limit names key the
counters and route names key the route's breaker, so two entries may not
share one (a route without a name is named by its match).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fidelity_mw import Policy, PolicyError, RateLimit, RouteConfig, StateConfig, UpstreamConfig
from fidelity_mw.decide.gcra import policy_field
from fidelity_mw.routeplan import sf_string_content
from fidelity_mw.tools.cli import main


def issues_of(exc: pytest.ExceptionInfo[PolicyError]) -> dict[str, str]:
    return {issue.path: issue.message for issue in exc.value.issues}


UNSAFE = ["per-client — v2", 'say "hi"', "back\\slash", "tab\there", "bell\x07", "café"]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_limit_name_is_refused_at_load_time(name: str) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"rate_limit": [{"name": "ok"}, {"name": name, "rate": "1/min"}]})
    found = issues_of(exc)
    assert list(found) == ["rate_limit[1].name"]
    assert "printable ASCII" in found["rate_limit[1].name"]


@pytest.mark.parametrize("name", UNSAFE)
def test_unsafe_route_name_is_refused(name: str) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"route": [{"match": "/a/*", "name": name}]})
    assert list(issues_of(exc)) == ["route[0].name"]


def test_unnamed_route_whose_match_is_not_header_safe_needs_a_name() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"route": [{"match": "/café/*"}]})
    found = issues_of(exc)
    assert list(found) == ["route[0].match"]
    assert "set name" in found["route[0].match"]
    named = Policy.from_dict({"route": [{"match": "/café/*", "name": "cafe"}]})
    assert named.routes[0].route_name == "cafe"


@pytest.mark.parametrize("host", ["bücher.example", 'a"b.example', "a b.example", "x\\y"])
def test_upstream_host_must_be_ascii(host: str) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"upstream": [{"host": host}]})
    found = issues_of(exc)
    assert list(found) == ["upstream[0].host"]
    assert "xn--" in found["upstream[0].host"]


def test_python_construction_refuses_unsafe_names_too() -> None:
    with pytest.raises(PolicyError, match="name"):
        RateLimit(name="per-client — v2")
    with pytest.raises(PolicyError, match="name"):
        RouteConfig(match="/x", name='a"b')
    with pytest.raises(PolicyError, match="host"):
        UpstreamConfig(host="bücher.example")


# ("|" is the one printable left out: it separates a limit's name from the client key)
@pytest.mark.parametrize("name", ["per-client v2", "a;b=c, d", "~!#$%&'()*+-./:<=>?@[]^_`{}"])
def test_every_accepted_name_encodes_as_an_sf_string(name: str) -> None:
    # What the validation lets through must be what the header code can send.
    policy = Policy.from_dict({"rate_limit": [{"name": name}]})
    field = policy_field(policy.rate_limits[0].name, 10, 1.0)
    field.encode("ascii")
    assert field.startswith(json.dumps(name))


def _sf_string_content_by_character(text: str) -> str:
    """The rule, one character at a time (what the fast path must agree with)."""
    return "".join("\\" + ch if ch in '"\\' else ch if " " <= ch <= "~" else "?" for ch in text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/api/items/{item_id}:10/s",
        "~!#$%&'()*+-./:<=>?@[]^_`{}| ",
        *UNSAFE,
        "del\x7f",
        "nul\x00",
        "nbsp\xa0",
        "\u2028",
        'ünï"cödé\\',
        "".join(map(chr, range(256))),
    ],
)
def test_sf_string_content_keeps_safe_text_and_escapes_or_replaces_the_rest(text: str) -> None:
    # (a FastAPI limit's default name is made safe per request: the safe case is returned
    # as it is, every other one goes through the rule character by character)
    assert sf_string_content(text) == _sf_string_content_by_character(text)
    sf_string_content(text).encode("ascii")


def test_check_reports_an_unsafe_limit_name_on_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[[rate_limit]]\nname = "per-client — v2"\nrate = "1/min"\n', "utf-8")
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: rate_limit[0].name: " in out
    assert "U+2014" in out


# ---------------------------------------------------------------- duplicate route names


def test_routes_named_by_the_same_match_are_refused() -> None:
    data: dict[str, Any] = {
        "route": [
            {"match": "/api/*", "methods": ["POST"], "breaker": {"min_calls": 3}},
            {"match": "/api/*", "breaker": {"min_calls": 50}},
        ]
    }
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(data)
    found = issues_of(exc)
    assert list(found) == ["route[1].name"]
    assert '"/api/*" is already the name of route[0]' in found["route[1].name"]
    assert "set name" in found["route[1].name"]
    data["route"][0]["name"] = "api-post"
    assert [r.route_name for r in Policy.from_dict(data).routes] == ["api-post", "/api/*"]


def test_explicit_duplicate_route_names_are_refused() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy(
            routes=(
                RouteConfig(match="/a/*", name="same"),
                RouteConfig(match="/b/*"),
                RouteConfig(match="/c/*", name="same"),
            )
        )
    assert list(issues_of(exc)) == ["route[2].name"]


def test_a_name_equal_to_another_routes_match_is_a_duplicate() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict({"route": [{"match": "/a/*"}, {"match": "/b/*", "name": "/a/*"}]})
    assert list(issues_of(exc)) == ["route[1].name"]


# ---------------------------------------------------------------- one pass, TOML spelling


def test_duplicate_names_come_with_every_other_problem() -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(
            {
                "state": {"timeout_ms": 0},
                "rate_limit": [{"name": "a", "rate": "x"}, {"name": "a"}, {"nmae": "b"}],
                "route": [{"match": "/x"}, {"match": "/x", "deadline_ms": 0}],
            }
        )
    assert set(issues_of(exc)) == {
        "state.timeout_ms",
        "rate_limit[0].rate",
        "rate_limit[1].name",
        "rate_limit[2].nmae",
        "route[1].deadline_ms",
        "route[1].name",
    }


def test_key_prefix_may_not_contain_braces() -> None:
    for prefix in ("{fmw}", "a{b", "a}b"):
        with pytest.raises(PolicyError) as exc:
            Policy.from_dict({"state": {"key_prefix": prefix}})
        assert "brace" in issues_of(exc)["state.key_prefix"]
    assert StateConfig(key_prefix="fmw-prod").key_prefix == "fmw-prod"


@pytest.mark.parametrize(
    ("data", "path", "spelled"),
    [
        ({"rate_limit": [{"name": True}]}, "rate_limit[0].name", "got true"),
        ({"rate_limit": [{"shadow": "yes"}]}, "rate_limit[0].shadow", 'got "yes"'),
        ({"upstream": [{"retry": {"attempts": False}}]}, "upstream[0].retry.attempts", "false"),
        ({"state": {"timeout_ms": [1, True]}}, "state.timeout_ms", "got array [1, true]"),
        ({"breaker": {"min_calls": 1.5}}, "breaker.min_calls", "got float 1.5"),
    ],
)
def test_messages_spell_values_as_toml_does(data: dict[str, Any], path: str, spelled: str) -> None:
    with pytest.raises(PolicyError) as exc:
        Policy.from_dict(data)
    message = issues_of(exc)[path]
    assert spelled in message
    assert "True" not in message
    assert "False" not in message
    assert "'" not in message
