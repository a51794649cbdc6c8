"""Run the scenario: every variant at once, each on a fresh fleet, same seed, one clock.

The variants run side by side in one event loop and start their load at the same
instant, so whatever else the machine does (a CPU burner, another test suite) falls
on every variant at the same offsets into the load. Run one after the other, a load
that began while the second ran (seed 1 beside three CPU burners: scattered 0.817,
fidelity 0.000, with one control failure among fidelity's healthy requests) failed
the second variant's clients before any layer of either was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ..hooks import RequestObserver
from .clients import Population
from .fronts import fidelity_front, scattered_front
from .metrics import VariantResult
from .records import Recorder, RunClock
from .scenario import FaultScript, ScenarioConfig
from .servers import Fleet, RunningServer

SCATTERED = "scattered"
TOOLKIT = "toolkit"
FIDELITY = "fidelity"
LABELS = {SCATTERED: "scattered layers", TOOLKIT: "toolkit (nopanic)", FIDELITY: "fidelity_mw"}
VARIANTS = (SCATTERED, TOOLKIT, FIDELITY)  # every variant, in the order they run and show
DEFAULT_VARIANTS = (SCATTERED, FIDELITY)
_PROGRESS_EVERY_S = 0.25


class Progress:
    """A single updating status line on stderr (plain lines when it is not a terminal)."""

    def __init__(self, stream: TextIO | None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0
        self._parts: dict[str, str] = {}

    def part(self, key: str, head: str, text: str, tail: str) -> None:
        """One variant's part of the status line (variants run at once: one line for all,
        the shared clock's time and faults said once)."""
        self._parts[key] = text
        order = sorted(self._parts, key=lambda k: VARIANTS.index(k) if k in VARIANTS else 99)
        self.update(f"{head} {' | '.join(self._parts[k] for k in order)} | {tail}")

    def update(self, text: str) -> None:
        if not self.enabled or not self.tty:
            return
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


async def _ticker(
    progress: Progress,
    name: str,
    cfg: ScenarioConfig,
    clock: RunClock,
    script: FaultScript,
    recorder: Recorder,
    population: Population,
    fleet: Fleet,
) -> None:
    while True:
        await asyncio.sleep(_PROGRESS_EVERY_S)
        t = clock.now()
        front = recorder.records
        ok = sum(1 for r in front if r.status == 200)
        r429 = sum(1 for r in front if r.status == 429)
        r5xx = sum(1 for r in front if r.status >= 500)
        progress.part(
            name,
            f"[{min(t, cfg.load_s):4.1f}/{cfg.load_s:.0f} s] req {len(population.requests):4d}",
            f"{name}: ok {ok:4d} 429 {r429:3d} 5xx {r5xx:3d} calls {fleet.calls:5d}",
            script.label(t),
        )


async def run_variant(
    name: str,
    cfg: ScenarioConfig,
    progress: Progress,
    telemetry_observer: RequestObserver | None = None,
    clock: RunClock | None = None,
    ready: asyncio.Barrier | None = None,
    origin: float | None = None,
) -> VariantResult:
    """Start a fresh fleet and front, drive the client population, tear everything down.

    With `ready` (the other variants' too), the load starts once every variant is set up,
    on `clock`, which the first of them through the barrier starts for all."""
    clock = clock if clock is not None else RunClock()
    script = cfg.fault_script()
    fleet = Fleet(script, clock, cfg.seed)
    try:
        await fleet.start()
    except BaseException:
        if ready is not None:
            await ready.abort()  # the others would wait for this one for ever
        raise
    names = [i.name for i in fleet.instances]
    closers: list[Callable[[], Any]] = []
    front_server: RunningServer | None = None
    extra: dict[str, Any] = {}
    started = time.monotonic()
    origin = started if origin is None else origin
    passed = False
    try:
        if name == SCATTERED:
            recorder, scattered = scattered_front(
                cfg, fleet.urls, names, clock, script.healthy_path
            )
            closers.append(scattered.aclose)
            breaker = scattered.breaker
        elif name == TOOLKIT:
            from .toolkit import toolkit_front  # nopanic: needed only when this variant runs

            recorder, toolkit = toolkit_front(cfg, fleet.urls, names, clock, script.healthy_path)
            closers.append(toolkit.aclose)
        else:
            recorder, fidelity, engine = fidelity_front(
                cfg, fleet.urls, names, clock, script.healthy_path, telemetry_observer
            )
            closers.append(fidelity.aclose)
            closers.append(engine.aclose)
            extra["policy_version"] = engine.policy.version
            extra["state_url"] = engine.policy.state.url
        front_server = RunningServer(recorder, f"front-{name}")
        await front_server.start()
        population = Population(cfg, front_server.url, clock, script)
        progress.line(
            f"{LABELS[name]}: fleet {', '.join(fleet.urls)}; front {front_server.url}; "
            f"{len(population.arrivals)} client requests over {cfg.load_s:.1f} s"
        )
        if ready is not None:
            await ready.wait()
        passed = True
        clock.start_once()
        if name == SCATTERED:
            breaker.start()
        ticker = asyncio.create_task(
            _ticker(progress, name, cfg, clock, script, recorder, population, fleet)
        )
        try:
            await population.run()
        finally:
            # when this variant's load ran, in seconds since the scenario began
            extra["load_window_s"] = [
                round(clock.t0 - origin, 3),
                round(time.monotonic() - origin, 3),
            ]
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if name == SCATTERED:
            extra["breaker_openings"] = breaker.openings
            extra["breaker_events"] = breaker.events
        elif name == TOOLKIT:
            extra["nopanic_events"] = toolkit.log.events
            extra["breaker_events"] = toolkit.log.transitions
    finally:
        if ready is not None and not passed:
            await ready.abort()
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
        if front_server is not None:
            await front_server.stop()
        await fleet.stop()
    wall = time.monotonic() - started
    per_tick: dict[int, int] = {}
    for inst in fleet.instances:
        for tick, n in inst.per_tick.items():
            per_tick[tick] = per_tick.get(tick, 0) + n
    statuses: dict[str, int] = {}
    for inst in fleet.instances:
        for status, n in inst.statuses.items():
            statuses[str(status)] = statuses.get(str(status), 0) + n
    result = VariantResult(
        name=name,
        label=LABELS[name],
        client_requests=population.requests,
        front=sorted(recorder.records, key=lambda r: r.seq),
        upstream_calls=fleet.calls,
        upstream_by_instance={i.name: i.calls for i in fleet.instances},
        upstream_statuses=dict(sorted(statuses.items())),
        upstream_per_tick=dict(sorted(per_tick.items())),
        wall_s=wall,
        limit_count=cfg.limit_count,
        limit_period_s=cfg.limit_period_s,
        extra=extra,
    )
    progress.line(
        f"{LABELS[name]}: done in {wall:.1f} s: {result.requests} client requests, "
        f"{result.front_requests} front requests, {result.upstream_calls} upstream calls"
    )
    return result


async def run_scenario(
    cfg: ScenarioConfig,
    progress: Progress | None = None,
    telemetry_observer: RequestObserver | None = None,
    variants: Sequence[str] = DEFAULT_VARIANTS,
) -> dict[str, VariantResult]:
    """The selected variants (by default scattered and fidelity), each on its own fresh
    fleet, all at once on one clock; the results in the order of `VARIANTS`."""
    progress = progress or Progress(None, enabled=False)
    names = [v for v in VARIANTS if v in variants]
    origin = time.monotonic()
    clock = RunClock()
    ready = asyncio.Barrier(len(names))
    runs = [
        run_variant(name, cfg, progress, telemetry_observer, clock, ready, origin) for name in names
    ]
    done = await asyncio.gather(*runs, return_exceptions=True)
    for outcome in done:  # the first failure, not the barrier it broke for the others
        if isinstance(outcome, BaseException) and not isinstance(
            outcome, asyncio.BrokenBarrierError
        ):
            raise outcome
    results: dict[str, VariantResult] = {}
    for name, outcome in zip(names, done, strict=True):
        if isinstance(outcome, BaseException):
            raise outcome
        results[name] = outcome
    return results
