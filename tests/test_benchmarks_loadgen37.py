"""benchmarks/loadgen.c measures on connections that have all been answered.

server.py's p99 at 256 connections varied from 20 ms to over a second between runs: uvloop
accepts one connection per loop turn, so wrk's fresh connections waited up to seconds to
be accepted and wrk's correction for coordinated omission turned those few first answers
into thousands of samples. loadgen warms up on the connections it measures and opens the
window only once each has had an answer. Counted here against a small server on loopback
(no timing is asserted).
"""

from __future__ import annotations

import contextlib
import selectors
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import server

pytestmark = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")), reason="needs a C compiler"
)

RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"


@contextlib.contextmanager
def http_server(ignore: set[int]) -> Iterator[tuple[int, dict[int, int]]]:
    """A keep-alive server answering every request with 200 "ok", except on the accepted
    connections numbered in `ignore` (0-based), which it reads and never answers. Yields
    (port, requests answered per accepted connection)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    answered: dict[int, int] = {}
    stop = threading.Event()

    def run() -> None:
        accepted = 0
        while not stop.is_set():
            for key, _ in selector.select(0.05):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, accepted)
                    answered[accepted] = 0
                    accepted += 1
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(conn)
                    conn.close()
                    continue
                if key.data in ignore:
                    continue
                for _ in range(data.count(b"\r\n\r\n")):
                    conn.sendall(RESPONSE)
                    answered[key.data] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], answered
    finally:
        stop.set()
        thread.join(5)
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> str:
    built = server.build_loadgen(tmp_path_factory.mktemp("loadgen"))
    assert built is not None
    return built


def test_every_connection_is_answered_before_the_window_and_every_response_counted(
    loadgen: str,
) -> None:
    windows: list[int] = []
    with http_server(ignore=set()) as (port, answered):
        result = server.run_loadgen(
            loadgen, port, 8, 0.05, 0.3, None, False, lambda: windows.append(len(answered))
        )
    assert windows == [8]  # the window opened once, with all 8 connections accepted
    assert result["unserved"] == 0
    assert result["ramp_us"] >= 0
    assert result["requests"] > 0
    assert result["status"] == 0
    assert result["connect"] == result["read"] == result["write"] == 0
    assert sum(answered.values()) >= result["requests"]  # warm-up answers are not counted
    assert result["p50_us"] <= result["p99_us"] <= result["max_us"]


def test_a_connection_never_answered_is_reported_and_the_others_still_measured(
    loadgen: str,
) -> None:
    with http_server(ignore={3}) as (port, answered):
        result = server.run_loadgen(
            loadgen, port, 6, 0.05, 0.2, None, False, lambda: None, timeout_s=0.3
        )
    assert answered[3] == 0
    assert result["unserved"] == 1
    assert result["ramp_us"] == -1  # never all answered: the window opened at the give-up
    assert result["requests"] > 0
    assert result["timeout"] == 1  # and its request is still open at the end
