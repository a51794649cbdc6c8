"""Test servers and "nobody listens here" ports on a box that six test sessions share.

A port taken from the kernel and let go is free for anyone until it is bound again: the
raw upstream of the fault tests and the Prometheus of test_prometheus chose theirs that
way, so another session's server could take it in between (ours then failed to start,
or a test talked to the other server). The raw upstream now listens on port 0 and reads
its port back, and keeps the port bound while it is down; Prometheus and the Redis fleet
tests' uvicorn members, which bind their ports themselves, check that the server
answering is theirs and start again on another port if not; a port meant to refuse
connections is bound (never listening) while in use."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

import test_faults_support
import test_prometheus
import test_redis_fleet
from redis_server import held_port, port_free, refused_port
from test_faults_support import HOST, RawUpstream


@contextlib.contextmanager
def _another_process_listening() -> Iterator[int]:
    """A listener on a port the kernel chose: what another session's server looks like."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen()
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _refused(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.connect((HOST, port))
        except ConnectionRefusedError:
            return True
    return False


def test_the_raw_upstream_listens_on_the_port_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with _another_process_listening() as taken:
        # before: RawUpstream took a port from free_port() and bound it later; this is
        # the port going to another process in between (its start raised EADDRINUSE)
        monkeypatch.setattr(test_faults_support, "free_port", lambda: taken, raising=False)
        upstream = RawUpstream()
        try:
            assert upstream.port not in (0, taken)
            assert httpx.get(upstream.url + "/x", timeout=30).status_code == 200
        finally:
            upstream.close()


def test_the_raw_upstream_keeps_its_port_while_down() -> None:
    upstream = RawUpstream()
    try:
        port = upstream.port
        assert httpx.get(upstream.url + "/a", timeout=30).status_code == 200
        upstream.down()
        assert _refused(port)  # what the fault tests need from down()
        # before: the port was free while down, for another process's free_port() to
        # get and its server to bind before up() listened there again
        assert not port_free(port)
        upstream.up()
        assert upstream.port == port
        assert httpx.get(upstream.url + "/b", timeout=30).status_code == 200
        assert upstream.count("GET /a") == upstream.count("GET /b") == 1
    finally:
        upstream.close()
    assert port_free(port)  # let go at the end


def test_a_refused_port_refuses_and_stays_ours() -> None:
    port = refused_port()
    assert refused_port() == port
    assert _refused(port)
    assert not port_free(port)
    hold = held_port()
    try:
        assert _refused(hold.getsockname()[1])
    finally:
        hold.close()


class _OtherPrometheus(BaseHTTPRequestHandler):
    """Another session's server on the port: answers every query, about its own config."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "status": "success",
                "data": {
                    "config.file": "/elsewhere/prometheus.yml",
                    "resultType": "vector",
                    "result": [],
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_prometheus_starts_again_when_its_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    test_prometheus.tool("prometheus")  # fails with the install hint when missing
    other = ThreadingHTTPServer((HOST, 0), _OtherPrometheus)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    taken = int(other.server_address[1])
    ports = iter([taken])
    real = test_prometheus.free_port
    monkeypatch.setattr(test_prometheus, "free_port", lambda: next(ports, None) or real())
    try:
        # a target nobody serves: its scrapes fail, and `up` still has its one series
        prometheus = test_prometheus.Prometheus(tmp_path, "127.0.0.1:1")
        try:
            # before: ours exited (address in use) and the queries went to the other
            # server or failed
            assert prometheus.port != taken
            assert prometheus.proc.poll() is None
            result = prometheus.wait_for('up{job="app"}', lambda r: len(r) == 1)
            assert result[0]["metric"]["instance"] == "127.0.0.1:1"
        finally:
            prometheus.stop()
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.slow
def test_a_fleet_member_is_ready_only_when_it_is_ours_that_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = ThreadingHTTPServer((HOST, 0), _OtherPrometheus)  # answers /stats with a 200
    threading.Thread(target=other.serve_forever, daemon=True).start()
    taken = int(other.server_address[1])
    ports = iter([taken])
    real = test_redis_fleet.free_port
    monkeypatch.setattr(test_redis_fleet, "free_port", lambda **kw: next(ports, None) or real(**kw))
    fleet = test_redis_fleet.Fleet(
        tmp_path, f"redis://{HOST}:{refused_port()}/0", "r48", app=test_redis_fleet.APP
    )
    try:
        with test_redis_fleet.running(fleet):
            # before: the other server's 200 said "ready" and the test's requests went there
            assert taken not in fleet.ports
            assert all(
                test_redis_fleet.listens(proc.pid, port)
                for proc, port in zip(fleet.procs, fleet.ports, strict=True)
            )
    finally:
        other.shutdown()
        other.server_close()
