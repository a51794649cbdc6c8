"""The suite's redis-servers on a box that six test sessions share.

`free_port()` asks the kernel for a free port and lets it go; the server binds it a
moment later. Another session's server could take the port in between: ours failed to
bind and exited, but the readiness check's PING was answered by the other server, so
this session's tests ran on another session's server (its per-test FLUSHALL and SCRIPT
FLUSH landing in the middle of our sequences, and ours in its)."""

from __future__ import annotations

from pathlib import Path

import pytest

import redis_server
from redis_server import RedisServer, require_redis

pytestmark = pytest.mark.redis


def _pid_answering(server: RedisServer) -> int:
    with server.client() as client:
        return int(client.info("server")["process_id"])


def test_a_port_another_server_took_first_is_not_taken_for_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_redis()
    other = RedisServer(tmp_path / "other").start()  # another session's, on "our" port
    try:
        real = redis_server.free_port
        ports = iter([other.port])
        monkeypatch.setattr(redis_server, "free_port", lambda **kw: next(ports, None) or real(**kw))
        ours = RedisServer(tmp_path / "ours")
        assert ours.port == other.port
        ours.start()
        try:
            assert ours.proc is not None
            # before: PONG from the other server on its port; ours had exited
            assert ours.port != other.port
            assert _pid_answering(ours) == ours.proc.pid
            assert _pid_answering(other) == other.proc.pid  # type: ignore[union-attr]
        finally:
            ours.stop()
    finally:
        other.stop()


def test_a_fixed_port_another_server_holds_is_an_error(tmp_path: Path) -> None:
    require_redis()
    other = RedisServer(tmp_path / "other").start()
    try:
        ours = RedisServer(tmp_path / "ours", port=other.port)
        with pytest.raises(RuntimeError, match="taken by another process"):
            ours.start()
        ours.stop()
    finally:
        other.stop()
