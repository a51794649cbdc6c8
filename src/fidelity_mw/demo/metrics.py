"""The numbers of the report, computed from the records (docs/demo.md defines each one)."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .records import CONTROL_LAYERS, ClientRequest, DemoDecision, FrontRecord

# Tolerance when counting a client's admitted requests in the window before a 429:
# the limiter's clock and the recorder's differ by the time between the two reads.
_WINDOW_SLACK_S = 0.05
SAMPLE_REQUESTS = 3


@dataclass(slots=True)
class VariantResult:
    """Everything measured for one variant."""

    name: str
    label: str
    client_requests: list[ClientRequest]
    front: list[FrontRecord]
    upstream_calls: int
    upstream_by_instance: dict[str, int]
    upstream_statuses: dict[str, int]
    upstream_per_tick: dict[int, int]  # upstream calls per 0.1 s of the run
    wall_s: float
    limit_count: int
    limit_period_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ client side

    @property
    def requests(self) -> int:
        return len(self.client_requests)

    @property
    def succeeded(self) -> int:
        return sum(1 for r in self.client_requests if r.success)

    @property
    def healthy_requests(self) -> int:
        return sum(1 for r in self.client_requests if r.healthy_path)

    @property
    def healthy_succeeded(self) -> int:
        return sum(1 for r in self.client_requests if r.healthy_path and r.success)

    @property
    def fidelity(self) -> float:
        """Share of the requests that had a healthy path and succeeded."""
        healthy = self.healthy_requests
        return self.healthy_succeeded / healthy if healthy else 0.0

    def latency_ms(self, q: float, succeeded_only: bool = False) -> float:
        values = sorted(
            r.latency_s * 1000.0
            for r in self.client_requests
            if r.finished and (r.success or not succeeded_only)
        )
        return _quantile(values, q)

    # ------------------------------------------------------------ front side

    @property
    def front_requests(self) -> int:
        return len(self.front)

    def control_failures_while_healthy(self) -> Counter[str]:
        """Front responses produced by a control layer while a healthy path existed."""
        return Counter(
            r.failed_by
            for r in self.front
            if r.healthy_path and r.failed_by in CONTROL_LAYERS and r.status != 200
        )

    def undeserved_429s(self) -> tuple[int, int, int]:
        """(undeserved 429s, clients that got one, all 429s).

        A 429 at time t to client c is undeserved when c's admitted requests
        (front requests that passed every control layer) in (t - period, t]
        number fewer than the limit: admitting this one would have kept the
        client's admitted traffic within its limit.
        """
        by_client: dict[str, list[FrontRecord]] = defaultdict(list)
        for r in self.front:
            by_client[r.client].append(r)
        undeserved = 0
        throttled: set[str] = set()
        total = 0
        period = self.limit_period_s + _WINDOW_SLACK_S
        for client, records in by_client.items():
            records.sort(key=lambda r: r.start)
            window: deque[float] = deque()
            for r in records:
                while window and window[0] <= r.start - period:
                    window.popleft()
                if r.status == 429:
                    total += 1
                    if len(window) < self.limit_count:
                        undeserved += 1
                        throttled.add(client)
                elif r.admitted:
                    window.append(r.start)
        return undeserved, len(throttled), total

    @property
    def amplification(self) -> float:
        """Upstream calls counted at the upstream servers per client request."""
        return self.upstream_calls / self.requests if self.requests else 0.0

    # ------------------------------------------------------------ decisions

    def decisions(self) -> list[DemoDecision]:
        return [d for r in self.front for d in r.decisions]

    def decisions_by_layer(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = defaultdict(Counter)
        for d in self.decisions():
            out[d.layer][d.verdict] += 1
        return {layer: dict(sorted(c.items())) for layer, c in sorted(out.items())}

    def staleness(self) -> tuple[float, float | None, int, int]:
        """(share of decisions taken on stale data, median age of those in s, stale, all)."""
        decisions = self.decisions()
        stale = [d.age_s for d in decisions if d.stale]
        share = len(stale) / len(decisions) if decisions else 0.0
        median = statistics.median(stale) if stale else None
        return share, median, len(stale), len(decisions)

    def stale_by_layer(self) -> dict[str, int]:
        return dict(Counter(d.layer for d in self.decisions() if d.stale))

    # ------------------------------------------------------------ export

    def time_series(self, bin_s: float) -> dict[str, list[float]]:
        """For the plot: client requests, their success ratio and upstream calls per second,
        in bins of `bin_s` (a multiple of 0.1 s) by the time the client issued the request."""
        ticks = max(1, round(bin_s * 10))
        width = ticks / 10
        last = max((r.issued_at for r in self.client_requests), default=0.0)
        bins = int(last / width) + 1
        issued = [0] * bins
        ok = [0] * bins
        for r in self.client_requests:
            b = min(bins - 1, int(r.issued_at / width))
            issued[b] += 1
            ok[b] += r.success
        calls = [0] * bins
        for tick, n in self.upstream_per_tick.items():
            b = tick // ticks
            if 0 <= b < bins:
                calls[b] += n
        return {
            "bin_s": [width],
            "t_s": [round(b * width, 3) for b in range(bins)],
            "client_requests_per_s": [v / width for v in issued],
            "success_ratio": [o / i if i else 1.0 for o, i in zip(ok, issued, strict=True)],
            "upstream_calls_per_s": [v / width for v in calls],
        }

    def sample_requests(self, limit: int = 8) -> list[FrontRecord]:
        """The first few front requests, then the first one per kind of intervention:
        each layer's first non-allow verdict, in order of appearance."""
        chosen: list[FrontRecord] = list(self.front[:SAMPLE_REQUESTS])
        seen: set[tuple[str, str]] = set()
        for r in self.front:
            if len(chosen) >= limit:
                break
            kinds = {(d.layer, d.verdict) for d in r.decisions if d.verdict != "allow"}
            if kinds - seen:
                seen |= kinds
                if r not in chosen:
                    chosen.append(r)
        return sorted(chosen, key=lambda r: r.seq)

    def to_json(self) -> dict[str, Any]:
        undeserved, throttled, total_429 = self.undeserved_429s()
        share, median, stale, decisions = self.staleness()
        control = self.control_failures_while_healthy()
        front_statuses = Counter(r.status for r in self.front)
        return {
            "label": self.label,
            "client_requests": self.requests,
            "client_requests_succeeded": self.succeeded,
            "client_requests_with_healthy_path": self.healthy_requests,
            "healthy_path_requests_succeeded": self.healthy_succeeded,
            "fidelity": round(self.fidelity, 4),
            "success_ratio": round(self.succeeded / self.requests, 4) if self.requests else 0.0,
            "front_requests": self.front_requests,
            "front_statuses": {str(k): v for k, v in sorted(front_statuses.items())},
            "control_failures_while_healthy": sum(control.values()),
            "control_failures_while_healthy_by_layer": dict(sorted(control.items())),
            "undeserved_429s": undeserved,
            "clients_throttled_undeserved": throttled,
            "responses_429": total_429,
            "upstream_calls": self.upstream_calls,
            "upstream_calls_by_instance": self.upstream_by_instance,
            "upstream_statuses": self.upstream_statuses,
            "retry_amplification": round(self.amplification, 4),
            "upstream_calls_per_front_request": round(self.upstream_calls / self.front_requests, 4)
            if self.front_requests
            else 0.0,
            "latency_p50_ms": round(self.latency_ms(0.50), 2),
            "latency_p99_ms": round(self.latency_ms(0.99), 2),
            "latency_succeeded_p50_ms": round(self.latency_ms(0.50, True), 2),
            "latency_succeeded_p99_ms": round(self.latency_ms(0.99, True), 2),
            "decisions_total": decisions,
            "decisions_by_layer": self.decisions_by_layer(),
            "stale_decisions": stale,
            "stale_decision_share": round(share, 4),
            "stale_median_age_s": round(median, 4) if median is not None else None,
            "stale_decisions_by_layer": self.stale_by_layer(),
            "wall_s": round(self.wall_s, 3),
            "per_second": self.time_series(1.0),
            "sample_requests": [
                {
                    "seq": r.seq,
                    "client": r.client,
                    "start_s": round(r.start, 4),
                    "status": r.status,
                    "failed_by": r.failed_by,
                    "upstream_calls": r.upstream_calls,
                    "decisions": [d.to_json() for d in r.decisions],
                }
                for r in self.sample_requests()
            ],
            **self.extra,
        }


def _quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values (0.0 when empty)."""
    if not values:
        return 0.0
    rank = max(1, min(len(values), math.ceil(q * len(values))))
    return values[rank - 1]
