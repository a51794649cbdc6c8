"""What a new user gets wrong first, and the message that names the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fidelity_mw import (
    Engine,
    FidelityMiddleware,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    PolicyError,
)


async def _app(scope: object, receive: object, send: object) -> None:  # pragma: no cover
    pass


@pytest.mark.parametrize(
    ("wrong", "fix"),
    [
        ("fidelity.toml", "pass Policy.from_toml('fidelity.toml')"),
        (Path("conf/fidelity.toml"), "pass Policy.from_toml('conf/fidelity.toml')"),
        ({"rate_limit": []}, "pass Policy.from_dict(...)"),
        (42, 'pass Policy(...), Policy.from_toml("fidelity.toml") or Policy.from_dict(...)'),
    ],
)
def test_a_policy_that_is_not_a_policy_names_the_fix(wrong: object, fix: str) -> None:
    """`policy="fidelity.toml"` failed on the first request with "'str' object has no
    attribute 'state'"; every entry point now says what to pass."""
    builders = [
        lambda: Engine(wrong),  # type: ignore[arg-type]
        lambda: FidelityMiddleware(_app, policy=wrong),  # type: ignore[arg-type]
        lambda: FidelityTransport(policy=wrong),  # type: ignore[arg-type]
        lambda: FidelitySyncTransport(policy=wrong),  # type: ignore[arg-type]
    ]
    for build in builders:
        with pytest.raises(TypeError) as exc:
            build()
        assert str(exc.value) == (
            f"policy= takes a fidelity_mw.Policy, got {type(wrong).__name__}: {fix}"
        )


def test_a_relative_policy_path_that_is_missing_names_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn started from another directory: say where the file was looked for."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError) as exc:
        Policy.from_toml("fidelity.toml")
    (issue,) = exc.value.issues
    assert issue.message.endswith(f"(relative to the working directory {tmp_path})")
    with pytest.raises(PolicyError) as exc:
        Policy.from_toml(tmp_path / "missing.toml")
    assert "working directory" not in exc.value.issues[0].message
