"""A fleet: 4 uvicorn processes on loopback sharing one real redis-server.

- accuracy: a global 200/s limit (burst 20) under ~2x that load for a few
  seconds; exact mode admits at most rate x t + burst (+1 %); tiered mode's
  over-admission and round trips per request are measured and printed, with
  even arrivals and in simultaneous groups of 8;
- tiered round trips on a hot key with room at 1600 requests/s;
- faults while a bounded load runs: Redis SIGKILLed and restarted, then
  SIGSTOPped and SIGCONTed; every request is answered, never with a 500,
  fallback decisions are recorded, and the time to recover is measured.

Every load is bounded in count and in time. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import httpx
import pytest

from redis_server import PATIENT, RedisServer, free_port, require_redis

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

N_PROCESSES = 4
RATE = 200  # the fleet-wide limit, per second
# requests sent in each outage and answered before it ends (the faults test)
WINDOW_REPLIES = 3
BURST = 20
START_TIMEOUT_S = 60.0

APP = textwrap.dedent(
    '''
    """One fleet member: FidelityMiddleware on a plain ASGI app, plus /stats."""
    import dataclasses
    import json
    import os

    from fidelity_mw import FidelityMiddleware, Policy
    from fidelity_mw.policy import BreakerConfig, RateLimit, StateConfig

    policy = Policy(
        state=StateConfig(
            url=os.environ["FMW_URL"],
            key_prefix=os.environ["FMW_PREFIX"],
            timeout_ms=int(os.environ["FMW_TIMEOUT_MS"]),
            connect_timeout_ms=int(os.environ["FMW_TIMEOUT_MS"]),
            sync_interval_ms=int(os.environ.get("FMW_SYNC_MS", "100")),
        ),
        rate_limits=(
            RateLimit(name="fleet", rate="{rate}/s", burst={burst}, key="global",
                      match="/api/limited"),
            RateLimit(name="wide", rate="100000/s", key="global", match="/api/open"),
        ),
        breaker=BreakerConfig(min_calls=50, failure_ratio=0.5, open_s=5.0),
        rate_limit_headers="never",
    )


    async def inner(scope, receive, send):
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]}})
        await send({{"type": "http.response.body", "body": b"ok"}})


    mw = FidelityMiddleware(inner, policy=policy, telemetry=False)
    sources = {{}}


    def stats():
        store = mw.engine.store
        out = {{"sources": sources, "kind": type(store).__name__}}
        exact = getattr(store, "exact", store)
        out["redis"] = dataclasses.asdict(exact.stats)
        if exact is not store:
            out["tiered"] = dataclasses.asdict(store.stats)
        return json.dumps(out).encode()


    async def app(scope, receive, send):
        if scope["path"] == "/stats":
            body = stats()
            await send({{"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]}})
            await send({{"type": "http.response.body", "body": body}})
            return
        scope["state"] = {{}}

        async def tagged(message):
            if message["type"] == "http.response.start":
                ctx = scope["state"].get("fidelity")
                source = ""
                if ctx is not None:
                    for decision in ctx.decisions:
                        if decision.layer != "deadline":
                            source = decision.state_source
                sources[source] = sources.get(source, 0) + 1
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"x-state-source", source.encode())]
            await send(message)

        await mw(scope, receive, tagged)
    '''
).format(rate=RATE, burst=BURST)


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the loopback socket listening on `port` (Linux /proc):
    an answer alone may come from another test session's server on that port."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{inode}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # it exited
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


class Fleet:
    def __init__(
        self,
        workdir: Path,
        url: str,
        prefix: str,
        timeout_ms: int = PATIENT["timeout_ms"],
        app: str = APP,
        env: dict[str, str] | None = None,
    ) -> None:
        self.timeout_ms = timeout_ms
        self.app = app  # the member's module source (defines `app`)
        self.env = env or {}
        self.workdir = workdir
        self.url = url
        self.prefix = prefix
        self.ports = [free_port() for _ in range(N_PROCESSES)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Fleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "fleet_app.py").write_text(self.app)
        env = {
            **os.environ,
            "FMW_URL": self.url,
            "FMW_PREFIX": self.prefix,
            "FMW_TIMEOUT_MS": str(self.timeout_ms),
            **self.env,
        }
        for port in self.ports:
            with (self.workdir / f"uvicorn-{port}.log").open("wb") as log:
                self.procs.append(self._spawn(port, env, log))
        deadline = time.monotonic() + START_TIMEOUT_S
        moved = 0
        for index in range(len(self.ports)):
            while True:
                port = self.ports[index]
                try:
                    httpx.get(f"http://127.0.0.1:{port}/stats", timeout=1.0).raise_for_status()
                    if listens(self.procs[index].pid, port):
                        break
                    # another session's server answered on the port: ours could not bind
                    # it and exits (then it gets another port below)
                    raise httpx.ConnectError("not our member")
                except httpx.HTTPError:
                    if self.procs[index].poll() is not None and moved < 3 and self._taken(port):
                        # The free port went to another process between our probe and
                        # the member's bind (other sessions share this machine): another.
                        moved += 1
                        self.ports[index] = port = free_port()
                        with (self.workdir / f"uvicorn-{port}.log").open("wb") as log:
                            self.procs[index] = self._spawn(port, env, log)
                        continue
                    if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                        self.stop()
                        raise RuntimeError(f"fleet member on {port} did not start") from None
                    time.sleep(0.05)
        return self

    def _taken(self, port: int) -> bool:
        log = (self.workdir / f"uvicorn-{port}.log").read_text(errors="replace")
        return "address already in use" in log.lower()

    def _spawn(self, port: int, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "uvicorn", "fleet_app:app", "--app-dir", str(self.workdir)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        argv += ["--no-access-log", "--lifespan", "off"]
        # The test's keep-alive connections may idle for seconds while a starved member
        # answers on a busy machine: past uvicorn's 5 s default the member closed one and
        # the next request on it read EOF (a compiled run beside two helpers, once).
        argv += ["--timeout-keep-alive", "60"]
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stats(self) -> list[dict]:  # type: ignore[type-arg]
        return [
            httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5.0).json() for port in self.ports
        ]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=60)  # (a killed process ends; a starved machine reaps late)
        self.procs = []


class Reply(NamedTuple):
    sent: float
    done: float
    status: int  # -1: no answer
    source: str


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection: cheap enough to offer 400 req/s
    from one test process on a shared 2-core machine (httpx costs ~10x more CPU)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: fleet\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers.get("x-state-source", "")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def load(
    ports: list[int],
    path: str,
    rate: float,
    duration_s: float,
    batch: int = 1,
    answer_s: float = 5.0,
    replies: list[Reply] | None = None,
) -> list[Reply]:
    """`rate` requests/s for `duration_s`, round-robin over the fleet. Bounded: count and time.

    `batch` > 1: requests arrive in groups of `batch` at the same instant, each group
    at one member (the same average rate, in bursts). `answer_s`: how long one request
    may wait for its answer before it counts as unanswered (status -1, the error's name
    as its source). `replies`: a list to append to as the answers come (a fault driver
    watches it)."""
    total = int(rate * duration_s)
    if replies is None:
        replies = []
    pools: dict[int, asyncio.Queue[Connection]] = {}
    for port in ports:
        pools[port] = asyncio.Queue()
        for _ in range(16):
            pools[port].put_nowait(Connection(port))
    start = time.monotonic()

    async def one(i: int) -> None:
        group = i // batch
        await asyncio.sleep(max(0.0, start + group * batch / rate - time.monotonic()))
        pool = pools[ports[group % len(ports)]]
        conn = await pool.get()
        sent = time.monotonic()
        try:
            status, source = await asyncio.wait_for(conn.get(path), timeout=answer_s)
            replies.append(Reply(sent, time.monotonic(), status, source))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            conn.close()
            replies.append(Reply(sent, time.monotonic(), -1, type(exc).__name__))
        finally:
            pool.put_nowait(conn)

    try:
        await asyncio.wait_for(
            asyncio.gather(*(one(i) for i in range(total))),
            timeout=duration_s + max(30.0, 3.0 * answer_s),
        )
    finally:
        for pool in pools.values():
            while not pool.empty():
                pool.get_nowait().close()
    return replies


def script_calls(server: RedisServer) -> int:
    with server.client() as client:
        stats = client.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


@pytest.fixture(scope="module")
def fleet_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("fleet-redis")).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running(fleet: Fleet) -> Iterator[Fleet]:
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def gcra_admitted(times: list[float]) -> int:
    """How many requests arriving at `times` an exact fleet-wide GCRA (RATE, BURST) admits."""
    interval = 1.0 / RATE
    tolerance = (BURST - 1) * interval
    tat = float("-inf")
    admitted = 0
    for t in sorted(times):
        tat = max(tat, t)
        if tat - t <= tolerance:
            admitted += 1
            tat += interval
    return admitted


def exact_admits(replies: list[Reply]) -> int:
    """A floor for what an exact limiter admits of these requests. Each was decided
    between its send and its reply, so the replay takes whichever of those times admits
    fewer: a loaded machine that delays or bunches requests lowers this floor instead of
    failing the test."""
    return min(gcra_admitted([r.sent for r in replies]), gcra_admitted([r.done for r in replies]))


def accuracy_report(mode: str, replies: list[Reply]) -> tuple[int, float, float]:
    statuses = Counter(r.status for r in replies)
    admitted = statuses[200]
    span = max(r.done for r in replies) - min(r.sent for r in replies)
    bound = RATE * span + BURST
    print(
        f"\n[{mode}] {len(replies)} requests over {span:.2f} s: admitted {admitted}, "
        f"rejected {statuses[429]}, GCRA bound {bound:.1f} -> "
        f"{100.0 * (admitted - bound) / bound:+.2f} % vs bound; statuses {dict(statuses)}"
    )
    return admitted, bound, span


async def test_exact_mode_accuracy_across_four_processes(fleet_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with running(Fleet(tmp_path / "exact", fleet_redis.url, "exact")) as fleet:
        before = script_calls(fleet_redis)
        replies = await load(fleet.ports, "/api/limited", rate=2 * RATE, duration_s=3.0)
        calls = script_calls(fleet_redis) - before
        stats = fleet.stats()
    admitted, bound, _span = accuracy_report("exact", replies)
    fallbacks = sum(member["redis"]["fallbacks"] for member in stats)
    print(f"[exact] fallback decisions: {fallbacks}")
    print(
        f"[exact] {calls} script calls for {len(replies)} requests = "
        f"{calls / len(replies):.3f}/request (one admit each; successes ride along)"
    )
    assert {r.status for r in replies} <= {200, 429}
    assert admitted <= bound * 1.01
    # ... and not far below the rate: most of what an exact limiter admits of these arrivals
    ideal = exact_admits(replies)
    print(f"[exact] an exact limiter would admit {ideal} of these arrivals")
    assert admitted >= 0.8 * ideal
    sources = Counter()
    for member in stats:
        sources.update(member["sources"])
    assert set(sources) == {"redis"}
    assert all(member["redis"]["fallbacks"] == 0 for member in stats)


async def test_tiered_mode_over_admission_and_round_trips(fleet_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = "tiered+" + fleet_redis.url
    with running(Fleet(tmp_path / "tiered", url, "tiered")) as fleet:
        before = script_calls(fleet_redis)
        replies = await load(fleet.ports, "/api/limited", rate=2 * RATE, duration_s=3.0)
        calls = script_calls(fleet_redis) - before
        stats = fleet.stats()
    admitted, bound, _span = accuracy_report("tiered", replies)
    per_request = calls / len(replies)
    sources = Counter()
    for member in stats:
        sources.update(member["sources"])
    print(
        f"[tiered] over-admission {admitted - bound:+.1f} requests "
        f"({100.0 * (admitted - bound) / bound:+.2f} %); {calls} script calls for "
        f"{len(replies)} requests = {per_request:.3f} round trips/request; "
        f"decision sources {dict(sources)}"
    )
    assert {r.status for r in replies} <= {200, 429}
    max_slice = BURST // 4
    assert admitted <= bound + N_PROCESSES * max_slice  # the documented bound
    assert admitted <= bound * 1.01  # from a fresh bucket: never more than exact GCRA
    assert sources["cache"] > 0
    ideal = min(gcra_admitted([r.sent for r in replies]), gcra_admitted([r.done for r in replies]))
    print(f"[tiered] an exact limiter would admit {ideal} of these arrivals")


async def test_tiered_mode_with_batched_arrivals(fleet_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same load in simultaneous groups of 8 per member: each group shares one lease."""
    url = "tiered+" + fleet_redis.url
    with running(Fleet(tmp_path / "tiered8", url, "tiered8")) as fleet:
        before = script_calls(fleet_redis)
        replies = await load(fleet.ports, "/api/limited", rate=2 * RATE, duration_s=3.0, batch=8)
        calls = script_calls(fleet_redis) - before
        stats = fleet.stats()
    admitted, bound, _span = accuracy_report("tiered, batches of 8", replies)
    per_request = calls / len(replies)
    sources = Counter()
    for member in stats:
        sources.update(member["sources"])
    print(
        f"[tiered, batches of 8] over-admission {admitted - bound:+.1f} requests "
        f"({100.0 * (admitted - bound) / bound:+.2f} %); {calls} script calls for "
        f"{len(replies)} requests = {per_request:.3f} round trips/request; "
        f"decision sources {dict(sources)}"
    )
    assert {r.status for r in replies} <= {200, 429}
    assert admitted <= bound * 1.01
    ideal = exact_admits(replies)
    print(f"[tiered, batches of 8] an exact limiter would admit {ideal} of these arrivals")
    assert admitted >= 0.7 * ideal  # it limited at the rate, not far below
    # one lease per group at most, plus the periodic syncs: far below one call per request
    assert per_request <= 0.5
    assert per_request < 1.0


@pytest.mark.parametrize("batch", [1, 8], ids=["even", "batches-of-8"])
async def test_tiered_saturated_key_at_a_longer_sync_interval(  # type: ignore[no-untyped-def]
    fleet_redis, tmp_path, batch: int
) -> None:
    """The accuracy load with `sync_interval_ms = 500`: the periodic floor drops to
    0.025 per request, and the saturated key's leases (ahead, up to a burst) add about
    as much (0.04 counted on a pinned clock, tests/test_tiered_saturated.py).

    Each request may wait 30 s for its answer, not the load's default 5 s: under load 10
    (out41's run) 23 of 1,200 went unanswered within 5 s and passed on a re-run. What a
    busy machine delays here is the members' CPU, not a decision: 8 requests arrive at
    once at one member (16 connections each), and a member starved of CPU for a few
    seconds leaves the last of them waiting. The test proves that every request is
    answered 200 or 429 and the counts below, never how fast."""
    url = "tiered+" + fleet_redis.url
    fleet = Fleet(tmp_path / f"slow{batch}", url, f"slow{batch}", env={"FMW_SYNC_MS": "500"})
    with running(fleet):
        before = script_calls(fleet_redis)
        replies = await load(
            fleet.ports, "/api/limited", rate=2 * RATE, duration_s=3.0, batch=batch, answer_s=30.0
        )
        calls = script_calls(fleet_redis) - before
    admitted, bound, _span = accuracy_report(f"tiered 500 ms, batch {batch}", replies)
    per_request = calls / len(replies)
    ideal = exact_admits(replies)
    print(
        f"[tiered 500 ms, batch {batch}] {calls} script calls (fleet announcements included) "
        f"for {len(replies)} requests = {per_request:.3f}/request; an exact limiter would "
        f"admit {ideal} of these arrivals"
    )
    unanswered = Counter((r.status, r.source) for r in replies if r.status not in (200, 429))
    assert not unanswered, unanswered  # (status -1: no answer, with the error's name)
    assert admitted <= bound * 1.01
    assert admitted >= 0.7 * ideal
    assert per_request <= 0.15  # slack for a loaded machine (counted: 0.04)


def first_recovery(stats: list[dict], moment: float) -> list[int | None]:  # type: ignore[type-arg]
    """Per member: ms from `moment` to its first recovery after it (None: none)."""
    out = []
    for member in stats:
        later = [t for t in member["redis"]["recovered_at"] if t >= moment]
        out.append(round((min(later) - moment) * 1000) if later else None)
    return out


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def first_redis_after(replies: list[Reply], moment: float) -> float | None:
    later = [r.sent for r in replies if r.sent >= moment and r.source == "redis"]
    return min(later) - moment if later else None


async def decides_on_redis(port: int, tries: int = 100) -> bool:
    """Whether one of `tries` sequential requests (10 ms apart, a few seconds at most) to the
    member on `port` is decided on Redis."""
    conn = Connection(port)
    try:
        for _ in range(tries):
            _status, source = await asyncio.wait_for(conn.get("/api/open"), timeout=5.0)
            if source == "redis":
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        conn.close()


async def test_faults_under_load_kill_restart_stop_continue(fleet_redis, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """200/s for 6 s: Redis killed at 1 s, restarted at 2 s, paused at 3.5 s, resumed at 4.5 s.

    Each outage lasts until requests sent in it have been answered (`WINDOW_REPLIES`),
    however late a loaded machine runs the steps: its window counts from the moment the
    fault took effect (the kill's process reaped, SIGSTOP sent) to the next step's
    start. Before, it counted from when the kill began: a driver running late (load
    12-31) killed and restarted back to back, and no request fell inside."""
    fleet = Fleet(tmp_path / "faults", fleet_redis.url, "faults", timeout_ms=50)  # tiny
    total = int(RATE * 6.0)
    with running(fleet):
        marks: dict[str, float] = {}
        seen: list[Reply] = []

        async def answered_since(moment: float) -> None:
            """Until WINDOW_REPLIES requests sent after `moment` are answered (bounded;
            also once the load has sent its last request)."""
            deadline = time.monotonic() + 60.0
            while time.monotonic() < deadline and len(seen) < total:
                if sum(1 for r in seen if r.sent >= moment) >= WINDOW_REPLIES:
                    return
                await asyncio.sleep(0.01)

        async def faults() -> None:
            start = time.monotonic()

            async def at(offset: float, name: str, action) -> None:  # type: ignore[no-untyped-def]
                await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
                marks[name] = time.monotonic()  # when the action began
                await asyncio.to_thread(action)
                marks[name + " done"] = time.monotonic()  # and from when it holds

            try:
                await at(1.0, "killed", fleet_redis.kill)
                await answered_since(marks["killed done"])
                await at(2.0, "restarted", fleet_redis.start)
                await at(3.5, "stopped", fleet_redis.pause)
                await answered_since(marks["stopped done"])
                await at(4.5, "continued", fleet_redis.resume)
            finally:
                fleet_redis.resume()  # never leave it paused

        replies, _ = await asyncio.gather(
            load(fleet.ports, "/api/open", rate=RATE, duration_s=6.0, replies=seen), faults()
        )
        settled = [await decides_on_redis(port) for port in fleet.ports]
        stats = fleet.stats()
    statuses = Counter(r.status for r in replies)
    by_source = Counter(r.source for r in replies)
    in_kill = Counter(
        r.source for r in replies if marks["killed done"] <= r.sent < marks["restarted"]
    )
    in_stop = Counter(
        r.source for r in replies if marks["stopped done"] <= r.sent < marks["continued"]
    )
    after_restart = first_redis_after(replies, marks["restarted"])
    after_continue = first_redis_after(replies, marks["continued"])
    outages = sum(member["redis"]["outages"] for member in stats)
    # CLOCK_MONOTONIC is system-wide on Linux: the members' recovery times compare with ours
    back_restart = first_recovery(stats, marks["restarted"])
    back_continue = first_recovery(stats, marks["continued"])
    slowest = max(r.done - r.sent for r in replies)
    replies_start = min(r.sent for r in replies)
    print(
        f"\n[faults] {len(replies)} requests, statuses {dict(statuses)}, "
        f"sources {dict(by_source)}\n"
        f"  killed..restarted: {dict(in_kill)} over "
        f"{ms(marks['restarted'] - marks['killed done'])} ms (the kill took "
        f"{ms(marks['killed done'] - marks['killed'])} ms, began "
        f"{ms(marks['killed'] - replies_start)} ms in); stopped..continued: {dict(in_stop)} "
        f"over {ms(marks['continued'] - marks['stopped done'])} ms\n"
        f"  first redis decision {ms(after_restart)} ms after the restart began, "
        f"{ms(after_continue)} ms after SIGCONT\n"
        f"  members back on Redis (ms after the restart began): {back_restart}; "
        f"(ms after SIGCONT): {back_continue}\n"
        f"  outages seen by the members: {outages}; slowest request {slowest * 1000:.0f} ms"
    )
    assert statuses == Counter({200: len(replies)})  # every request answered, none failed
    assert in_kill["fallback"] > 0
    assert in_stop["fallback"] > 0
    assert after_restart is not None
    # A request sent after SIGCONT was decided on Redis again. On a loaded machine the
    # faults' own steps (a restart waits for the new server to answer) can run late
    # enough that SIGCONT comes after the load's last request (CI beside three burners,
    # compiled: 171 requests in the 1 s pause, none after it); then the members' own
    # recovery times after SIGCONT and the requests after the load (`settled`) show it.
    sent_after_continue = [r for r in replies if r.sent >= marks["continued"]]
    assert after_continue is not None or not sent_after_continue, len(sent_after_continue)
    assert None not in back_restart  # every member got back to Redis by itself
    assert None not in back_continue
    # Back within the probe backoff cap (0.5 s) plus generous scheduling slack for a
    # loaded machine (docs/operations.md: 0.05-0.26 s measured). The outage counts are
    # printed only: a 50 ms timeout on a busy machine is a genuine outage too; the
    # restart itself costs one (tests/test_redis_restart.py, issue 12 #22).
    assert max(b for b in back_restart if b is not None) <= 2_000
    # and is on Redis at the end, not stuck on fallback. How many requests fell back
    # meanwhile depends on how fast a loaded machine serves them (a 50 ms timeout): the
    # counts are printed, not compared.
    assert settled == [True] * N_PROCESSES, settled


@pytest.mark.parametrize("batch", [1, 8], ids=["even", "batches-of-8"])
async def test_tiered_round_trips_on_a_hot_key(fleet_redis, tmp_path, batch: int) -> None:  # type: ignore[no-untyped-def]
    """A hot key with room (the /api/open limit) at 1600 requests/s over the fleet:
    0.026-0.038 round trips per request here (0.37-0.39 before the demand fix)."""
    url = "tiered+" + fleet_redis.url
    with running(Fleet(tmp_path / f"hot{batch}", url, f"hot{batch}")) as fleet:
        before = script_calls(fleet_redis)
        replies = await load(fleet.ports, "/api/open", rate=1600, duration_s=2.0, batch=batch)
        calls = script_calls(fleet_redis) - before
    span = max(r.done for r in replies) - min(r.sent for r in replies)
    per_request = calls / len(replies)
    print(
        f"\n[tiered hot key, batch {batch}] {len(replies)} requests in {span:.2f} s "
        f"({len(replies) / span:.0f}/s): {calls} script calls = {per_request:.4f}/request"
    )
    assert Counter(r.status for r in replies) == Counter({200: len(replies)})
    # Calls follow the sync cadence (one per process per >= 0.4 x sync interval,
    # leases riding along), not the request rate: a bound in calls per second of
    # the run, whatever rate this machine managed. (Before the demand fix and the
    # shared leases: 1179-1251 calls for these 3200 requests.)
    sync_s = 0.1
    assert calls <= N_PROCESSES * span / (0.4 * sync_s) + 4 * N_PROCESSES
