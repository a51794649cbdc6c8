"""Review 39, the CLI: `fidelity-mw map` said of a `@fidelity.deadline` on an app
without FidelityMiddleware that it answers 504 "when the endpoint runs past it": the
route class alone checks the deadline on arrival and never cuts a running endpoint
(fastapi/routing.py `_standalone`; docs/fastapi.md, "Without the middleware")."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.tools.statemap import build


def mapped(monkeypatch: pytest.MonkeyPatch, with_middleware: bool) -> str:
    fidelity = Fidelity()
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/slow")
    @fidelity.deadline(100)
    async def slow() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router)
    if with_middleware:
        app.add_middleware(FidelityMiddleware, policy=Policy())
    module = types.ModuleType("review39_cli_app")
    module.app = app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "review39_cli_app", module)
    smap = build("review39_cli_app:app")
    (layer,) = [x for x in smap.layers if x.config == "fidelity.deadline on /slow"]
    return layer.decides


def test_without_the_middleware_the_map_does_not_promise_a_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decides = mapped(monkeypatch, with_middleware=False)
    assert "runs past it" not in decides
    assert decides.startswith("504 on arrival when expired")
    assert "not cut" in decides


def test_behind_the_middleware_it_still_says_the_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "or when the endpoint runs past it" in mapped(monkeypatch, with_middleware=True)


def test_the_audit_gives_purgatorys_factory_its_breaker_table(tmp_path: Path) -> None:
    """purgatory is in the migration guide's heading and the audit finds it, but its
    factory got no `breaker = {...}` to paste, where pybreaker's and the others' did."""
    from fidelity_mw.tools.audit import audit_paths

    source = tmp_path / "breakers.py"
    source.write_text(
        "import httpx\n"
        "from purgatory import AsyncCircuitBreakerFactory\n"
        "circuitbreaker = AsyncCircuitBreakerFactory(default_threshold=4, default_ttl=20)\n"
        "defaults = AsyncCircuitBreakerFactory()\n"
    )
    report = audit_paths([str(source)], [])
    hints = sorted(f.replace_with for f in report.findings if f.kind == "breaker")
    assert any(
        "consecutive_failures = 4, failure_ratio = 1.0, open_s = 20, open_min_s = 20, "
        "open_jitter = 0, "
        "half_open_probes = 1" in hint
        for hint in hints
    ), hints
    # its defaults, 5 failures and 30 s, as purgatory's own
    assert any(
        "consecutive_failures = 5, failure_ratio = 1.0, open_s = 30" in hint for hint in hints
    ), hints
