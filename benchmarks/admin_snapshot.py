"""What the live state page and the breaker gauge cost the event loop, by store size.

A memory store holds N upstream breakers (a webhook sender's hosts: almost all closed,
1% open), N retry budgets and N rate-limit keys. Measured, each the median of a few
runs:

  state.json     CPU time the event loop's thread spent in one `AdminApp.state` (the
                 store's snapshot and the page's JSON), and all threads' (a worker
                 thread's too)
  loop stalled   the longest the event loop ran nothing else meanwhile (a task that
                 wakes every millisecond sees the gap; on a busy machine it includes
                 time the process was not scheduled)
  lock held      the longest the store's lock was held at once (threads that decide on
                 the store wait that long)
  gauge          CPU time of one collection of the breaker gauge
                 (`fidelity.breaker.state`), as a Prometheus scrape runs it

    .venv/bin/python benchmarks/admin_snapshot.py [--sizes 1000,10000,100000] [--no-write]

To measure another revision, run it with that revision's `src` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import stamp, write_section
from fidelity_mw import Engine, Policy
from fidelity_mw.admin import AdminApp
from fidelity_mw.decide.specs import BreakerParams, BudgetParams
from fidelity_mw.policy import BreakerConfig, RetryConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.telemetry.observer import BreakerWatch
from fidelity_mw.testing import FakeClock


class TimedLock:
    """The store's lock, timing each hold (the longest is kept)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.longest = 0.0
        self._since = 0.0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        self._since = time.perf_counter()
        return got

    def release(self) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._since)
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()


def build(n: int) -> tuple[Engine, MemoryStore, TimedLock]:
    store = MemoryStore(max_keys=max(100_000, 2 * n), max_breakers=max(10_000, 2 * n))
    breaker: BreakerParams = BreakerConfig(min_calls=5, window_s=30.0)
    budget: BudgetParams = RetryConfig()
    spec = LimitSpec("per-client", 1.0, 10.0, 1, False)
    now = 1000.0
    for i in range(n):
        key = f"upstream:host-{i}.example"
        gate = store.gate_now(key, breaker, now)
        outcome = "failure" if i % 100 == 0 else "success"
        for _ in range(5):
            store.record_now(key, breaker, gate, outcome, False, now)
        store.budget_request_now(f"budget:host-{i}.example", budget, now)
        if i % 50 == 0:
            store.budget_try_retry_now(f"budget:host-{i}.example", budget, now)
        client = f"per-client|10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        store.admit_now(None, None, [client], [spec], now)
    lock = TimedLock()
    store._lock = lock  # type: ignore[assignment]
    store._acquire = lock.acquire
    store._release = lock.release
    engine = Engine(Policy(), store=store, clock=FakeClock(now + 1.0))
    return engine, store, lock


def measure(n: int, runs: int) -> dict[str, float]:
    engine, _store, lock = build(n)
    admin = AdminApp(engine)
    watch = BreakerWatch()
    watch.engines.add(engine)
    page: list[float] = []
    held: list[float] = []
    gauge: list[float] = []
    doc: dict[str, Any] = {}
    stall: list[float] = []
    total: list[float] = []
    for _ in range(runs):
        lock.longest = 0.0
        started, started_all = time.thread_time(), time.process_time()
        doc, gap = asyncio.run(_watched(admin.state(engine)))
        page.append(time.thread_time() - started)
        total.append(time.process_time() - started_all)
        held.append(lock.longest)
        stall.append(gap)
        started = time.thread_time()
        watch.breaker_observations()
        gauge.append(time.thread_time() - started)
    assert doc["store"]["breaker_count"] == n, doc["store"]["breaker_count"]
    assert doc["breakers"][0]["state"] == "open"
    return {
        "page_ms": statistics.median(page) * 1000,
        "total_ms": statistics.median(total) * 1000,
        "stall_ms": statistics.median(stall) * 1000,
        "lock_ms": statistics.median(held) * 1000,
        "gauge_ms": statistics.median(gauge) * 1000,
    }


async def _watched(work: Any) -> tuple[Any, float]:
    """Run `work` beside a task that wakes every millisecond: the longest gap between
    its wake-ups is the longest the event loop could not run anything else."""
    done = False
    longest = 0.0

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.005)
    longest = 0.0
    result = await work
    done = True
    await ticker
    return result, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    lines = [
        "| breakers, budgets, keys | state.json: loop's CPU | all threads' CPU "
        "| loop stalled (longest) | lock held (longest) | breaker gauge (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for n in (int(s) for s in args.sizes.split(",")):
        got = measure(n, args.runs)
        line = (
            f"| {n:,} | {got['page_ms']:.1f} ms | {got['total_ms']:.1f} ms "
            f"| {got['stall_ms']:.1f} ms "
            f"| {got['lock_ms']:.2f} ms | {got['gauge_ms']:.1f} ms |"
        )
        print(line, flush=True)
        lines.append(line)
    body = (
        f"{stamp()}\n\nOne memory store, 1% of its breakers open; medians of "
        f"{args.runs} runs (`benchmarks/admin_snapshot.py`).\n\n" + "\n".join(lines)
    )
    if not args.no_write:
        write_section("Admin page and breaker gauge by store size", body)


if __name__ == "__main__":
    main()
