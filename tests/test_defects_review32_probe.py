"""A call whose Redis admission timed out must not leave a half-open probe slot held by nobody.

A script call that times out on the client (Redis slower than `timeout_ms`) has usually
run all the same: Redis applies it once it gets to it. An admission whose route breaker
was half-open took the probe slot that way, and nobody ever reported that probe (the
request fell back to the local state): the whole fleet refused the route `half_open` for
`probe_lease_s` (30 s by default), its `Retry-After` saying `open_s`. Measured by rev32s
with `DEBUG SLEEP 0.3` against `timeout_ms = 100`; here Redis is stopped (SIGSTOP) while
the call times out, which runs it the same way when Redis goes on (`CLIENT PAUSE ...
WRITE` would not do: a paused client that disconnects is dropped with its command
unrun). The scripts read a pinned time (tests/redis_clock.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis_patience import answered_by_redis, answered_by_redis_sync, up_after_probe
from fidelity_mw.decide.breaker import FAILURE, SUCCESS, Gate
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import InboundResult
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock, patch_scripts
from redis_server import PATIENT, QUIET, RedisServer, require_redis

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

BREAKER = BreakerConfig(
    min_calls=1,
    consecutive_failures=1,
    open_min_s=1.0,
    open_s=1.0,
    open_jitter=0.0,
    half_open_probes=1,
    probe_lease_s=30.0,
)
T1 = 1_000_000.0
ROUTE = "route:/r"


class DebugRedis(RedisServer):
    """A redis-server that accepts DEBUG SLEEP (off by default since Redis 7)."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--enable-debug-command", "yes"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis()
    server = DebugRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def _stopped(server: RedisServer) -> bool:
    """Has the SIGSTOP taken hold? (`/proc/<pid>/stat`'s state: T)"""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "T"


@contextlib.contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP) for the block: commands sent meanwhile run when it goes on,
    after the block, however late the test sent them. (With `DEBUG SLEEP 0.5`, a test
    process descheduled for 0.4 s on a loaded machine sent its call after Redis woke,
    which answered it in time: ('redis', None), not the timeout the test is about.)"""
    server.pause()
    try:
        while not _stopped(server):
            time.sleep(0.001)  # (polling for the stop to take hold)
        yield
    finally:
        server.resume()


@pytest.fixture
def pinned(own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisClock]:
    patch_scripts(monkeypatch)
    clock = RedisClock(own_redis.url)
    try:
        yield clock
    finally:
        clock.close()


def _gate(result: InboundResult) -> Gate:
    assert result.gate is not None
    return result.gate


async def _until(condition: Callable[[], bool], budget_s: float = 30.0) -> bool:
    """Let the event loop run (real round trips, the store's background work) until
    `condition` holds; whether it did."""
    for _ in range(int(budget_s / 0.005)):
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


class Fleet:
    """`slow`: the instance whose admission times out (timeout_ms = 100, a fake clock for
    its reconnect backoff); `other`: another instance of the fleet, patient."""

    def __init__(self, server: RedisServer, pinned: RedisClock, coalesce: bool) -> None:
        self.server = server
        self.pinned = pinned
        config = StateConfig(url=server.url, timeout_ms=100, connect_timeout_ms=1000, **QUIET)
        self.slow = RedisStore(config=config, rng=lambda: 0.5, clock=FakeClock())
        self.slow.coalesce = coalesce
        self.other = RedisStore(config=StateConfig(url=server.url, **PATIENT, **QUIET))
        self.probes_key = self.other.breaker_keys(ROUTE)[1]

    async def open_breaker(self) -> None:
        """Open the route's breaker at T1 (one failure) and let its open time pass."""
        self.pinned.set(T1)
        gate = _gate(await self.other.admit(ROUTE, BREAKER, [], [], 0.0))
        await self.other.record(ROUTE, BREAKER, gate, FAILURE, False, 0.0)
        self.pinned.set(T1 + 2.0)  # open time over: the next admission probes
        # the slow instance's connection is up (a connection made while Redis sleeps
        # times out in its handshake: nothing sent)
        assert (await self.warm()).source == "redis"

    async def warm(self) -> InboundResult:
        """A call of the slow instance's that changes nothing, answered by Redis."""
        slow = self.slow
        return await answered_by_redis(
            lambda: slow.admit(None, None, [], [], 0.0), lambda got: got.source, slow
        )

    async def warm_outbound(self) -> tuple[Any, ...]:
        """Its connection up and outbound.lua cached (else NOSCRIPT after the stall: the
        script unrun): a gate of an upstream of its own, answered by Redis."""
        slow = self.slow
        return await answered_by_redis(
            lambda: slow.outbound_gate("upstream:warm", BREAKER, None, None, False, 0.0),
            lambda got: got[2],
            slow,
        )

    def warm_sync(self, upstream: str = "upstream:warm") -> tuple[Any, ...]:
        """The same over its blocking client."""
        slow = self.slow
        assert isinstance(slow._clock, FakeClock)
        return answered_by_redis_sync(
            lambda: slow.outbound_gate_sync(upstream, BREAKER, None, None, False, 0.0),
            lambda got: got[2],
            slow._clock,
        )

    async def timed_out_admission(self) -> InboundResult:
        """An admission Redis holds past `timeout_ms`, then runs."""
        with stalled(self.server):
            got = await self.slow.admit(ROUTE, BREAKER, [], [], 0.0)
        # the script ran when Redis woke
        assert (got.source, got.why) == ("fallback", "unreachable")
        return got

    async def timed_out_outbound(self) -> Gate:
        """An outbound gate Redis holds past `timeout_ms`, then runs."""
        with stalled(self.server):
            gate, allowed, source, _age = await self.slow.outbound_gate(
                ROUTE, BREAKER, None, None, False, 0.0
            )
        assert (allowed, source) == (True, "fallback")
        assert gate is not None
        return gate

    def timed_out_outbound_sync(self) -> Gate:
        """The same over the blocking client (`FidelitySyncTransport`)."""
        with stalled(self.server):
            gate, allowed, source, _age = self.slow.outbound_gate_sync(
                ROUTE, BREAKER, None, None, False, 0.0
            )
        assert (allowed, source) == (True, "fallback")
        assert gate is not None
        return gate

    def sent(self) -> bool:
        """Nothing left to send late."""
        task = getattr(self.slow, "_late_task", None)
        return not getattr(self.slow, "_late", None) and (task is None or task.done())

    def probes(self) -> int:
        return int(self.pinned.client.zcard(self.probes_key))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.slow.aclose()
        await self.other.aclose()


@pytest.mark.parametrize("outcome", [SUCCESS, FAILURE])
@pytest.mark.parametrize("coalesce", [True, False])
async def test_a_timed_out_probe_reports_its_outcome_once_redis_answers(
    own_redis: RedisServer, pinned: RedisClock, outcome: str, coalesce: bool
) -> None:
    """The timed-out admission took the route's only probe slot in Redis. Its outcome,
    reported once Redis answers again, is the probe's: a success closes the breaker, a
    failure opens it again (as the model says of that probe). Before: the slot stayed
    held by nobody, and every instance was refused `half_open` for the lease (30 s)."""
    fleet = Fleet(own_redis, pinned, coalesce)
    try:
        await fleet.open_breaker()
        got = await fleet.timed_out_admission()
        assert await _until(lambda: fleet.probes() == 1)  # Redis ran it: the slot is taken
        # the request ends; the instance reports as it does for any request
        slow = fleet.slow
        await slow.record(ROUTE, BREAKER, _gate(got), outcome, False, 0.0)
        assert await _until(lambda: up_after_probe(slow))
        # once Redis answers again, the probe's outcome reaches it (in the background)
        await _until(lambda: fleet.probes() == 0 and fleet.sent())
        _as_the_probe_said(_gate(await fleet.other.admit(ROUTE, BREAKER, [], [], 0.0)), outcome)
    finally:
        await fleet.aclose()


def _as_the_probe_said(gate: Gate, outcome: str) -> None:
    if outcome == SUCCESS:  # the probe closed the breaker
        assert (gate.verdict, gate.state) == ("allow", "closed")
    else:  # it opened it again (before: reject, half_open, for probe_lease_s)
        assert (gate.verdict, gate.state) == ("reject", "open")
        assert gate.retry_after_s == pytest.approx(1.0)  # open_s


@pytest.mark.parametrize("outcome", [SUCCESS, FAILURE])
@pytest.mark.parametrize("blocking", [False, True])
async def test_a_timed_out_outbound_probe_reports_its_outcome_once_redis_answers(
    own_redis: RedisServer, pinned: RedisClock, outcome: str, blocking: bool
) -> None:
    """The same for an upstream's breaker: `outbound_gate` (outbound.lua) and its blocking
    twin (`outbound_gate_sync`, whose own client's outage ends at its next call)."""
    fleet = Fleet(own_redis, pinned, True)
    slow = fleet.slow
    try:
        await fleet.open_breaker()
        # its connection up and outbound.lua cached (else NOSCRIPT, after the stall: unrun)
        if blocking:
            assert fleet.warm_sync()[2] == "redis"
            gate = fleet.timed_out_outbound_sync()
        else:
            assert (await fleet.warm_outbound())[2] == "redis"
            gate = await fleet.timed_out_outbound()
        assert await _until(lambda: fleet.probes() == 1)
        if blocking:
            link = slow.sync_link()
            assert not link.up
            assert isinstance(slow._clock, FakeClock)
            slow._clock.advance(10.0)  # past its reconnect pause: its next call asks Redis
            assert fleet.warm_sync("upstream:b")[2] == "redis"
            slow.record_sync(ROUTE, BREAKER, gate, outcome, False, 0.0)
        else:
            await slow.record(ROUTE, BREAKER, gate, outcome, False, 0.0)
            assert await _until(lambda: up_after_probe(slow))
        await _until(lambda: fleet.probes() == 0 and fleet.sent())
        _as_the_probe_said(_gate(await fleet.other.admit(ROUTE, BREAKER, [], [], 0.0)), outcome)
    finally:
        await fleet.aclose()


async def test_a_timed_out_call_that_was_no_probe_changes_nothing(
    own_redis: RedisServer, pinned: RedisClock
) -> None:
    """A closed breaker: the timed-out admission was allowed, no probe. Its failure,
    reported under the probe id it sent, finds no such slot and counts nowhere in Redis
    (a failure counted would open this breaker: one is enough)."""
    fleet = Fleet(own_redis, pinned, True)
    slow = fleet.slow
    try:
        pinned.set(T1)
        assert (await fleet.warm()).source == "redis"
        got = await fleet.timed_out_admission()
        trips = slow.stats.round_trips
        await slow.record(ROUTE, BREAKER, _gate(got), FAILURE, False, 0.0)
        assert await _until(lambda: up_after_probe(slow))
        assert await _until(lambda: fleet.sent())
        assert slow.stats.round_trips > trips  # it was sent
        assert slow.stats.dropped_records == 0
        gate = _gate(await fleet.other.admit(ROUTE, BREAKER, [], [], 0.0))
        assert (gate.verdict, gate.state) == ("allow", "closed")
        assert fleet.probes() == 0
    finally:
        await fleet.aclose()


@pytest.mark.parametrize("outcome", [SUCCESS, FAILURE])
async def test_a_timed_out_tiered_probe_reports_its_outcome_once_redis_answers(
    own_redis: RedisServer, pinned: RedisClock, outcome: str
) -> None:
    """Tiered mode leases half-open probes exactly (its `exact` store's admission): the
    same lost answer, the same late report."""
    fleet = Fleet(own_redis, pinned, True)
    config = StateConfig(
        url="tiered+" + own_redis.url,
        timeout_ms=100,
        connect_timeout_ms=1000,
        sync_interval_ms=60_000,
        **QUIET,
    )
    clock = FakeClock()  # (its cached breaker's open-until is on its own clock)
    store = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    try:
        await fleet.open_breaker()
        pinned.set(T1 + 0.5)
        first = _gate(await store.admit(ROUTE, BREAKER, [], [], clock.monotonic()))
        assert (first.verdict, first.state) == ("reject", "open")  # synced: open
        pinned.set(T1 + 2.0)
        clock.advance(2.0)
        with stalled(own_redis):  # a probe is due: decided exactly
            got = await store.admit(ROUTE, BREAKER, [], [], clock.monotonic())
        assert (got.source, got.why) == ("fallback", "unreachable")
        assert await _until(lambda: fleet.probes() == 1)
        await store.record(ROUTE, BREAKER, _gate(got), outcome, False, clock.monotonic())
        exact = store.exact
        assert await _until(lambda: up_after_probe(exact))
        await _until(lambda: fleet.probes() == 0 and not exact._late)
        _as_the_probe_said(_gate(await fleet.other.admit(ROUTE, BREAKER, [], [], 0.0)), outcome)
    finally:
        await store.aclose()
        await fleet.aclose()


async def test_a_cancelled_outbound_gate_whose_reply_is_lost_gives_its_slot_back(
    own_redis: RedisServer, pinned: RedisClock
) -> None:
    """A raw cancellation while an outbound gate's reply is on its way: the store reads
    the reply all the same and the transport gives back what it took; a second
    cancellation during that read loses it. The probe slot the script took is then
    given back by the id the gate sent (`ignored`: no call was made), once Redis
    answers; the next call probes. Before: refused `half_open` for the lease."""
    fleet = Fleet(own_redis, pinned, True)
    slow = fleet.slow
    try:
        await fleet.open_breaker()
        assert (await fleet.warm_outbound())[2] == "redis"
        with stalled(own_redis):
            task = asyncio.ensure_future(slow.outbound_gate(ROUTE, BREAKER, None, None, False, 0.0))
            await asyncio.sleep(0.05)  # sent, its reply awaited
            task.cancel()
            await asyncio.sleep(0.01)  # reading the reply after the cancellation
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await _until(lambda: fleet.sent() and fleet.probes() == 0)
        gate = _gate(await fleet.other.admit(ROUTE, BREAKER, [], [], 0.0))
        assert (gate.verdict, gate.state) == ("probe", "half_open")
    finally:
        await fleet.aclose()
