"""`[state] url`: a Redis URL no client can be built from is a policy error."""

from __future__ import annotations

from pathlib import Path

import pytest

from fidelity_mw import Policy
from fidelity_mw.tools.cli import main


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://cache.internal:notaport/0", "the port is not a number"),
        ("tiered+rediss://cache.internal:99999/0", "the port is not a number"),
        ("redis://:s3cret@cache.internal:6379/abc", 'the database "abc" is not a number'),
    ],
)
def test_check_refuses_a_redis_url_no_client_can_be_built_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, problem: str
):
    """It passed `check`, and the middleware then ran without state (one warning)."""
    path = tmp_path / "policy.toml"
    path.write_text(f'[state]\nurl = "{url}"\n')
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "state.url" in out
    assert problem in out
    assert "s3cret" not in out
    for fine in ("redis://cache.internal/3", "redis://cache.internal:6379/0?cluster=true"):
        assert Policy.from_dict({"state": {"url": fine}}).state.url == fine
