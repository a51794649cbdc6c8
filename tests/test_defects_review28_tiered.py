"""Review 28 (tiered): the breaker's outcomes replayed in order, and GCRA's minimum step.

Each test of a defect fails without its fix; the others hold what the review found
sound (a rolling upgrade mixes safely; the GCRA step is bit for bit the same in
decide/ and in Lua, leaves a cost of 0 alone and never lets a refund give back more
than the charge took). Redis tests run on the suite's redis-server with the scripts
on a pinned clock (tests/redis_clock.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.decide.gcra import gcra, refund
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.redis import breaker_args
from fidelity_mw.state.scripts import load_script
from fidelity_mw.state.tiered import MAX_SYNC_RUNS, TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import _PINNED, _REAL, RedisClock
from redis_server import PATIENT

# Keys expire on Redis's real milliseconds; on the pinned clock, which stands still, a
# TAT a few microseconds ahead would be gone a millisecond later: an hour more.
_TTL = (
    "  local ms = math.ceil(seconds * 1000)\n",
    "  local ms = math.ceil(seconds * 1000) + 3600000\n",
)


def _clocked(source: str) -> str:
    assert _REAL in source
    assert _TTL[0] in source
    return source.replace(_REAL, _PINNED, 1).replace(_TTL[0], _TTL[1], 1)


pytestmark = [pytest.mark.redis]

T0 = 1_000.0
UNIX = 1_764_900_000.0
OLD = "d8d2390"  # main before the runs (rev27s): what a rolling upgrade mixes with
ROOT = Path(__file__).resolve().parent.parent
ROUTE = "route:/r"


def _tiered(url: str, clock: FakeClock) -> TieredStore:
    config = StateConfig(url="tiered+" + url, sync_interval_ms=100, **PATIENT)
    store = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    store._last_sync = math.inf  # syncs only when the test says so
    return store


async def _count(store: TieredStore, breaker: BreakerConfig, outcomes: list[str]) -> None:
    """Outcomes of requests the cached breaker admitted, counted locally."""
    result = await store.admit(ROUTE, breaker, (), (), T0)
    gate = result.gate
    assert gate is not None
    assert gate.verdict == "allow"
    assert gate.epoch >= 0
    for outcome in outcomes:
        assert store.record_now(ROUTE, breaker, gate, outcome, False, T0) is not None


def _window(client: redis_sync.Redis, store: TieredStore) -> tuple[int, int]:
    """(calls, failures) in the breaker's shared window."""
    raw = client.hget(store.exact.key("br", ROUTE), "w")
    w = [int(x) for x in raw.decode().split(",")] if raw else []
    return sum(w[0::3]), sum(w[1::3])


# ------------------------------------------------------------------ 2. bounds


ALTERNATING = BreakerConfig(min_calls=10, failure_ratio=0.9, window_s=30.0, open_s=5.0)


def test_a_sync_carries_a_bounded_number_of_runs_and_the_rest_follow_in_order(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """20,000 alternating outcomes between two syncs are 20,000 runs: one sync sent them
    all (a 40 kB argument replayed in one script call, Redis blocked for everyone
    meanwhile: ~10 ms, and ~90 ms for 100,000). A sync now carries at most MAX_SYNC_RUNS
    runs; the rest go, in order, with the next syncs, and all of them are counted."""
    n = 20_000
    outcomes = [SUCCESS if k % 2 else FAILURE for k in range(n)]
    sent: list[int] = []

    async def run() -> tuple[int, int]:
        store = _tiered(redis_url, FakeClock(start=T0))
        real = store.exact.call

        async def call(script: Any, keys: Any, args: Any) -> Any:
            if script.name == "sync" and args[1]:
                runs = args[3 + 11]  # u, nb, nl, then 10 config values and the epoch
                sent.append(len(re.findall(r"[a-zA-Z]\d+", runs)))
            return await real(script, keys, args)

        store.exact.call = call  # type: ignore[method-assign]
        try:
            await _count(store, ALTERNATING, outcomes)
            for _ in range(n // MAX_SYNC_RUNS + 2):
                await store._sync_all(T0)
            assert store.breakers[ROUTE].calls == 0
            return _window(redis_sync.Redis.from_url(redis_url), store)
        finally:
            await store.aclose()

    calls, failures = asyncio.run(run())
    assert max(sent) <= MAX_SYNC_RUNS, sent
    assert (calls, failures) == (n, n // 2)


def test_a_backlog_of_runs_syncs_again_without_waiting_for_the_interval(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Outcomes beyond what one sync carries wait for a sync made at once, not for the
    next sync interval (they would pile up faster than syncs carry them away)."""

    async def run() -> bool:
        store = _tiered(redis_url, FakeClock(start=T0))
        try:
            await _count(store, ALTERNATING, [SUCCESS if k % 2 else FAILURE for k in range(2)])
            store._last_sync = T0  # just synced
            store._maybe_sync(T0)
            assert store._sync_task is None  # nothing due yet
            many = MAX_SYNC_RUNS + 1
            await _count(store, ALTERNATING, [SUCCESS if k % 2 else FAILURE for k in range(many)])
            store._maybe_sync(T0)
            started = store._sync_task is not None
            if started:
                assert store._sync_task is not None
                await store._sync_task
            return started
        finally:
            await store.aclose()

    assert asyncio.run(run())


def test_runs_left_for_a_later_sync_are_not_counted_once_the_epoch_ended(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Five failures open the breaker within the first sync's runs: the runs left for
    the next sync were admitted in the epoch that ended, and the model does not count
    them; sent later under the new epoch they would count in a window of it. (The
    ratio opens it: since fle41 a streak a tiered sync completes opens only once it
    stood two sync intervals, `decide.breaker.streak_stands`.)"""
    breaker = BreakerConfig(
        min_calls=5, failure_ratio=0.9, window_s=30.0, open_s=5.0, consecutive_failures=5
    )
    tail = [SUCCESS if k % 2 else FAILURE for k in range(2 * MAX_SYNC_RUNS)]

    async def run() -> tuple[str, int]:
        store = _tiered(redis_url, FakeClock(start=T0))
        try:
            await _count(store, breaker, [FAILURE] * 5 + tail)
            await store._sync_all(T0)
            cb = store.breakers[ROUTE]
            return cb.state, cb.calls
        finally:
            await store.aclose()

    assert asyncio.run(run()) == ("open", 0)


# ------------------------------------------------------------ 1. rolling upgrade


def _old(name: str) -> str:
    """lib.lua + NAME.lua as of OLD, as its scripts.py put them together."""
    try:
        lib, entry = (
            subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{OLD}:src/fidelity_mw/state/lua/{f}.lua"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            for f in ("lib", name)
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"git revision {OLD} is not at hand")
    return f"{lib}\n-- ---- {name}.lua\n{entry}"


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()


def test_old_and_new_processes_load_their_own_scripts_side_by_side(redis_url: str) -> None:
    """Scripts are cached by the SHA1 of their text (lib.lua included): no name is
    shared, the two versions never replace each other in SCRIPT LOAD's cache."""
    client = redis_sync.Redis.from_url(redis_url)
    names = ("admit", "batch", "sync", "record", "refund", "peek", "outbound", "fleet")
    old = [_old(name) for name in names]
    new = [load_script(name).source for name in names]
    assert {_sha(s) for s in old}.isdisjoint({_sha(s) for s in new})
    for source in old + new:
        assert client.script_load(source) == _sha(source)
    assert all(client.script_exists(*[_sha(s) for s in old + new]))


def test_old_and_new_sync_lua_read_each_others_breaker_and_lease_keys(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The new sync.lua and the one of OLD, alternately on one breaker and one limit key:
    the hash fields (window, streak, state, epoch) and the TAT are written in one format
    by the same lib.lua functions, and each counts on what the other wrote."""
    client = redis_sync.Redis.from_url(redis_url)
    new_src = _clocked(load_script("sync").source)
    old_src = _clocked(_old("sync"))
    cfg = BreakerConfig(
        min_calls=100, failure_ratio=0.9, window_s=30.0, open_s=5.0, consecutive_failures=6
    )
    conf = list(breaker_args(cfg))
    keys = ["br", "bp", "rl"]
    interval, tol = 1e-3, 10e-3
    redis_clock.set(UNIX)

    def new(runs: str, want: int) -> list[Any]:
        args = [0.5, 1, 1, *conf, 0, runs, interval, tol, 0, want, 1, 0]
        return client.eval(new_src, 3, *keys, *args)  # type: ignore[no-any-return]

    def old(calls: int, fails: int, lead: int, maxrun: int, trail: int, had_s: int, want: int):  # type: ignore[no-untyped-def]
        args = [0.5, 1, 1, *conf, 0, calls, fails, 0, lead, maxrun, trail, had_s]
        return client.eval(old_src, 3, *keys, *args, interval, tol, 0, want, 1, 0)

    def window() -> tuple[int, int, int]:
        w = [int(x) for x in client.hget("br", "w").decode().split(",")]
        return sum(w[0::3]), sum(w[1::3]), int(client.hget("br", "co"))

    def tat() -> float:
        return float(client.get("rl").decode().split(" ")[0])

    got = new("s3f2", 4)  # new: 5 calls, 2 failures, a streak of 2; 4 units leased
    assert got[1:4] == [b"closed", 0, b"0"]
    assert got[4] == 4
    assert window() == (5, 2, 2)
    assert tat() == pytest.approx(UNIX + 4 * interval - tol)
    got = old(3, 3, 3, 0, 3, 0, 2)  # old: 3 failures (no success): the streak goes on
    assert got[1:3] == [b"closed", 0]
    assert got[4] == 2
    assert window() == (8, 5, 5)
    assert tat() == pytest.approx(UNIX + 6 * interval - tol)
    got = new("f1", 1)  # the streak the old one left reaches 6: opens
    assert got[1:3] == [b"open", 1]
    assert got[4] == 1
    assert tat() == pytest.approx(UNIX + 7 * interval - tol)
    # the old one reads the new one's transition: an open breaker counts nothing
    got = old(1, 1, 1, 0, 1, 0, 0)
    assert got[1:3] == [b"open", 1]
    assert client.hget("br", "st") == b"open"


# ------------------------------------------------------------ 3. the GCRA step


# Unix time's ulp is 2**-22 s (2.4e-7 s): intervals about half an ulp (the sum rounds
# back: the step applies), an ulp, and a few, and a tie (exactly half an ulp).
ULP = math.ulp(UNIX)
BOUNDARY = [0.3 * ULP, 0.5 * ULP, 0.5000001 * ULP, 0.9 * ULP, ULP, 1.5 * ULP, 2.5 * ULP, 1e-7]


@pytest.mark.parametrize("interval", BOUNDARY)
def test_admit_lua_stores_the_tat_decide_gcra_computes_bit_for_bit(
    redis_url: str, redis_clock: RedisClock, interval: float
) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    src = _clocked(load_script("admit").source)
    tol = 10 * interval
    now = UNIX + 0.123456
    redis_clock.set(now)
    tat = 0.0
    for k in range(12):
        verdict = gcra(tat, now, interval, tol, 1 + k % 2)
        client.eval(src, 1, "k", 0, 0.5, 1, interval, tol, 1 + k % 2, 0)
        stored = float(client.get("k").decode().split(" ")[0]) if client.get("k") else 0.0
        if verdict.allowed:
            tat = verdict.tat
        assert stored.hex() == (tat if tat > 0 else 0.0).hex(), (k, stored, tat)


@pytest.mark.parametrize("interval", BOUNDARY)
def test_a_sync_lease_moves_the_tat_as_decide_gcra_charges_its_units(
    redis_url: str, redis_clock: RedisClock, interval: float
) -> None:
    """sync.lua's lease of `take` units, through lib.lua's `charged`: the TAT of one GCRA
    charge of that cost, bit for bit (`nextafter` where the sum rounds back)."""
    client = redis_sync.Redis.from_url(redis_url)
    src = _clocked(load_script("sync").source)
    tol = 1000 * interval
    now = UNIX + 0.5
    redis_clock.set(now)
    tat = 0.0
    for take in (1, 1, 3, 1):
        got = client.eval(src, 1, "k", 0.5, 0, 1, interval, tol, 0, take, take, 0)
        assert got[1] == take
        tat = gcra(tat, now, interval, tol, take).tat
        assert float(client.get("k").decode().split(" ")[0]).hex() == tat.hex()


def test_a_cost_of_zero_charges_nothing_and_a_refund_never_gives_back_more() -> None:
    """At every rate about the boundary: a cost of 0 leaves the TAT as it was; a charge
    the step made an ulp and its refund leave the TAT no lower than before the charge
    (the refund may give back less: the step errs towards admitting fewer)."""
    for interval in BOUNDARY:
        tol = 10 * interval
        base = UNIX + 0.25
        assert gcra(base, UNIX, interval, tol, 0).tat == base
        assert gcra(0.0, base, interval, tol, 0).tat == base
        charged = gcra(base, base, interval, tol, 1)
        assert charged.allowed
        assert charged.tat > base
        assert refund(charged.tat, charged.tat, base, interval, 1) >= base
