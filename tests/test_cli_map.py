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


_GLOB_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from fidelity_mw import FidelityMiddleware, Policy


async def ok(request):
    return PlainTextResponse("ok")


async def opaque(scope, receive, send):
    await PlainTextResponse("ok")(scope, receive, send)


POLICY = Policy.from_dict({
    "rate_limit": [
        {"name": "typo", "match": "/apu/*", "rate": "10/s"},
        {"name": "items", "match": "/api/items/*", "rate": "10/s"},
        {"name": "admin", "match": "/admin*", "rate": "10/s"},
        {"name": "v2", "match": "/v2/*", "rate": "10/s"},
    ],
    "route": [{"match": "/healthz", "breaker": False}, {"match": "/health", "breaker": False}],
})
app = Starlette(routes=[
    Route("/api/items/{item_id}", ok),
    Route("/healthz", ok),
    Mount("/v2", routes=[Route("/orders", ok)]),
    Mount("/admin", app=opaque),
])
app.add_middleware(FidelityMiddleware, policy=POLICY)
"""


def test_a_glob_that_reaches_no_route_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """ops8 walkthrough: `match = "/apu/*"` for "/api/*" passes `check` and silently
    limits nothing in production; the map of the app knows its routes and says so."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glob_app.py").write_text(_GLOB_APP)
    assert main(["map", "--format", "json", "glob_app:app"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    unmatched = {w["where"]: w["message"] for w in warnings if w["kind"] == "unmatched-glob"}
    assert sorted(unmatched) == ["rate_limit[0]", "route[1]"]
    assert "'/apu/*' reaches none of the app's routes" in unmatched["rate_limit[0]"]
    assert "/api/items/x" in unmatched["rate_limit[0]"]


def test_an_app_factory_gets_a_hint_not_only_no_fidelity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """`uvicorn app:create_app --factory` is how the Prometheus example runs; `map
    app:create_app` mapped the function itself and said only "no FidelityMiddleware"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "factory_app.py").write_text(
        _GLOB_APP.replace("app = Starlette(", "def create_app():\n    app = Starlette(", 1)
        .replace("\napp.add_middleware", "\n    app.add_middleware")
        .replace("\n])\n", "\n    ])\n")
        + "    return app\n"
    )
    assert main(["map", "factory_app:create_app"]) == 0
    out = capsys.readouterr().out
    assert "no-fidelity" in out
    assert "an app factory (uvicorn --factory)?" in out


def test_the_retry_row_says_which_answers_pause_and_until_when(
    capsys: pytest.CaptureFixture[str],
):
    # A service instance's own 503 with Retry-After pauses it too, and an attempt it
    # answers well since ends that pause early (review 48): the map said "an upstream
    # 429's" only.
    assert main(["map", "examples/app.py:app", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    retry_states = [r["state"] for r in doc["layers"] if r["layer"] == "retry"]
    assert retry_states
    for state in retry_states:
        assert "429 or 503" in state
        assert "until it answers well again" in state
