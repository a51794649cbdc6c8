"""Process-memory state: the embedded default, a `StateStore` over `LocalState`.

Every decision is made synchronously under one lock (see `state/local.py` for
the bounds), so the store offers the in-process fast path: `admit_now`,
`record_now` and the other `*_now` twins, which adapters call directly instead
of awaiting the coroutines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..decide.breaker import CLOSED, Gate, known_open_s
from ..decide.fleet import FleetShare
from ..policy import BreakerConfig, RetryConfig
from .base import InboundResult, LimitSpec, StateStore
from .local import GcraTable, LocalState
from .snapshot import SnapshotConfigs, StoreSnapshot, local_snapshot

__all__ = ["GcraTable", "MemoryStore"]


class MemoryStore(LocalState, StateStore):
    """Counters in this process. Thread-safe (sync routes run in a thread pool)."""

    source = "memory"

    # The fast path is LocalState's own methods (named here so the type checker
    # sees them fill StateStore's `*_now` slots).
    admit_now = LocalState.admit_now
    record_now = LocalState.record_now
    gate_now = LocalState.gate_now
    refund_now = LocalState.refund_now
    budget_request_now = LocalState.budget_request_now
    budget_try_retry_now = LocalState.budget_try_retry_now
    outbound_begin_now = LocalState.outbound_begin_now
    outbound_gate_now = LocalState.outbound_gate_now
    budget_refund_now = LocalState.budget_refund_now

    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
        return self.admit_now(breaker_key, breaker, limit_keys, limits, now)

    async def peek(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], now: float
    ) -> InboundResult:
        return self.peek_now(limit_keys, limits, now)

    async def record(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        return self.record_now(breaker_key, breaker, gate, outcome, slow, now)

    async def breaker_gate(
        self, breaker_key: str, breaker: BreakerConfig, now: float
    ) -> tuple[Gate, str, float]:
        return self.gate_now(breaker_key, breaker, now), "memory", 0.0

    async def refund(
        self,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        source: str,
        now: float,
        admitted_tats: Sequence[float] | None = None,
        *,
        fleet: FleetShare | None = None,
    ) -> None:
        self.refund_now(limit_keys, limits, now, admitted_tats)

    async def outbound_gate(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        gate, allowed = self.outbound_gate_now(breaker_key, breaker, budget_key, cfg, retry, now)
        return gate, allowed, "memory", 0.0

    async def budget_request(self, budget_key: str, cfg: RetryConfig, now: float) -> None:
        self.budget_request_now(budget_key, cfg, now)

    async def budget_try_retry(
        self, budget_key: str, cfg: RetryConfig, now: float
    ) -> tuple[bool, str, float]:
        return self.budget_try_retry_now(budget_key, cfg, now)

    async def budget_refund(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> None:
        self.budget_refund_now(budget_key, cfg, age_s, now, spent_at)

    def breakers_open_until_now(self, breaker_keys: Sequence[str], now: float) -> list[float]:
        """For each breaker: until when a balancer takes it for open (0.0 when a gate
        would admit a call), read without gating, fresh from this process: what the
        gate's refusal would teach it (`known_open_s`), as a store answering by gates
        alone (Redis, tiered) does. A half-open breaker whose probes are all in flight
        refuses: read as closed, it drew picks its gate then refused, and concurrent
        calls' reads wiped what those refusals had taught (a give-up advised no wait)."""
        with self._lock:
            out = []
            for key in breaker_keys:
                state = self.breakers.get(key)
                if state is None or state.state == CLOSED:
                    out.append(0.0)
                    continue
                refused, wait = state.refusing(now)
                out.append(now + known_open_s(refused, wait, state.config) if refused else 0.0)
            return out

    async def snapshot(
        self, now: float, *, top: int = 20, configs: SnapshotConfigs | None = None
    ) -> StoreSnapshot:
        """Everything this store holds, aged to `now` (the live page's view; decides nothing).

        Taken in a worker thread: choosing what to list reads every breaker, budget and
        key once (in C where it can, still O(n)), and on the event loop that stalled
        every request for as long; in a thread the loop keeps its turns (the GIL
        changes hands every few milliseconds). The store's lock makes that safe: sync
        routes decide on it from threads already."""
        return await asyncio.to_thread(local_snapshot, self, "memory", now, top, configs)
