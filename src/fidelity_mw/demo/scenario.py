"""The load-balancer-chaos scenario: its knobs, and the fault script of the upstream fleet.

Everything that has a duration is defined for a 27 s run per variant (the
default `--duration 60`) and scaled by `time_scale` for shorter runs, so a
6 s test run plays the same story faster. Rates (requests per second, the
per-client limit) are not scaled: they are what the clients and the limiters
see, whatever the length of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BASE_LOAD_S = 27.0  # load time per variant that the timeline and knobs are written for
INSTANCE_NAMES = ("up-a", "up-b", "up-c")
SLOW_THRESHOLD_S = 0.25  # an instance this much slower than normal is not a healthy path

DEGRADED = "degraded"
ERROR_BURST = "error_burst"
SLOW = "slow"


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted fault: from `start_s` to `end_s` (seconds into the load phase)."""

    kind: str
    start_s: float
    end_s: float
    instances: tuple[int, ...]
    error_rate: float = 0.0  # share of requests answered 503
    added_latency_s: float = 0.0

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "instances": [INSTANCE_NAMES[i] for i in self.instances],
            "error_rate": self.error_rate,
            "added_latency_ms": round(self.added_latency_s * 1000.0, 1),
        }

    def describe(self) -> str:
        who = ", ".join(INSTANCE_NAMES[i] for i in self.instances)
        parts = []
        if self.error_rate:
            parts.append(f"{self.error_rate:.0%} 503s")
        if self.added_latency_s:
            parts.append(f"+{self.added_latency_s * 1000:.0f} ms")
        return f"{self.start_s:5.1f}-{self.end_s:5.1f} s  {self.kind:<11} {who:<16} " + " ".join(
            parts
        )


@dataclass(frozen=True, slots=True)
class InstanceState:
    error_rate: float
    added_latency_s: float

    @property
    def healthy(self) -> bool:
        return self.error_rate == 0.0 and self.added_latency_s < SLOW_THRESHOLD_S


class FaultScript:
    """What every instance does at every moment, and whether a healthy path exists."""

    def __init__(self, faults: tuple[Fault, ...], instances: int = len(INSTANCE_NAMES)) -> None:
        self.faults = faults
        self.instances = instances

    def state(self, instance: int, t: float) -> InstanceState:
        error_rate = 0.0
        latency = 0.0
        for fault in self.faults:
            if instance in fault.instances and fault.active(t):
                error_rate = max(error_rate, fault.error_rate)
                latency += fault.added_latency_s
        return InstanceState(error_rate, latency)

    def healthy_instances(self, t: float) -> int:
        return sum(1 for i in range(self.instances) if self.state(i, t).healthy)

    def healthy_path(self, t: float) -> bool:
        """At least one instance answers correctly at normal speed at time `t`."""
        return self.healthy_instances(t) > 0

    def label(self, t: float) -> str:
        active = [f for f in self.faults if f.active(t)]
        if not active:
            return "all healthy"
        return ", ".join(
            f"{f.kind} {'+'.join(INSTANCE_NAMES[i] for i in f.instances)}" for f in active
        )

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self.faults]


@dataclass(frozen=True, slots=True)
class ScenarioConfig:
    """Every knob of the run. Derived values (scaled durations) are properties."""

    seed: int = 1
    duration_s: float = 60.0  # each variant gets 45 % of it as load, all variants at once
    clients: int = 20
    client_rate_min: float = 1.0  # each client's base rate is drawn from [min, max] req/s
    client_rate_max: float = 2.0
    client_attempts: int = 4  # a typical client: 1 try + 3 retries on 429/503/timeouts
    client_attempt_timeout_s: float = 2.0
    limit_count: int = 5  # per client, per second: both variants
    limit_period_s: float = 1.0
    redis_url: str | None = None

    # ------------------------------------------------------------ time

    @property
    def load_s(self) -> float:
        """Seconds of client load per variant."""
        return max(2.0, self.duration_s * 0.45)

    @property
    def time_scale(self) -> float:
        return self.load_s / BASE_LOAD_S

    def scaled(self, seconds: float, floor: float = 0.0) -> float:
        return max(floor, seconds * self.time_scale)

    # ------------------------------------------------------------ faults

    def fault_script(self) -> FaultScript:
        t = self.load_s
        k = self.time_scale
        return FaultScript(
            (
                Fault(DEGRADED, 0.15 * t, 0.60 * t, (0,), error_rate=0.6, added_latency_s=0.04 * k),
                # ~2 s (never shorter than 1 s: short runs would see no storm at all),
                # starting a little after a refresh of the scattered breaker's snapshot
                Fault(ERROR_BURST, 0.40 * t, 0.40 * t + max(1.0, 0.075 * t), (0, 1, 2), 1.0),
                Fault(SLOW, 0.68 * t, 0.80 * t, (2,), added_latency_s=max(0.3, 0.6 * k)),
            )
        )

    # ------------------------------------------------------------ shared control knobs

    @property
    def breaker_window_s(self) -> float:
        return self.scaled(5.0, 0.5)

    @property
    def breaker_open_s(self) -> float:
        return self.scaled(5.0, 0.25)

    @property
    def breaker_min_calls(self) -> int:
        return max(5, round(20 * self.time_scale))

    @property
    def retry_base_s(self) -> float:
        return self.scaled(0.1, 0.01)

    @property
    def retry_max_s(self) -> float:
        return self.scaled(2.0, 0.2)

    # ------------------------------------------------------------ scattered-only knobs

    @property
    def sidecar_backoff_s(self) -> float:
        """httpx-retries' first backoff: 25 ms, Envoy's default retry base interval."""
        return self.scaled(0.025, 0.005)

    @property
    def snapshot_interval_s(self) -> float:
        """How often the scattered breaker's metrics snapshot is refreshed: 5 s (Envoy's
        outlier detection evaluates every 10 s by default; Prometheus scrapes every 15 s)."""
        return self.scaled(5.0, 0.3)

    # ------------------------------------------------------------ clients

    @property
    def client_retry_after_cap_s(self) -> float:
        return self.scaled(2.0, 0.3)

    @property
    def client_backoff_base_s(self) -> float:
        return self.scaled(0.25, 0.03)

    @property
    def client_total_timeout_s(self) -> float:
        """A client abandons a request (all its retries) after this long."""
        return self.scaled(8.0, 1.5)

    @property
    def rate(self) -> str:
        period = self.limit_period_s
        unit = "s" if period == 1.0 else f"{math.ceil(period)}s"
        return f"{self.limit_count}/{unit}"

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "load_s_per_variant": round(self.load_s, 3),
            "time_scale": round(self.time_scale, 4),
            "clients": self.clients,
            "client_rate_per_s": [self.client_rate_min, self.client_rate_max],
            "client_attempts": self.client_attempts,
            "client_attempt_timeout_s": self.client_attempt_timeout_s,
            "client_retry_after_cap_s": round(self.client_retry_after_cap_s, 3),
            "client_backoff_base_s": round(self.client_backoff_base_s, 3),
            "client_total_timeout_s": round(self.client_total_timeout_s, 3),
            "rate_limit_per_client": f"{self.limit_count} per {self.limit_period_s:g} s",
            "breaker": {
                "failure_ratio": 0.5,
                "min_calls": self.breaker_min_calls,
                "window_s": round(self.breaker_window_s, 3),
                "open_s": round(self.breaker_open_s, 3),
            },
            "retry": {
                "attempts": 3,
                "base_s": round(self.retry_base_s, 4),
                "max_s": round(self.retry_max_s, 3),
            },
            "scattered_snapshot_interval_s": round(self.snapshot_interval_s, 3),
            "instances": list(INSTANCE_NAMES),
            "redis_url": self.redis_url,
        }
