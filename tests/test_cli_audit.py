"""`fidelity-mw audit`: output, JSON, and exit codes usable in CI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fidelity_mw.tools.cli import main

FIXTURES = "tests/fixtures/audit"


def test_report_lines_name_file_line_kind_and_replacement(capsys: pytest.CaptureFixture[str]):
    assert main(["audit", FIXTURES]) == 0  # without --fail-on, findings never fail
    lines = capsys.readouterr().out.splitlines()
    assert (
        "tests/fixtures/audit/service/loops.py:11: retry (high): for loop in fetch() retries a "
        "call after catching its failure (line 13); waits with time.sleep(0.1 * 2 ** attempt) "
        "(line 15) -> remove the loop; upstream[].retry (attempts, base_ms, max_ms, jitter) "
        "via FidelityTransport; e.g. retry = { attempts = 5, base_ms = 100, max_ms = 800, "
        'jitter = "none" }'
    ) in lines
    assert (
        "tests/fixtures/audit/service/breakers.py:11: breaker (high): pybreaker "
        "@payments_breaker on charge() -> upstream[].breaker (outbound) or breaker / "
        "route[].breaker (inbound)"
    ) in lines
    assert lines[-1].endswith(" file(s) scanned")
    assert f"{len(lines) - 1} finding(s)" in lines[-1]


@pytest.mark.parametrize(
    ("fail_on", "code"),
    [("retry", 1), ("breaker", 1), ("limiter", 1), ("any", 1), ("retry,limiter", 1)],
)
def test_fail_on_with_findings(fail_on: str, code: int, capsys: pytest.CaptureFixture[str]):
    assert main(["audit", FIXTURES, "--fail-on", fail_on]) == code


def test_fail_on_only_counts_the_named_kinds(capsys: pytest.CaptureFixture[str]):
    breakers = f"{FIXTURES}/service/breakers.py"
    assert main(["audit", breakers, "--fail-on", "retry,limiter"]) == 0
    assert main(["audit", breakers, "--fail-on", "breaker"]) == 1


def test_clean_tree_passes_any(capsys: pytest.CaptureFixture[str]):
    assert main(["audit", f"{FIXTURES}/clean", "--fail-on", "any"]) == 0
    assert capsys.readouterr().out == (
        "0 finding(s) (0 retry, 0 breaker, 0 limiter) in 0 file(s); 1 file(s) scanned\n"
    )


def test_json(capsys: pytest.CaptureFixture[str]):
    assert main(["audit", "--json", "--fail-on", "breaker", f"{FIXTURES}/service"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"] == {
        "retry": 19,
        "breaker": 13,
        "limiter": 13,
        "timeout": 4,
        "bulkhead": 1,
        "hedge": 1,
    }
    assert doc["fail_on"] == ["breaker"]
    assert doc["scanned"] == 6
    first = doc["findings"][0]
    assert set(first) == {
        "file",
        "line",
        "kind",
        "library",
        "what",
        "replace_with",
        "confidence",
        "host",
    }
    assert first["confidence"] == "high"
    assert first["file"] == "tests/fixtures/audit/service/breakers.py"
    assert first["line"] == 8


def test_exclude(capsys: pytest.CaptureFixture[str]):
    assert main(["audit", f"{FIXTURES}/clean", f"{FIXTURES}/service/breakers.py"]) == 0
    excluded = ["--exclude", "*/service", "--exclude", "*/loops", "--fail-on", "any"]
    assert main(["audit", FIXTURES, *excluded]) == 0


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["audit", FIXTURES, "--fail-on", "retries"]) == 2
    assert "'retries' is not a kind" in capsys.readouterr().err
    missing = str(tmp_path / "nope")
    assert main(["audit", missing]) == 2
    assert f"{missing}: no such file or directory" in capsys.readouterr().err
    assert main(["audit"]) == 2


def test_min_confidence_keeps_only_surer_findings(capsys: pytest.CaptureFixture[str]):
    loops = f"{FIXTURES}/loops"
    main(["audit", "--json", loops])
    every = json.loads(capsys.readouterr().out)["findings"]
    main(["audit", "--json", "--min-confidence", "high", loops])
    high = json.loads(capsys.readouterr().out)["findings"]
    assert {f["confidence"] for f in every} > {"high"}
    assert high == [f for f in every if f["confidence"] == "high"]
    assert main(["audit", loops, "--min-confidence", "sure"]) == 2


def test_a_gate_over_no_files_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # An --exclude matching everything, or a directory without Python files: the gate has
    # vouched for nothing, so it must not pass.
    assert main(["audit", FIXTURES, "--exclude", "*", "--fail-on", "any"]) == 3
    assert "no Python files were scanned" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("retry forever\n")
    assert main(["audit", str(tmp_path), "--fail-on", "any"]) == 3
    # Without --fail-on it is a report, and reports never fail.
    assert main(["audit", str(tmp_path)]) == 0
    assert "0 file(s) scanned" in capsys.readouterr().out
