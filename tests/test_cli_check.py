"""`fidelity-mw check`: exit codes, and every error placed at file, line and key path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fidelity_mw.policy import glob_matches
from fidelity_mw.policy.lines import locate_keys, toml_error_position
from fidelity_mw.tools.check import glob_covers
from fidelity_mw.tools.cli import main

GOOD = """\
version = 1

[state]
url = "memory://"

[[rate_limit]]
name = "per-client"
match = "/api/*"
rate = "100/s"
burst = 200

[[upstream]]
host = "payments.internal"
retry = { attempts = 3, base_ms = 100 }
"""

BAD = """\
version = 1

[state]
url = "memory://"
on_error = "sometimes"

[[rate_limit]]
name = "per-client"
rate = "100/fortnight"

[[rate_limit]]
name = "search"
rate = "5/s"
brust = 10

[[upstream]]
host = "payments.internal"
retry = { attempts = 30, base_ms = 100 }

[[upstream]]
host = "ledger.internal"

[upstream.breaker]
failure_ratio = 2.0
"""


def write(tmp_path: Path, text: str, name: str = "fidelity.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_clean_policy_exits_0_with_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, GOOD)
    assert main(["check", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: ok, policy version ")
    assert "1 rate limit(s), 0 route(s), 1 upstream(s), state memory" in out


def test_every_error_names_file_line_and_key_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = write(tmp_path, BAD)
    assert main(["check", path]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [
        f'{path}:5: state.on_error: "sometimes" is not allowed: '
        'choose one of "local", "open", "closed"',
        f'{path}:9: rate_limit[0].rate: unknown period unit "fortnight" in '
        '"100/fortnight": use s, min, h or d',
        f"{path}:14: rate_limit[1].brust: unknown key; did you mean 'burst'? "
        "(allowed: burst, charge, client_ipv6_prefix, cost, exclude, key, match, methods, "
        "name, rate, "
        "retry_credit_s, shadow)",
        f"{path}:18: upstream[0].retry.attempts: 30 is out of range: allowed between 1 and 10",
        f"{path}:24: upstream[1].breaker.failure_ratio: 2.0 is out of range: allowed > 0.0 "
        "and <= 1.0",
    ]
    assert lines[-1] == f"{path}: 5 error(s)"


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, BAD)
    assert main(["check", "--json", path]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    (result,) = doc["files"]
    assert result["version"] is None
    first = result["errors"][0]
    assert first == {
        "file": path,
        "line": 5,
        "path": "state.on_error",
        "message": '"sometimes" is not allowed: choose one of "local", "open", "closed"',
        "severity": "error",
    }
    assert [e["line"] for e in result["errors"]] == [5, 9, 14, 18, 24]


def test_json_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, GOOD)
    assert main(["check", "--json", path]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert len(doc["files"][0]["version"]) == 12
    assert doc["files"][0]["errors"] == []


def test_cross_check_on_a_defaulted_key_falls_back_to_the_table_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # Two limits without a name both get "default": the duplicate is reported at
    # rate_limit[1].name, which is not in the file: the [[rate_limit]] header is.
    text = '[[rate_limit]]\nrate = "1/s"\n\n# second\n[[rate_limit]]\nrate = "2/s"\n'
    path = write(tmp_path, text)
    assert main(["check", path]) == 1
    out = capsys.readouterr().out
    assert f'{path}:5: rate_limit[1].name: "default" is already the name of rate_limit[0]' in out


def test_invalid_toml_reports_the_parser_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, 'version = 1\n[state]\nurl = "memory://\n')
    assert main(["check", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}:3: not valid TOML: ")


def test_warnings_do_not_fail_unless_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text = (
        '[[route]]\nmatch = "*"\n\n[[route]]\nmatch = "/api/*"\n\n'
        '[[upstream]]\nhost = "*"\n\n[[upstream]]\nhost = "payments.internal"\n'
    )
    path = write(tmp_path, text)
    assert main(["check", path]) == 0
    out = capsys.readouterr().out
    assert f'{path}:5: warning: route[1].match: never used: route[0] (match "*")' in out
    assert f'{path}:11: warning: upstream[1].host: never used: upstream[0] (host "*")' in out
    assert out.rstrip().endswith("; 2 warning(s)")
    assert main(["check", "--strict", path]) == 1


def test_narrower_route_first_is_not_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text = (
        '[[route]]\nmatch = "/api/*"\nmethods = ["POST"]\nname = "api-post"\n\n'
        '[[route]]\nmatch = "/api/*"\n'
    )
    path = write(tmp_path, text)
    assert main(["check", "--strict", path]) == 0
    assert "warning" not in capsys.readouterr().out


def test_several_files_fail_if_any_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    good = write(tmp_path, GOOD, "good.toml")
    bad = write(tmp_path, BAD, "bad.toml")
    assert main(["check", good, bad]) == 1
    out = capsys.readouterr().out
    assert f"{good}: ok" in out
    assert f"{bad}: 5 error(s)" in out


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["check"]) == 2
    assert "required: POLICY.toml" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert main([]) == 2


def test_help_exits_0(capsys: pytest.CaptureFixture[str]):
    assert main(["check", "--help"]) == 0
    assert "Validate policy files" in capsys.readouterr().out


def test_the_example_policy_is_clean(capsys: pytest.CaptureFixture[str]):
    assert main(["check", "--strict", "examples/fidelity.toml"]) == 0


def test_installed_console_script(tmp_path: Path):
    """The one subprocess test: the `fidelity-mw` entry point is installed and wired."""
    script = Path(sys.executable).with_name("fidelity-mw")
    exe = str(script) if script.exists() else shutil.which("fidelity-mw")
    assert exe, "the fidelity-mw console script is not installed (pip install -e .)"
    path = write(tmp_path, BAD)
    proc = subprocess.run([exe, "check", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"{path}:9: rate_limit[0].rate:" in proc.stdout
    proc = subprocess.run([exe, "check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2


# ---------------------------------------------------------------- the line locator


def test_locator_tables_arrays_dotted_and_inline():
    text = """\
version = 1   # [not_a_table]
note = \"\"\"
[not_a_table]
x = 1
\"\"\"
[state]
url = 'memory://'
s.t.u = "x"
"quoted key" = 2

[[rate_limit]]
name = "a"

[[rate_limit]]
name = "b"
methods = [
  "GET",  # ] not the end
  "POST",
]

[[upstream]]
host = "x"
retry = { attempts = 3, nested = { base_ms = 1 } }

[[upstream]]
host = "y"

[upstream.retry]
attempts = 30

rate_limit = [{ name = "inline0" }, { name = "inline1" }]
"""
    lines = locate_keys(text)
    expected = {
        "version": 1,
        "note": 2,
        "state": 6,
        "state.url": 7,
        "state.s.t.u": 8,
        "state.quoted key": 9,
        "rate_limit[0]": 11,
        "rate_limit[0].name": 12,
        "rate_limit[1].name": 15,
        "rate_limit[1].methods": 16,
        "rate_limit[1].methods[1]": 18,
        "upstream[0].retry.attempts": 23,
        "upstream[0].retry.nested.base_ms": 23,
        "upstream[1].host": 26,
        "upstream[1].retry": 28,
        "upstream[1].retry.attempts": 29,
        "upstream[1].retry.rate_limit[1].name": 31,
    }
    for path, line in expected.items():
        assert lines.exact(path) == line, path
    assert lines.exact("not_a_table") is None
    assert lines.exact("x") is None


def test_locator_falls_back_to_the_enclosing_table():
    lines = locate_keys('[[rate_limit]]\nrate = "1/s"\n[[rate_limit]]\nrate = "1/s"\n[breaker]\n')
    assert lines.line_for("rate_limit[1].name") == 3
    assert lines.line_for("breaker.min_calls") == 5
    assert lines.line_for("upstream[0].host") is None


def test_locator_single_table_for_an_array():
    # from_dict accepts [rate_limit] (one table) for [[rate_limit]]; paths say rate_limit[0].
    lines = locate_keys('[rate_limit]\nrate = "1/s"\n')
    assert lines.line_for("rate_limit[0].rate") == 2


def test_locator_survives_text_it_does_not_understand():
    lines = locate_keys('a = 1\nb = "unterminated\nc = 3\n')
    assert lines.exact("a") == 1
    assert lines.exact("c") is None


def test_toml_error_position():
    assert toml_error_position("Illegal character (at line 3, column 17)") == (3, 17)
    assert toml_error_position("no position") is None


# ---------------------------------------------------------------- shadowing by subsumption


@pytest.mark.parametrize(
    ("broad", "narrow", "covers"),
    [
        ("/api/*", "/api/search*", True),
        ("/api/search*", "/api/*", False),
        ("*.internal", "payments.internal", True),
        ("*.internal", "*.internal.example", False),
        ("/a/?/b", "/a/x/b", True),
        ("/a/x/b", "/a/?/b", False),
        ("/a/*/b", "/a/*/c/*/b", True),
        ("/a/*/c/*/b", "/a/*/b", False),
        ("?*", "*", False),
        ("*?", "?", True),
        ("/api/*", "/api", False),
        ("/api*", "/api", True),
        ("**", "/x", True),
        ("/x", "/x", True),
    ],
)
def test_glob_covers(broad: str, narrow: str, covers: bool):
    assert glob_covers(broad, narrow) is covers


_GLOB = st.text(alphabet="ab/*?", max_size=7)


@given(broad=_GLOB, narrow=_GLOB, fill=st.lists(st.text(alphabet="ab/", max_size=3), max_size=8))
def test_glob_covers_never_claims_a_cover_that_does_not_hold(
    broad: str, narrow: str, fill: list[str]
):
    # Instantiate the narrow glob (each wildcard becomes some text) and check the
    # broad one matches the result whenever glob_covers says it covers the narrow one.
    pieces = iter(fill)
    text = ""
    for ch in narrow:
        if ch == "*":
            text += next(pieces, "")
        elif ch == "?":
            text += (next(pieces, "") + "a")[0]
        else:
            text += ch
    assert glob_matches(narrow, text)
    if glob_covers(broad, narrow):
        assert glob_matches(broad, text)


def test_broader_globs_first_shadow_later_entries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    text = (
        '[[route]]\nmatch = "/api/*"\n\n[[route]]\nmatch = "/api/search*"\n\n'
        '[[upstream]]\nhost = "*.internal"\n\n[[upstream]]\nhost = "payments.internal"\n\n'
        '[[upstream]]\nhost = "payments.internal.example"\n'
    )
    path = write(tmp_path, text)
    assert main(["check", path]) == 0
    out = capsys.readouterr().out
    assert f'{path}:5: warning: route[1].match: never used: route[0] (match "/api/*")' in out
    assert (
        f'{path}:11: warning: upstream[1].host: never used: upstream[0] (host "*.internal")' in out
    )
    assert "upstream[2]" not in out
    assert out.rstrip().endswith("; 2 warning(s)")


def test_narrower_globs_first_are_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text = (
        '[[route]]\nmatch = "/api/search*"\n\n[[route]]\nmatch = "/api/*"\n\n'
        '[[upstream]]\nhost = "payments.internal"\n\n[[upstream]]\nhost = "*.internal"\n'
    )
    assert main(["check", "--strict", write(tmp_path, text)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_capitalised_host_never_matches(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    path = write(tmp_path, '[[upstream]]\nhost = "Payments.internal"\n')
    assert main(["check", "--strict", path]) == 1
    assert "upstream[0].host: never used" in capsys.readouterr().out


def test_every_problem_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text = (
        '[state]\nkey_prefix = "{fmw}"\n\n'
        '[[rate_limit]]\nname = "a"\nrate = "fast"\n\n'
        '[[rate_limit]]\nname = "a"\nrate = "1/s"\n\n'
        '[[rate_limit]]\nname = "per-client \u2014 v2"\nshadow = true\nburst = true\n'
    )
    path = write(tmp_path, text)
    assert main(["check", path]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines[:-1]] == [
        [f"{path}:2", "state.key_prefix"],
        [f"{path}:6", "rate_limit[0].rate"],
        [f"{path}:9", "rate_limit[1].name"],
        [f"{path}:13", "rate_limit[2].name"],
        [f"{path}:15", "rate_limit[2].burst"],
    ]
    assert "got boolean true" in lines[4]
    assert "True" not in "\n".join(lines)


def test_shadowing_is_reported_alongside_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    text = (
        '[[route]]\nmatch = "/api/*"\n\n[[route]]\nmatch = "/api/search*"\ndeadline_ms = 0\n\n'
        '[[upstream]]\nhost = "*"\n\n[[upstream]]\nhost = "a.internal"\n'
    )
    path = write(tmp_path, text)
    assert main(["check", path]) == 1
    out = capsys.readouterr().out
    assert f"{path}:6: route[1].deadline_ms: " in out
    assert f"{path}:5: warning: route[1].match: never used: route[0]" in out
    assert f"{path}:12: warning: upstream[1].host: never used: upstream[0]" in out


def test_an_open_min_above_open_s_is_a_warning_naming_the_cap(tmp_path: Path):
    from fidelity_mw.tools.check import check_file

    path = tmp_path / "fidelity.toml"
    path.write_text(
        "version = 1\n"
        "[breaker]\n"
        "open_min_s = 60\n"  # open_s left at its 5 s: the breaker opens 5 s, not 60
        "[[upstream]]\n"
        'host = "payments.internal"\n'
        "breaker = { open_s = 30, open_min_s = 30 }\n"  # a fixed open time: fine
        "[[upstream]]\n"
        'host = "inventory.internal"\n'
        "breaker = { open_s = 2, open_min_s = 10 }\n"
    )
    result = check_file(path)
    assert not result.errors
    said = {f.path: (f.line, f.message) for f in result.warnings}
    assert list(said) == ["breaker.open_min_s", "upstream[1].breaker.open_min_s"]
    assert said["breaker.open_min_s"] == (
        3,
        "60 s is above open_s (5 s): the breaker stays open 5 s, the cap (set open_s too, "
        "for a fixed open time the same value)",
    )
    assert said["upstream[1].breaker.open_min_s"][0] == 9
