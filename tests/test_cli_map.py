"""`fidelity-mw map`: text, Markdown with Mermaid, JSON; exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fidelity_mw.tools.cli import main


def test_text_from_a_policy_file(capsys: pytest.CaptureFixture[str]):
    assert main(["map", "examples/fidelity.toml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fidelity_mw layer and state map\nsource:  examples/fidelity.toml\n")
    assert "INBOUND LAYERS" in out
    assert "OUTBOUND LAYERS" in out
    assert "ratelimit — limit 'checkout' on /api/orders/*/pay POST, per header:X-Api-Key" in out
    assert "key:        checkout|{client}" in out
    assert "WARNINGS (0)" in out


def test_markdown_has_a_mermaid_diagram_and_tables(capsys: pytest.CaptureFixture[str]):
    assert main(["map", "examples/legacy_app.py:app", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "```mermaid\nflowchart LR\n" in out
    # every foreign control layer is a highlighted node
    assert "  class mw1,mw2,cl0,cl1,cl2 overlap\n" in out
    assert '  cl2["payments (AsyncClient): inner transport retries"]\n  out_retry --> cl2\n' in out
    assert "## Middleware stack (outermost first)" in out
    assert "| layer | applies to | policy key | decides |" in out
    assert "## Warnings (6)" in out


def test_json(capsys: pytest.CaptureFixture[str]):
    assert main(["map", "examples/app.py:app", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["source"] == "examples/app.py:app"
    assert doc["warnings"] == []
    assert {r["layer"] for r in doc["layers"]} == {
        "deadline",
        "breaker",
        "ratelimit",
        "retry",
        "budget",
    }
    assert set(doc["layers"][0]) == {
        "direction",
        "layer",
        "subject",
        "config",
        "decides",
        "data",
        "state",
        "key",
        "writer",
        "staleness",
        "on_failure",
    }


def test_invalid_policy_exits_1_and_points_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    path = tmp_path / "bad.toml"
    path.write_text('[state]\nurl = "ftp://x"\n')
    assert main(["map", str(path)]) == 1
    out = capsys.readouterr().out
    assert 'state.url: "ftp://x" has an unknown scheme' in out
    assert f"fidelity-mw check {path}" in out


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["map", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: no such file" in capsys.readouterr().err
    assert main(["map", "not_a_target"]) == 2
    assert "neither a policy file nor an app import path" in capsys.readouterr().err
    assert main(["map", "no_such_module_xyz:app"]) == 2
    assert "cannot load no_such_module_xyz:app: ModuleNotFoundError" in capsys.readouterr().err
    assert main(["map", "examples.app:nope"]) == 2
    assert "AttributeError" in capsys.readouterr().err
    assert main(["map", "examples/fidelity.toml", "--format", "html"]) == 2


def test_an_app_whose_import_fails_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """The module docstring's contract: an app that cannot be imported exits 2, whatever its
    import raised (a missing setting, a syntax error), with the cause, not a traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "needs_settings.py").write_text("raise KeyError('DATABASE_URL')\n")
    (tmp_path / "typo_app.py").write_text("app = (\n")
    assert main(["map", "needs_settings.py:app"]) == 2
    assert "KeyError: 'DATABASE_URL'" in capsys.readouterr().err
    assert main(["map", "typo_app:app"]) == 2
    assert "SyntaxError" in capsys.readouterr().err
