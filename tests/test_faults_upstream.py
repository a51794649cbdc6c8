"""Upstream faults under load, through a real service (uvicorn, middleware, transport).

The upstream is a raw asyncio HTTP server on loopback that hangs, resets
connections (RST after reading the request), refuses connections (listening
socket closed) or answers 503, switched while a bounded load runs. The
service maps every upstream error to 502/503/504, so for every request:

- the load client gets exactly one response (no connection error, no hang);
- no 500 (it could only come from the middleware);
- no POST reaches the upstream twice (counted there, per request id), and no
  GET more than `attempts` times;
- afterwards the breakers recover (fake clock moved past open_s), and no task
  (on the service's event loop) or file descriptor (process-wide) is left.

Attempt timeouts are real and tiny (100 ms); backoff and open periods run on
a FakeClock, so nothing waits out a window.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fidelity_mw import BreakerConfig, DeadlineConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.decide.breaker import CLOSED, FAILURE
from fidelity_mw.testing import FakeClock, seeded_random
from test_faults_support import (
    HANG,
    OK,
    RESET,
    UNAVAILABLE,
    FrontApp,
    RawUpstream,
    Recorder,
    ServerThread,
    fd_count,
    fd_targets,
    load,
    wait_until,
)

pytestmark = pytest.mark.slow

ATTEMPTS = 3
ALLOWED = {200, 502, 503, 504}


def front_policy() -> Policy:
    return Policy(
        deadline=DeadlineConfig(default_ms=5_000),
        breaker=BreakerConfig(min_calls=20, failure_ratio=0.5, open_s=5.0, open_jitter=0.0),
        upstreams=(
            UpstreamConfig(
                host="127.0.0.1",
                retry=RetryConfig(attempts=ATTEMPTS, base_ms=1, max_ms=5, budget_min_per_s=100.0),
                breaker=BreakerConfig(
                    min_calls=5, failure_ratio=0.5, open_s=5.0, open_jitter=0.0, half_open_probes=1
                ),
                attempt_timeout_ms=100,
            ),
        ),
    )


class Rig:
    """Upstream + front service + load client, with the leak baselines taken first."""

    def __init__(self, mode: str) -> None:
        self.fds_before = fd_count()
        self.fd_targets_before = fd_targets()
        self.upstream = RawUpstream(mode)
        self.clock = FakeClock()
        self.recorder = Recorder()
        self.front = FrontApp(
            self.upstream.url,
            front_policy(),
            clock=self.clock,
            rng=seeded_random(5),
            observer=self.recorder,
        )
        self.server = ServerThread(self.front.asgi).__enter__()
        self.idle_tasks = self.server.task_count()

    def run_load(self, requests: list[tuple[str, str, str]], concurrency: int = 8) -> list:
        async def go() -> list:
            async with httpx.AsyncClient(base_url=self.server.url, timeout=10.0) as client:
                return await load(client, requests, concurrency)

        return asyncio.run(go())

    def upstream_breaker(self) -> Any:
        store = self.front.asgi.engine.store
        return store.breakers.get(f"upstream:127.0.0.1:{self.upstream.port}")  # type: ignore[attr-defined]

    def breaker_states(self) -> dict[str, tuple[str, float, int]]:
        """Every breaker's state, open-until and probes held (for failure messages)."""
        store = self.front.asgi.engine.store
        return {
            key: (b.state, b.open_until, len(b.probes))
            for key, b in store.breakers.items()  # type: ignore[attr-defined]
        }

    def recover(self) -> dict[str, Any]:
        """Upstream healthy again: move the fake clock past open_s and past the
        breakers' windows, and count the requests (and real time) until one is
        served and both breakers are closed.

        Past the window too: a probe may have closed a breaker during the fault and
        the fault's next failures, fewer than `min_calls`, still be in its window;
        the ratio is checked on every outcome, a success too, so the first healthy
        calls would bring it to `min_calls` and open it again, as the policy says.
        """
        self.upstream.mode = OK
        self.upstream.unhang()
        started = time.monotonic()
        policy = self.front.asgi.engine.policy
        breakers = [policy.breaker, *(u.breaker for u in policy.upstreams)]
        self.clock.advance(max(max(b.open_s, b.window_s) for b in breakers if b) + 1.0)
        tries = 0
        statuses = []
        deciders: list[str | None] = []
        with httpx.Client(base_url=self.server.url, timeout=10.0) as client:
            for tries in range(1, 21):
                r = client.get("/proxy/item", headers={"x-req-id": f"recover-{tries}"})
                statuses.append(r.status_code)
                # (who refused, for the failure message: a rare run has ended in 503s)
                deciders.append(r.headers.get("x-fidelity-decided-by"))
                if r.status_code == 200:
                    break
            took = time.monotonic() - started
            after = [client.get("/proxy/item").status_code for _ in range(5)]
        breaker = self.upstream_breaker()
        assert statuses[-1] == 200, (statuses, deciders, self.breaker_states())
        assert after == [200] * 5
        assert breaker is None or breaker.state == CLOSED
        return {"requests_to_recover": tries, "recovery_real_s": round(took, 3)}

    def close(self) -> None:
        self.server.call(self.front.aclose())
        # every connection the load opened is closed: the loop is back to idle
        assert wait_until(lambda: self.server.task_count() <= self.idle_tasks), (
            self.server.task_count(),
            self.idle_tasks,
        )
        self.server.__exit__(None, None, None)
        self.upstream.close()

        def closed() -> bool:
            # (a socket only a garbage cycle still holds closes at the next collection,
            # which a busy machine runs later: not a connection the load left open. Seen
            # once beside three CPU burners, 16 fds against 15, never in 11 reruns.)
            gc.collect()
            return fd_count() <= self.fds_before

        assert wait_until(closed), (
            fd_count(),
            self.fds_before,
            {fd: t for fd, t in fd_targets().items() if self.fd_targets_before.get(fd) != t},
        )


@pytest.fixture
def rig_factory() -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(mode: str) -> Rig:
        rig = Rig(mode)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def mixed(n_get: int, n_post: int, tag: str) -> list[tuple[str, str, str]]:
    reqs = [("GET", "/proxy/item", f"{tag}-g{i}") for i in range(n_get)]
    reqs += [("POST", "/pay", f"{tag}-p{i}") for i in range(n_post)]
    # interleave
    out: list[tuple[str, str, str]] = []
    while reqs:
        out.append(reqs.pop(0))
        if reqs:
            out.append(reqs.pop())
    return out


def check_invariants(rig: Rig, results: list, expected: int) -> dict[str, int]:
    assert len(results) == expected
    statuses: dict[str, int] = {}
    for _, status in results:
        assert isinstance(status, int), f"no response: {status}"  # exactly one response each
        assert status != 500
        assert status in ALLOWED, status
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    assert rig.upstream.max_per_id("POST") <= 1, "a POST reached the upstream twice"
    assert rig.upstream.max_per_id("GET") <= ATTEMPTS
    return statuses


def test_hanging_upstream(rig_factory: Any, record_property: Any) -> None:
    rig = rig_factory(HANG)
    requests = mixed(16, 8, "hang")
    results = rig.run_load(requests)
    statuses = check_invariants(rig, results, len(requests))
    assert set(statuses) <= {"502", "503"}
    # the host breaker opened: later calls failed fast instead of hanging
    assert rig.front.errors["circuit_open"] > 0
    assert rig.upstream.count("GET /item") < 16 * ATTEMPTS
    recovery = rig.recover()
    record_property("hang", {**statuses, **recovery})
    print("\nhang:", statuses, recovery)


def test_resetting_upstream(rig_factory: Any, record_property: Any) -> None:
    rig = rig_factory(RESET)
    requests = mixed(16, 8, "reset")
    results = rig.run_load(requests)
    statuses = check_invariants(rig, results, len(requests))
    assert set(statuses) <= {"502", "503"}
    assert rig.front.errors["circuit_open"] > 0
    recovery = rig.recover()
    record_property("reset", {**statuses, **recovery})
    print("\nreset:", statuses, recovery)


def test_recovery_outlasts_failures_left_in_a_closed_breakers_window(rig_factory: Any) -> None:
    """The flapping test's rare failure, made deterministic: a probe closed the host
    breaker during the fault, then 3 failures (fewer than min_calls = 5) landed in its
    window. Two healthy calls bring it to 5 calls with 60 % failures: it opens again,
    on a success. Recovery therefore waits out the window, not just open_s."""
    rig = rig_factory(OK)
    engine = rig.front.asgi.engine
    breaker = engine.policy.upstreams[0].breaker
    assert breaker is not None
    now = rig.clock.monotonic()
    state = engine.store.breaker_state(f"upstream:127.0.0.1:{rig.upstream.port}", breaker, now)  # type: ignore[attr-defined]
    for _ in range(3):
        state.record(state.epoch, 0, FAILURE, now, seeded_random(0))
    assert state.state == CLOSED
    rig.recover()


def test_flapping_upstream(rig_factory: Any, record_property: Any) -> None:
    """Refusing connections, resetting, 503, hanging, each followed by a healthy
    phase, switching every 40 ms under load (3 s of fake time per switch)."""
    rig = rig_factory(OK)
    up = rig.upstream
    stop = threading.Event()
    flips = 0

    def flap() -> None:
        nonlocal flips
        cycle = ["down", OK, RESET, OK, UNAVAILABLE, OK, HANG, OK]
        while not stop.is_set():
            step = cycle[flips % len(cycle)]
            if step == "down":
                up.down()
            else:
                up.unhang()  # let go of the previous hang phase's requests
                up.up()
                up.mode = step
            flips += 1
            rig.clock.advance(3.0)  # time passes: open breakers go half-open
            stop.wait(0.04)

    flapper = threading.Thread(target=flap, daemon=True)
    flapper.start()
    try:
        requests = mixed(800, 400, "flap")
        results = rig.run_load(requests, concurrency=4)
    finally:
        stop.set()
        flapper.join(timeout=5)
    up.up()
    statuses = check_invariants(rig, results, len(requests))
    assert flips >= 3
    assert statuses.get("200", 0) > 0, "never served between the flaps: breakers never recovered"
    recovery = rig.recover()
    record_property("flap", {**statuses, "flips": flips, **recovery})
    print("\nflap:", statuses, "flips", flips, recovery)
