"""A fleet on one Redis through the faults one process alone cannot show (fle40): Redis
restarted with its data lost, a process SIGKILLed holding tiered leases (and started
again), one process cut off from Redis while the others are not. No defect was found in
these; each test pins what the docs promise and would fail if it broke (docs/state.md,
docs/operations.md "Redis down, slow, paused, restarted").

The limits refill one unit per 10 minutes, so real time adds nothing during a test and
every count is exact; no test waits out a window.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore, hashed_key
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SLOW = LimitSpec("q", 600.0, 12_000.0, 1, False)  # burst 20, one unit back per 10 min
OPENS = BreakerConfig(min_calls=5, failure_ratio=0.5, open_s=600.0, open_min_s=600.0)


def tiered(url: str, seed: int, sync_ms: int = 20, **state: object) -> TieredStore:
    config = StateConfig(
        url="tiered+" + url,
        sync_interval_ms=sync_ms,
        **{**PATIENT, **QUIET, **state},  # type: ignore[arg-type]
    )
    return TieredStore(config=config, rng=seeded_random(seed))


async def settled(store: TieredStore) -> None:
    """Wait out the lease and sync calls the last admits started: a lease Redis already
    granted is not in the slice until its call returns (on a loaded machine, later)."""
    for _ in range(100):  # bounded
        busy = [t for t in (*store._lease_tasks, store._sync_task) if t and not t.done()]
        if not busy:
            return
        await asyncio.gather(*busy, return_exceptions=True)


def _calls(window: bytes) -> int:
    """The calls a breaker window in Redis counts (its `w` field: calls, failures, slow
    per bucket)."""
    return sum(int(x) for x in window.decode().split(",")[0::3])


def held(store: TieredStore, key: str = "q|k") -> int:
    sl = store.slices.get(key)
    return sl.tokens if sl is not None else 0


async def test_redis_restarted_empty_over_admits_at_most_the_units_leased_before(
    own_redis: RedisServer,
) -> None:
    """Two tiered processes hold leased units when Redis restarts without its data: the
    fresh bucket is full again, so the fleet may admit a burst plus what the slices held
    (never more), the breaker that was open is closed for both within a sync, and the
    scripts, gone with the server, are loaded again (no process stuck on NOSCRIPT)."""
    a, b = tiered(own_redis.url, 1), tiered(own_redis.url, 2)
    try:
        for _ in range(6):  # a's failures open the route's breaker for the fleet
            result = await a.admit("route:/x", OPENS, (), (), time.monotonic())
            assert result.gate is not None
            await a.record("route:/x", OPENS, result.gate, FAILURE, False, time.monotonic())
        for _ in range(3000):  # bounded (30 s): until b's copy says open
            await asyncio.sleep(0.01)
            await a.admit("route:/x", OPENS, (), (), time.monotonic())
            seen = await b.admit("route:/x", OPENS, (), (), time.monotonic())
            assert seen.gate is not None
            if seen.gate.verdict == "reject":
                break
        assert seen.gate.verdict == "reject"
        # Leases taken just before the restart (a slice idle for a sync interval is given
        # back: nothing awaits between these and the restart, which blocks the loop)
        for _ in range(3):
            for store in (a, b):
                assert (await store.admit(None, None, ["q|k"], [SLOW], time.monotonic())).admitted
        leased = held(a) + held(b)
        assert leased > 0

        own_redis.restart()

        admitted = 0
        gates: list[tuple[str, str, str]] = []
        for _ in range(200):  # bounded: every store asks until the key refuses
            for name, store in (("a", a), ("b", b)):
                got = await store.admit(None, None, ["q|k"], [SLOW], time.monotonic())
                admitted += got.admitted
                gate = await store.admit("route:/x", OPENS, (), (), time.monotonic())
                assert gate.gate is not None
                gates.append((name, gate.gate.verdict, gate.source))
            await asyncio.sleep(0.005)
        # the fresh bucket's burst, and the units the slices held then: no more
        assert 20 <= admitted <= 20 + leased
        # closed again for both; the last decisions come from Redis or its cache
        last = gates[-20:]
        assert {verdict for _, verdict, _ in last} == {"allow"}
        assert {source for _, _, source in last} <= {"redis", "cache"}
        assert a.exact.stats.script_loads + b.exact.stats.script_loads >= 1
    finally:
        await a.aclose()
        await b.aclose()


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from fidelity_mw.policy import StateConfig
    from fidelity_mw.state.base import LimitSpec
    from fidelity_mw.state.tiered import TieredStore

    async def main() -> None:
        spec = LimitSpec("q", 600.0, 12000.0, 1, False)
        config = StateConfig(url="tiered+" + sys.argv[1], sync_interval_ms=20,
                             timeout_ms=5000, connect_timeout_ms=5000,
                             fleet_share_max_age_s=0.0)
        store = TieredStore(config=config)
        admitted = 0
        for _ in range(int(sys.argv[2])):
            admitted += (await store.admit(None, None, ["q|k"], [spec], time.monotonic())).admitted
        for _ in range(100):  # a lease or sync the last admits started would change the slice
            busy = [t for t in (*store._lease_tasks, store._sync_task) if t and not t.done()]
            if not busy:
                break
            await asyncio.gather(*busy, return_exceptions=True)
        sl = store.slices.get("q|k")
        print(json.dumps({"admitted": admitted, "held": sl.tokens if sl else 0}), flush=True)
        await asyncio.sleep(60)  # until SIGKILLed (self-stopping all the same)

    asyncio.run(main())
    """
)


def start_child(url: str, requests: int) -> tuple[subprocess.Popen[str], dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(requests)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the child process said nothing"
    return proc, json.loads(line)


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


async def test_a_process_killed_holding_leases_loses_them_until_they_refill(
    redis_url: str,
) -> None:
    """A tiered process SIGKILLed with units leased and not spent: nobody gives them
    back, so the others admit exactly the burst less what it admitted and held (no
    over-admission, the under-admission bounded by its slice), and the same service
    started again is a new member that finds the bucket as the fleet left it."""
    first, said = start_child(redis_url, 3)
    try:
        assert said["admitted"] == 3
        assert said["held"] >= 1
    finally:
        kill(first)
    survivor = tiered(redis_url, 3)
    try:
        admitted = 0
        for _ in range(40):  # bounded: more than the burst
            got = await survivor.admit(None, None, ["q|k"], [SLOW], time.monotonic())
            admitted += got.admitted
        await settled(survivor)
        assert admitted + held(survivor) == 20 - said["admitted"] - said["held"]
        again, said_again = start_child(redis_url, 3)
        kill(again)
        assert said_again == {"admitted": 0, "held": 0}
    finally:
        await survivor.aclose()


class Cut:
    """A TCP proxy to Redis for one process: `cut()` stops carrying bytes either way
    (its calls time out, as behind a partition), `heal()` carries them on (what was sent
    meanwhile arrives late, as TCP retransmits it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open = asyncio.Event()
        self.open.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self.open.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.open.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.get_running_loop().create_task(pipe)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        self.open.set()
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("mode", ["redis", "tiered"])
async def test_one_process_cut_off_degrades_alone_and_its_outcomes_count_once(
    redis_url: str, redis_server: RedisServer, mode: str
) -> None:
    """Process A reaches Redis through a proxy that stops carrying bytes; B is not cut.
    A decides per `on_error` (local: `fallback`) while cut, B stays exact throughout, and
    once A is back on Redis the fleet's breaker window holds every outcome of a request
    Redis (or its cache) admitted once: none of A's counted twice (a sync or record whose
    reply was lost is never resent), none lost but those A dropped with a lost reply."""
    proxy = Cut(redis_server.port)
    port = await proxy.start()
    via_proxy = f"redis://127.0.0.1:{port}/0"
    # A's calls through the proxy, on this test's loaded event loop, answer within
    # this: at 100 ms a starved machine (load 12-31) timed one out before the cut. The
    # cut phase goes on until A has decided without Redis (its first call there waits
    # the timeout), so a longer timeout does not end the phase before its fallback.
    state = {"timeout_ms": 1_000, "connect_timeout_ms": 1_000}
    if mode == "tiered":
        a: RedisStore | TieredStore = tiered(via_proxy, 1, **state)
        b: RedisStore | TieredStore = tiered(redis_url, 2)
    else:
        a = RedisStore(config=StateConfig(url=via_proxy, **{**QUIET, **state}))  # type: ignore[arg-type]
        b = RedisStore(config=StateConfig(url=redis_url, **{**PATIENT, **QUIET}))
    never = BreakerConfig(min_calls=1_000_000, failure_ratio=1.0, window_s=600.0)
    wide = LimitSpec("w", 1e-5, 10.0, 1, False)
    counted = {"a": 0, "b": 0}
    sources: dict[str, dict[str, set[str]]] = {}

    async def request(name: str, store: RedisStore | TieredStore, phase: str, i: int) -> None:
        got = await store.admit("route:/x", never, ["w|k"], [wide], time.monotonic())
        sources.setdefault(phase, {}).setdefault(name, set()).add(got.source)
        assert got.admitted
        assert got.gate is not None
        outcome = FAILURE if i % 3 == 0 else SUCCESS
        await store.record("route:/x", never, got.gate, outcome, False, time.monotonic())
        if got.source != "fallback":
            counted[name] += 1

    try:
        for phase, n in (("before", 40), ("cut", 40), ("healed", 200)):
            if phase == "cut":
                proxy.cut()
            elif phase == "healed":
                proxy.heal()
            i = 0
            while i < n or (
                phase == "cut" and "fallback" not in sources[phase]["a"] and i < 4_000
            ):  # (bounded: 20 s of 5 ms steps at the least)
                await request("a", a, phase, i)
                await request("b", b, phase, i)
                await asyncio.sleep(0.005)
                i += 1
        exact_a = a.exact if isinstance(a, TieredStore) else a
        # the last outcomes reach Redis (tiered: with the next sync): 20 steps, then on
        # until they have (a fixed 0.4 s was short for a starved machine; 30 s at most)
        for step in range(1500):
            await a.admit("route:/x", never, (), (), time.monotonic())
            await b.admit("route:/x", never, (), (), time.monotonic())
            await asyncio.sleep(0.02)
            with redis_server.client() as client:
                window = client.hget(hashed_key("fmw", "br", "route:/x"), "w")
            least = counted["a"] + counted["b"] - exact_a.stats.dropped_records
            if step >= 19 and window is not None and _calls(window) >= least:
                break
    finally:
        await a.aclose()
        await b.aclose()
        await proxy.aclose()
    assert "fallback" in sources["cut"]["a"]
    assert "fallback" not in sources["cut"]["b"]
    assert "fallback" not in sources["before"]["a"] | sources["before"]["b"]
    assert "fallback" not in sources["healed"]["b"]
    assert sources["healed"]["a"] - {"fallback"}  # back on Redis
    assert window is not None
    calls = _calls(window)
    total = counted["a"] + counted["b"]
    assert total - exact_a.stats.dropped_records <= calls <= total
