"""Operator-facing defects that earlier rounds found and left alone (review 35, ops)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.tools.cli import main

BREAKER = BreakerConfig(min_calls=2, open_jitter=0.0, open_s=30.0, open_min_s=30.0, window_s=10.0)

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


# ---------------------------------------------- admin: a stable view past the key cache


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_full_key_cache_lets_the_oldest_go_not_every_key(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Redis store lists the breakers it has used from its key cache (Redis holds them
    by hash only). The cache was cleared at once when full: at ~9,000 hosts of its 10,000,
    the page showed only the hosts used since the last clear (a handful, then growing).
    Now it lets the oldest go in small steps; the page keeps the most recent ones."""
    import redis as redis_sync

    from fidelity_mw.state import redis as redis_module
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.state.snapshot import SnapshotConfigs
    from redis_server import PATIENT, QUIET

    # the same rule at a size a test fills in a moment
    monkeypatch.setattr(redis_module, "_KEY_CACHE_MAX", 160)
    monkeypatch.setattr(redis_module, "_KEY_CACHE_EVICT", 10, raising=False)
    store = RedisStore(config=StateConfig(url=redis_url, key_prefix="ops35kc", **PATIENT, **QUIET))
    direct = redis_sync.Redis.from_url(redis_url)
    hosts = [f"upstream:h{i:04d}.example" for i in range(400)]
    configs = SnapshotConfigs(
        breaker=lambda key: BREAKER, retry=lambda key: None, top_breakers=500, top_budgets=0
    )
    counts: list[int] = []
    try:
        for start in range(0, len(hosts), 40):
            writes = direct.pipeline(transaction=False)
            for host in hosts[start : start + 40]:
                writes.hset(store.breaker_keys(host)[0], mapping={"co": 0})
            writes.execute()
            snap = await store.snapshot(0.0, configs=configs)
            counts.append(snap.breaker_count)
            listed = {v.key for v in snap.breakers}
            # every host of the last 150 used is on the page
            recent = hosts[max(0, start + 40 - 150) : start + 40]
            assert listed.issuperset(recent), start
    finally:
        direct.close()
        await store.aclose()
    # 40, 80, ..., 160, then never fewer than 150 (cleared at once: 40, 80, 120, 160, 40, ...)
    assert counts[:4] == [40, 80, 120, 160]
    assert min(counts[4:]) >= 150
    assert max(counts) <= 160


@pytest.mark.anyio
async def test_the_admin_page_keys_its_hashers_by_engine_not_by_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`AdminApp._hashers` was keyed by `id(engine)`: an engine collected and a new one
    given the same id got the old engine's hasher (the page's key hashes then disagree
    with the new engine's telemetry), and every engine shown left its hasher behind."""
    import gc

    from fidelity_mw import Engine
    from fidelity_mw.admin import AdminApp
    from fidelity_mw.admin import app as app_module
    from fidelity_mw.testing import FakeClock

    made: list[tuple[Engine, object]] = []
    used: list[object] = []

    def hasher_for(engine: Engine) -> object:
        tag = object()
        made.append((engine, tag))
        return tag

    def spy_render(
        engine: Engine, snap: object, now: float, since: object, hasher: object, **_: object
    ) -> dict[str, object]:
        used.append(hasher)
        return {}

    monkeypatch.setattr(app_module, "key_hasher", hasher_for)
    monkeypatch.setattr(app_module, "render", spy_render)
    # the same id for every engine, as CPython gives a freed object's address to a new one
    monkeypatch.setattr(app_module, "id", lambda obj: 1, raising=False)
    admin = AdminApp()
    first = Engine(clock=FakeClock())
    await admin.state(first)
    await admin.state(first)
    second = Engine(clock=FakeClock())
    await admin.state(second)
    assert [tag for _, tag in made] == [used[0], used[2]]
    assert used[0] is used[1]
    assert used[2] is not used[0]
    del first, second, made[:]
    gc.collect()
    assert len(admin._hashers) == 0  # nothing kept for engines that are gone
