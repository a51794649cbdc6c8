"""Real redis-server processes for the tests: one server, and a three-master cluster.

The suite starts them itself on free loopback ports, in temporary directories,
without persistence, and stops them afterwards: a real server, never an
in-process imitation of one.

If `redis-server` is missing the Redis tests are skipped locally, but they
fail when the `CI` environment variable is set (`.ci/run` installs the
Debian package, so a missing server there is a broken CI, not a skip).

Registered as a pytest plugin from tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
# StateConfig timeouts for tests that are not about timeouts. A starved process on a
# busy machine can take longer than the 250 ms default to connect or to read a reply,
# and the store then (rightly) decides on fallback state, which those tests do not
# expect. Tests of slow or paused servers set their own small timeouts.
PATIENT: dict[str, int] = {"timeout_ms": 5_000, "connect_timeout_ms": 5_000}
# StateConfig for tests that count script calls or list keys: no fleet announcements
# (state/fleet.py: one background call per second and a `{prefix}:fleet` key otherwise).
QUIET: dict[str, float] = {"fleet_share_max_age_s": 0.0}


def require_redis() -> None:
    """Skip (locally) or fail (under CI) when the Redis binaries are missing."""
    if REDIS_SERVER and REDIS_CLI:
        return
    message = "redis-server / redis-cli not found on PATH (Debian: apt-get install redis-server)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must provide it")
    pytest.skip(message)


def port_free(port: int) -> bool:
    """Whether a bind without SO_REUSEADDR (as a server's own) gets `port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A free loopback port (and, for cluster nodes, a free bus port at +10000)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if not cluster or (port + 10000 < 65536 and port_free(port + 10000)):
            return port
    raise RuntimeError("no free port pair found")


def held_port() -> socket.socket:
    """A loopback port bound and not listening, for as long as the socket stays open: a
    connection there is refused, as to a port nobody uses, and no other process can bind
    it. A port from free_port() for "nothing listens here" could go to another test
    session's server in the meantime, and a test of an unreachable Redis would then
    reach one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    return sock


_REFUSED: list[socket.socket] = []


def refused_port() -> int:
    """A port where connections are refused for the rest of the session (one for all)."""
    if not _REFUSED:
        _REFUSED.append(held_port())
    return int(_REFUSED[0].getsockname()[1])


class RedisServer:
    """One redis-server subprocess on 127.0.0.1. Kill, pause, resume and restart it."""

    def __init__(self, workdir: Path, *, port: int | None = None, cluster: bool = False) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.port = port if port is not None else free_port(cluster=cluster)
        self.port_chosen = port is None  # ours to change if another process takes it
        self.unixsocket = workdir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unixsocket}?db=0"

    def argv(self) -> list[str]:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log),
            "--daemonize",
            "no",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "5000",
            ]
        else:
            args += ["--unixsocket", str(self.unixsocket), "--unixsocketperm", "700"]
        return args

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.proc = subprocess.Popen(
                self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self.wait_ready():
                self.port_chosen = False  # clients know it now: a restart keeps it
                return self
            # The free port went to another process between free_port() and the server's
            # bind (six sessions share this machine, each starting servers): a server of
            # another test session answered there, and its flushes would have landed in
            # the middle of our tests. Another port, unless the test fixed this one.
            if not self.port_chosen:
                raise RuntimeError(f"port {self.port} was taken by another process")
            self.port = free_port(cluster=self.cluster)
        raise RuntimeError("no free port stayed free for redis-server")

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain synchronous client for inspecting the server from tests."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2.0, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self) -> bool:
        """True once our process answers on the port; False if another process holds the
        port (ours could not bind it, and exited)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                if "already in use" in tail:
                    return False
                raise RuntimeError(f"redis-server exited: {tail}")
            try:
                with self.client(socket_connect_timeout=0.2) as client:
                    # a PING alone may be answered by another session's server on the port
                    if int(client.info("server")["process_id"]) == self.proc.pid:
                        return True
                    self.proc.wait(timeout=START_TIMEOUT_S)  # ours cannot bind: it exits
                    return False
            except redis.RedisError as exc:
                last = exc
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} not ready: {last}")

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-2000:]
        return ""

    # ------------------------------------------------------------ faults

    def kill(self) -> None:
        """SIGKILL: the process is gone at once, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process stays, connections hang (timeouts, not errors)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (empty: no persistence, no script cache)."""
        self.kill()
        self.start()

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused server cannot exit
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.proc = None


class ReplicaServer(RedisServer):
    """A redis-server started as a replica of `primary` (`--replicaof`): it answers PING,
    ROLE and reads, and refuses every write with `READONLY`."""

    def __init__(self, workdir: Path, primary: RedisServer) -> None:
        super().__init__(workdir)
        self.primary = primary

    def argv(self) -> list[str]:
        return [*super().argv(), "--replicaof", HOST, str(self.primary.port)]


class RedisCluster:
    """Three masters, no replicas, all on loopback."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [RedisServer(workdir / f"node{i}", cluster=True) for i in range(3)]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.nodes[0].port}/0?cluster=true"

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        assert REDIS_CLI is not None
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30,
        )
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            states = []
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    states.append("cluster_state:ok" in text)
            if all(states):
                return self
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def node_for_slot(self, slot: int) -> RedisServer:
        for node in self.nodes:
            with node.client() as client:
                for entry in client.execute_command("CLUSTER", "SLOTS"):
                    start, end, owner = int(entry[0]), int(entry[1]), entry[2]
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == int(owner[1]))
        raise LookupError(slot)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server shared by the tests that do not hurt it (flushed per test)."""
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server, emptied (data and scripts) for this test."""
    with redis_server.client() as client:
        client.flushall()
        client.script_flush()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone: kill it, pause it, restart it."""
    require_redis()
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A three-master Redis Cluster (cluster-enabled redis-servers + redis-cli --cluster)."""
    require_redis()
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[ReplicaServer]:
    """A primary and its read-only replica, both this test's own."""
    require_redis()
    primary = RedisServer(tmp_path / "primary").start()
    server = ReplicaServer(tmp_path / "replica", primary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        primary.stop()
