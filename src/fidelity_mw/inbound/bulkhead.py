"""The route's bulkhead: at most N requests in flight, by priority, before the other layers.

It runs after the deadline and before the breaker and the limiter, so a
request shed for capacity costs the client no rate-limit quota and never
touches the breaker (neither a failure nor a probe). The limiter itself is
pure (`decide.concurrency`); this module picks the priority, waits in the
queue when the route has one, records the decision and feeds the adaptive
limit the latency of every request it admitted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

from .._types import Scope
from ..context import (
    ALLOW,
    LAYER_CONCURRENCY,
    QUEUED,
    SHED,
    SOURCE_MEMORY,
    Decision,
    DecisionContext,
)
from ..decide.concurrency import PRIORITIES, ConcurrencyLimiter
from ..engine import Engine, RoutePlan
from .request import header_key
from .responses import OUTCOME_EXPIRED, OUTCOME_SHED, Rejection, problem_body

QUEUE_TIMEOUT = "queue_timeout"
_RETRY_AFTER = [(b"retry-after", b"1")]


class Bulkheads:
    """Admission to and release from the route bulkheads of one middleware."""

    def __init__(self, engine: Engine, trusted_peer: Callable[[str], bool]) -> None:
        header = engine.policy.priority_header
        self.priority_raw: bytes | None = header_key(header) if header else None
        self.trusted_peer = trusted_peer
        self.monotonic = engine.clock.monotonic
        # A bulkhead under overload refuses most requests, on the same event loop
        # that serves the rest: each (route, class) answer is built once, not per 503.
        self._bodies: dict[tuple[str, str], bytes] = {}
        self._lag: dict[str, LagProbe] = {}  # per adaptive route

    def priority(self, plan: RoutePlan, scope: Scope, found: dict[bytes, bytes] | None) -> str:
        """The route's class, unless a trusted peer names another one."""
        raw = self.priority_raw
        if raw is not None and found is not None:
            value = found.get(raw)
            if value is not None:
                client = scope.get("client")
                named = value.decode("latin-1").strip().lower()
                if named in PRIORITIES and client and self.trusted_peer(client[0]):
                    return named
        return plan.priority

    def enter_now(
        self, ctx: DecisionContext, plan: RoutePlan, priority: str, now: float
    ) -> Rejection | Literal[True] | None:
        """Take a slot now (None), refuse (a Rejection), or True: wait in the queue."""
        limiter = plan.bulkhead
        assert limiter is not None
        admission = limiter.try_acquire(priority, now)
        if admission.admitted:
            if limiter.admitted_in_turn == 1 and limiter.estimate is not None:
                # The turn ends once the loop has run what is ready now (this
                # request's batch of arrivals among it); PACE_S is the limiter's.
                asyncio.get_running_loop().call_soon(limiter.new_turn)
            self._record(ctx, plan, ALLOW, admission.reason, priority, limiter, now)
            return None
        if limiter.can_queue():
            return True
        return self._refuse(ctx, plan, admission.reason, priority, limiter, now)

    async def wait(
        self, ctx: DecisionContext, plan: RoutePlan, priority: str, now: float
    ) -> Rejection | None:
        """Wait for a slot, best priority first, at most `queue_timeout_ms`."""
        limiter = plan.bulkhead
        assert limiter is not None
        assert plan.concurrency is not None
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        limiter.enqueue(priority, slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), plan.concurrency.queue_timeout_ms / 1000)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if not limiter.abandon(slot):
                # A release handed us the slot just as we gave up: give it back.
                self._wake(limiter.release())
            if isinstance(exc, asyncio.CancelledError):
                raise
            return self._refuse(ctx, plan, QUEUE_TIMEOUT, priority, limiter, self.monotonic())
        self._record(ctx, plan, QUEUED, "slot_freed", priority, limiter, self.monotonic())
        return None

    def leave(self, ctx: DecisionContext, plan: RoutePlan, admitted_app: bool) -> None:
        """Free the slot. A request the app served is a latency sample for the adaptive
        limit; one that ran out of deadline says the route is overloaded."""
        limiter = plan.bulkhead
        assert limiter is not None
        latency: float | None = None
        dropped = False
        if admitted_app and not ctx.client_disconnected:
            if ctx.outcome == OUTCOME_EXPIRED:
                dropped = True
            elif ctx.status is not None:
                ended = ctx.ended_at if ctx.ended_at is not None else self.monotonic()
                latency = ended - ctx.started_at
        lag = 0.0
        if limiter.estimate is not None:
            probe = self._lag.get(plan.route)
            if probe is None:
                probe = self._lag[plan.route] = LagProbe(self.monotonic)
            lag = probe.lag_s
            probe.arm()
        self._wake(limiter.release(latency, dropped=dropped, lag_s=lag))

    @staticmethod
    def _wake(slots: list[object]) -> None:
        for slot in slots:
            assert isinstance(slot, asyncio.Future)
            if not slot.done():
                slot.set_result(None)

    @staticmethod
    def _record(
        ctx: DecisionContext,
        plan: RoutePlan,
        verdict: str,
        reason: str,
        priority: str,
        limiter: ConcurrencyLimiter,
        now: float,
    ) -> None:
        ctx.decisions.append(
            Decision(
                LAYER_CONCURRENCY,
                plan.route,
                verdict,
                reason,
                SOURCE_MEMORY,
                0.0,
                now,
                {"limit": limiter.limit, "in_flight": limiter.in_flight, "priority": priority},
            )
        )

    def _refuse(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        reason: str,
        priority: str,
        limiter: ConcurrencyLimiter,
        now: float,
    ) -> Rejection:
        self._record(ctx, plan, SHED, reason, priority, limiter, now)
        ctx.decided_by = LAYER_CONCURRENCY
        ctx.outcome = OUTCOME_SHED
        body = self._bodies.get((plan.route, priority))
        if body is None:
            # The limit at the time is in the decision record, not the cached body.
            body = self._bodies[plan.route, priority] = problem_body(
                503,
                "Service Unavailable",
                f"route {plan.route!r} is at its concurrency limit for {priority} requests; "
                "retry in 1 s",
                "concurrency-limit",
                route=plan.route,
                priority=priority,
            )
        return 503, list(_RETRY_AFTER), body


class LagProbe:
    """How long ready work waits for the event loop, measured on the side.

    A request is only seen by the middleware once the event loop gets to it;
    with a CPU-bound app the loop, not the route, is where requests queue, and
    that wait is invisible in the route's own latency. The probe schedules one
    callback (at most one at a time) and notes how late it ran: the time
    anything that became ready then, a newly arrived request included, waited.
    It is armed as a request leaves, so a request's own work is never its lag.
    """

    __slots__ = ("_loop", "lag_s", "monotonic", "pending")

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self.lag_s = 0.0
        self.pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self) -> None:
        loop = asyncio.get_running_loop()
        if self.pending and loop is self._loop:
            return
        if loop is not self._loop:
            # A new event loop (the app served again, e.g. by another test client):
            # a callback left on the old one never runs, and its lag is not this one's.
            self._loop = loop
            self.lag_s = 0.0
        self.pending = True
        loop.call_soon(self._ran, self.monotonic())

    def _ran(self, scheduled: float) -> None:
        self.pending = False
        self.lag_s = max(0.0, self.monotonic() - scheduled)
