"""Operator-facing defects that earlier rounds found and left alone (review 35, ops)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fidelity_mw.tools.cli import main

# ---------------------------------------------- audit: a gate over files it never read


def _tree(tmp_path: Path, *, finding: bool) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    body = "import tenacity\n\n@tenacity.retry\ndef fetch():\n    pass\n" if finding else "x = 1\n"
    (root / "good.py").write_text(body)
    (root / "half_edited.py").write_text("def broken(:\n")
    (root / "latin.py").write_bytes(b"name = '\xe9'\n")  # no coding line: not UTF-8
    return root


def test_audit_fail_on_fails_when_files_were_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CI gate (`--fail-on`) exited 0 over a tree whose unparsable files it never read."""
    root = _tree(tmp_path, finding=False)
    assert main(["audit", str(root), "--fail-on", "any"]) == 3
    captured = capsys.readouterr()
    summary = captured.out.splitlines()[-1]
    assert summary.endswith("1 file(s) scanned, 2 skipped (not read)")
    assert "2 file(s) could not be read" in captured.err
    assert "--allow-skipped" in captured.err


def test_audit_skipped_outranks_findings_and_can_be_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path, finding=True)
    assert main(["audit", str(root), "--fail-on", "retry"]) == 3
    # opted out: the findings decide, the skipped files are still listed
    assert main(["audit", str(root), "--fail-on", "retry", "--allow-skipped"]) == 1
    out = capsys.readouterr().out
    assert out.count("skipped, not scanned") == 4  # two files, two runs
    assert main(["audit", str(root), "--fail-on", "breaker", "--allow-skipped"]) == 0
    # a report, not a gate: never fails
    assert main(["audit", str(root)]) == 0


def test_audit_json_lists_skipped_and_the_opt_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path, finding=False)
    assert main(["audit", "--json", str(root), "--fail-on", "any"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert sorted(Path(s["file"]).name for s in doc["skipped"]) == ["half_edited.py", "latin.py"]
    assert doc["allow_skipped"] is False
    assert doc["scanned"] == 1
    assert main(["audit", "--json", str(root), "--fail-on", "any", "--allow-skipped"]) == 0
    assert json.loads(capsys.readouterr().out)["allow_skipped"] is True
