"""The route's bulkhead: at most N requests in flight, by priority, before the other layers.

It runs after the deadline and before the breaker and the limiter, so a
request shed for capacity costs the client no rate-limit quota and never
touches the breaker (neither a failure nor a probe). A queued request's wait
ends at its deadline where the route enforces it; that refusal is the
deadline's (504), not a capacity shed. The limiter itself is
pure (`decide.concurrency`); this module picks the priority, waits in the
queue when the route has one, records the decision and feeds the adaptive
limit the latency of every request it admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from starlette.requests import ClientDisconnect

from .._types import Message, Receive, Scope
from ..context import (
    ALLOW,
    LAYER_CONCURRENCY,
    LAYER_DEADLINE,
    QUEUED,
    REJECT,
    SHED,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..decide.concurrency import (
    CRITICAL,
    OLDER_IN_TURN,
    PACE_S,
    PACED,
    PRIORITIES,
    STALE,
    Admission,
    ConcurrencyLimiter,
)
from ..engine import Engine, RoutePlan
from ..headers import client_address
from .request import header_key
from .responses import (
    OUTCOME_DISCONNECTED,
    OUTCOME_EXPIRED,
    OUTCOME_SHED,
    Rejection,
    problem_body,
)
from .watch import CallLater, TimerHandle

HELD = "held"  # `enter_now`: held for its turn's decision (`wait` holds it)
QUEUE_TIMEOUT = "queue_timeout"
CLIENT_GONE = "client_gone"  # the client left while its request waited for a slot
DISPLACED = "displaced"  # a request of a better class took its place in the full queue
EXPIRED_IN_QUEUE = "expired_in_queue"  # the deadline's reason, beside expired_on_arrival
_RETRY_AFTER = [(b"retry-after", b"1")]


class HeldSlot:
    """A request's slot of its route's bulkhead, given back once: at its response's last
    message (the watcher's), or when the request unwinds without one. A background task
    (Starlette's `BackgroundTasks`) runs inside the app's call after the response went
    out; held to the end of that call, the slot shed new requests while the client had
    its answer and nothing of the request was in flight."""

    __slots__ = ("bulkheads", "ctx", "held", "plan")

    def __init__(self, bulkheads: Bulkheads, ctx: DecisionContext, plan: RoutePlan) -> None:
        self.bulkheads = bulkheads
        self.ctx = ctx
        self.plan = plan
        self.held = True

    def leave(self, admitted_app: bool) -> None:
        if self.held:
            self.held = False
            self.bulkheads.leave(self.ctx, self.plan, admitted_app)


class Bulkheads:
    """Admission to and release from the route bulkheads of one middleware."""

    def __init__(self, engine: Engine, trusted_peer: Callable[[str], bool]) -> None:
        header = engine.policy.priority_header
        self.priority_raw: bytes | None = header_key(header) if header else None
        self.trusted_peer = trusted_peer
        # A trusted proxy passes its clients' headers through: the header is judged by the
        # client it forwards for (as `client_ip` keys find it), not by the proxy.
        self.proxies = engine.trusted_proxies
        self.forwarded_header = engine.policy.forwarded_header
        self.forwarded_raw = header_key(engine.policy.forwarded_header)
        self.monotonic = engine.clock.monotonic
        # A clock may schedule its own timers (FakeClock does): a queued request's wait
        # then ends on it too, as the deadline does while the app runs (advanced past
        # it, a test sees the wait end), or in the loop's time, whichever comes first.
        self.call_later: CallLater | None = getattr(engine.clock, "call_later", None)
        # A bulkhead under overload refuses most requests, on the same event loop
        # that serves the rest: each (route, class) answer is built once, not per 503.
        self._bodies: dict[tuple[str, str], bytes] = {}
        self._lag: dict[str, LagProbe] = {}  # per adaptive route
        self._turns: dict[str, Turn] = {}  # per `newest_first` route, while it holds
        # per adaptive route whose queue holds a waiter beside room: the timer of the
        # queue's next pacing turn (`_pace_queue`), and the loop it is on (None: the clock's)
        self._pacers: dict[str, tuple[TimerHandle, asyncio.AbstractEventLoop | None]] = {}
        # None: the running loop's own (`loop_clock`), shared with every other
        # middleware on that loop (tests put a hand-driven one here)
        self._clock: LoopClock | None = None
        self._expired_body = problem_body(
            504,
            "Gateway Timeout",
            "the request's deadline passed while it waited for a slot",
            "deadline-expired",
            layer=LAYER_DEADLINE,
        )

    def loop_clock(self) -> LoopClock:
        """The heartbeat that bounds how long a request waited to be read."""
        clock = self._clock
        return clock if clock is not None else loop_clock(self.monotonic)

    def priority(self, plan: RoutePlan, scope: Scope, found: dict[bytes, bytes] | None) -> str:
        """The route's class, unless a trusted peer names another one. Through a trusted
        proxy (`trusted_proxies`, with its forwarding header) the peer that counts is the
        client it forwards for: an ingress on a private address is a trusted peer, and
        passes every external client's header through."""
        raw = self.priority_raw
        if raw is not None and found is not None:
            value = found.get(raw)
            if value is not None:
                client = scope.get("client")
                named = value.decode("latin-1").strip().lower()
                if named in PRIORITIES and client:
                    peer = client[0]
                    if self.proxies:
                        forwarded = found.get(self.forwarded_raw)
                        if forwarded is not None:
                            peer = client_address(
                                peer, forwarded, self.proxies, self.forwarded_header
                            )
                    if self.trusted_peer(peer):
                        return named
        return plan.priority

    def enter_now(
        self, ctx: DecisionContext, plan: RoutePlan, priority: str, now: float
    ) -> Rejection | str | None:
        """Take a slot now (None), refuse (a Rejection), or wait in the queue: the reason
        it was refused now (a str, for `wait`)."""
        limiter = plan.bulkhead
        assert limiter is not None
        if limiter.holding and priority != CRITICAL and self._turn(plan.route, limiter):
            return HELD  # decided with its turn's other arrivals (`wait` holds it)
        waited = None
        if limiter.spec.shed_stale and limiter.pacing:
            # Only while the loop is the bottleneck: the heartbeat costs a timer a ms.
            waited = self.loop_clock().waited(now)
        admission = limiter.try_acquire(priority, now, waited)
        if admission.admitted:
            if limiter.admitted_in_turn == 1 and limiter.estimate is not None:
                # The turn ends once the loop has run what is ready now (this
                # request's batch of arrivals among it); PACE_S is the limiter's.
                asyncio.get_running_loop().call_soon(limiter.new_turn)
            self._record(ctx, plan, ALLOW, admission.reason, priority, limiter, now, waited)
            return None
        return self._refused_now(ctx, plan, admission.reason, priority, limiter, now, waited)

    def _refused_now(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        reason: str,
        priority: str,
        limiter: ConcurrencyLimiter,
        now: float,
        waited: float | None = None,
    ) -> Rejection | str:
        """Refused a slot now: queue where the route has room in its queue (the reason,
        for `wait`), else refuse."""
        if reason != STALE:  # (a stale request only grows staler in the queue)
            if limiter.can_queue():
                return reason
            displaced = limiter.displace(priority)
            if displaced is not None:  # a waiter of a lower class gave it its place
                self._tell(limiter, displaced, False)
                return reason
        return self._refuse(ctx, plan, reason, priority, limiter, now, waited)

    def _turn(self, route: str, limiter: ConcurrencyLimiter) -> Turn | None:
        """The route's turn on the running event loop, to hold an arrival in; None where
        none can be held (not on asyncio, or the route's arrivals are held on another
        thread's loop: then it is decided at once, as pacing does without `newest_first`)."""
        loop = asyncio.events._get_running_loop()
        if loop is None:  # (trio: no loop turn to wait out, no callback to end it)
            return None
        turn = self._turns.get(route)
        if turn is not None and turn.loop is loop and turn.limiter is limiter:
            return turn
        if turn is not None and turn.held and not turn.loop.is_closed():
            return None
        turn = self._turns[route] = Turn(loop, limiter, self.monotonic)
        return turn

    async def held(
        self, ctx: DecisionContext, plan: RoutePlan, priority: str
    ) -> Rejection | str | None:
        """Hold the request until its turn's arrivals are decided together (`Turn`): a
        slot (None), a refusal, or the reason to wait in the queue, as `enter_now`."""
        limiter = plan.bulkhead
        assert limiter is not None
        turn = self._turns[plan.route]
        loop = turn.loop
        answer: asyncio.Future[Admission] = loop.create_future()
        turn.hold(answer, priority)
        try:
            admission = await answer
        except asyncio.CancelledError:
            # Cancelled after its turn gave it a slot (before it ran again): it frees the
            # slot it took; cancelled before, it took none (the turn skips it).
            if answer.done() and not answer.cancelled() and answer.result().admitted:
                self._give_back(plan.route, limiter)
            raise
        now = self.monotonic()
        if admission.admitted:
            # (the turn's count is reset by the turn: `Turn.decide`)
            self._record(ctx, plan, ALLOW, admission.reason, priority, limiter, now)
            return None
        return self._refused_now(ctx, plan, admission.reason, priority, limiter, now)

    def deferred(self, plan: RoutePlan, app: Awaitable[None]) -> Awaitable[None]:
        """The app's awaitable for an admitted request of a `newest_first` route (on
        asyncio): one that defers to its turn's decision and times the app's steps for
        the busy floor (`Deferring`); else the app's own, unwrapped."""
        limiter = plan.bulkhead
        turn = self._turns.get(plan.route)
        if (
            turn is None
            or limiter is None
            or turn.limiter is not limiter
            or not limiter.holding
            or turn.loop is not asyncio.events._get_running_loop()
        ):
            return app
        return Deferring(app, turn)

    async def wait(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        priority: str,
        now: float,
        refused: str,
        receive: Receive,
        scope: Scope | None = None,
    ) -> tuple[Rejection | None, Receive]:
        """Wait for a slot, best priority first, at most `queue_timeout_ms`; where the route
        enforces deadlines, never past the request's (a slot then would only run an app
        that is cut at once), and that refusal is the deadline's 504.

        Meanwhile it listens for the client leaving (a server does not cancel a request
        whose client left: it would take a slot and run the app for nobody): gone, it
        gives up its place and raises ClientDisconnect. What it read of the request is
        handed to the app first: the `receive` returned. (Not a request that expects
        `100 Continue`: reading would ask its client for a body that may be refused.)"""
        limiter = plan.bulkhead
        assert limiter is not None
        assert plan.concurrency is not None
        if refused == HELD:
            entered = await self.held(ctx, plan, priority)
            if not isinstance(entered, str):
                return entered, receive
            refused = entered
        arrived = now
        timeout_s = plan.concurrency.queue_timeout_ms / 1000
        # (a route with `enforce = false` only records deadlines: its queue timeout stands)
        deadline_at = ctx.deadline_at if plan.enforce else None
        until_deadline = deadline_at is not None and deadline_at - now < timeout_s
        if until_deadline:
            assert deadline_at is not None
            timeout_s = max(deadline_at - now, 0.0)
        loop = asyncio.get_running_loop()
        # True: a release handed it a slot; False: a better class took its place
        slot: asyncio.Future[bool] = loop.create_future()
        if limiter.enqueue(priority, slot, paced=refused in (PACED, OLDER_IN_TURN)):
            # freed since the refusal, by a request on another thread's loop
            self._record(ctx, plan, QUEUED, "slot_freed", priority, limiter, now)
            return None, receive
        if limiter.estimate is not None:
            # (refused by pacing, not by the limit: no release need come to wake it)
            self._pace_queue(plan.route, limiter)
        listener = ClientListener(receive)
        listening = listener.task = loop.create_task(
            listener.listen(scope is not None and _expects(scope))
        )
        waiting: set[asyncio.Future[Any]] = {slot, listening}
        timer: TimerHandle | None = None
        if self.call_later is not None:
            ends: asyncio.Future[bool] = loop.create_future()
            waiting.add(ends)
            # (fired where the clock is advanced: a test's thread beside a TestClient's
            # or a server's loop, which only a thread-safe call wakes)
            timer = self.call_later(timeout_s, lambda: _hand_on(loop, ends))
        try:
            until = loop.time() + timeout_s
            while True:
                done, _ = await asyncio.wait(
                    waiting,
                    timeout=max(0.0, until - loop.time()),
                    return_when=FIRST_COMPLETED,
                )
                if listening in done:
                    waiting.discard(listening)
                    if listener.gone:
                        # (before the slot: one handed over in the same wake-up would run
                        # the app for nobody; the except gives it to the next waiter)
                        raise ClientDisconnect
                if slot in done:
                    break
                if listening in done:
                    continue  # (it read what it may keep: the slot alone, from here)
                raise TimeoutError
        except (TimeoutError, asyncio.CancelledError, ClientDisconnect) as exc:
            if not limiter.abandon(slot):
                # A release handed us the slot just as we gave up: give it back.
                self._give_back(plan.route, limiter)
            if isinstance(exc, asyncio.CancelledError):
                listener.stopped = True  # (the request is cancelled: its read with it)
                raise
            if isinstance(exc, ClientDisconnect):
                self._gone(ctx, plan, priority, limiter, self.monotonic())
                raise
            if until_deadline:
                return self._expired(ctx, self.monotonic()), listener.receive_now()
            refused_now = self._refuse(
                ctx, plan, QUEUE_TIMEOUT, priority, limiter, self.monotonic()
            )
            return refused_now, listener.receive_now()
        finally:
            listener.hand_over()  # (done already where a refusal took `receive_now`)
            if timer is not None:
                timer.cancel()
        now = self.monotonic()
        if not slot.result():
            limiter.abandon(slot)  # (seen: it is forgotten)
            return self._refuse(
                ctx, plan, DISPLACED, priority, limiter, now
            ), listener.receive_now()
        if deadline_at is not None and now >= deadline_at:  # handed over too late
            self._give_back(plan.route, limiter)
            return self._expired(ctx, now), listener.receive_now()
        self._record(ctx, plan, QUEUED, "slot_freed", priority, limiter, now, queued=now - arrived)
        return None, listener.receive_now()

    def leave(self, ctx: DecisionContext, plan: RoutePlan, admitted_app: bool) -> None:
        """Free the slot. A request the app served is a latency sample for the adaptive
        limit; one that ran out of deadline says the route is overloaded, unless its
        deadline was shorter than the route's tolerated latency (the caller's choice)."""
        limiter = plan.bulkhead
        assert limiter is not None
        latency: float | None = None
        dropped = False
        if admitted_app and not ctx.client_disconnected:
            # (a request cut by its deadline: how long it had, which says whether the
            # deadline was one the route could have met at all)
            dropped = ctx.outcome == OUTCOME_EXPIRED
            if dropped or ctx.status is not None:
                ended = ctx.ended_at if ctx.ended_at is not None else self.monotonic()
                latency = ended - ctx.started_at
                if dropped and ctx.deadline_from_caller and ctx.deadline_at is not None:
                    cap = plan.deadline_cap_s
                    if cap is None or ctx.deadline_at - ctx.started_at < cap:
                        # The caller chose this deadline, shorter than the route's own
                        # (any client may send one): the time it had is a latency sample,
                        # not an overload drop. A client that sent one just past the
                        # route's tolerance took 10 % off the limit with each request the
                        # route's latency spread cut, where that latency took under 1 %.
                        dropped = False
                waited = ctx.client_wait_s
                if waited > 0.0:
                    # The client's own time (a body that trickled in, a response read
                    # slowly) is not the route's: a few slow connections would shrink the
                    # limit for every client, or, taken for the floor, stop it shrinking
                    # under a real overload. A deadline that passed while mostly the
                    # client was waited on is the client's doing, not an overload.
                    if dropped and waited * 2.0 >= latency:
                        dropped = False
                    latency -= waited
                    if latency <= 0.0 and not dropped:
                        latency = None
        lag = 0.0
        if limiter.estimate is not None:
            probe = self._lag.get(plan.route)
            if probe is None:
                probe = self._lag[plan.route] = LagProbe(self.monotonic)
            lag = probe.lag_s
            probe.arm()
        # (`now`, for the pacing gap of a slot handed to a waiter: only when one waits)
        now = self.monotonic() if limiter.waiting else None
        woken = limiter.release(latency, dropped=dropped, lag_s=lag, now=now)
        if woken:
            self._wake(limiter, woken)
            if limiter.estimate is not None:
                # (while pacing a release hands out one slot: more room, a limit that grew
                # with it, goes to the queue's pacing turns)
                self._pace_queue(plan.route, limiter)

    def _give_back(self, route: str, limiter: ConcurrencyLimiter) -> None:
        """A slot that served no request goes to the waiters (while pacing one of them;
        the queue's pacing turns admit the rest, as after a release)."""
        self._wake(limiter, limiter.give_back(self.monotonic()))
        if limiter.estimate is not None:
            self._pace_queue(route, limiter)

    def _pace_queue(self, route: str, limiter: ConcurrencyLimiter) -> None:
        """While a waiter of an adaptive route waits though the limit has room for it (it
        was refused by pacing, or queued behind one that was), give the queue a pacing
        turn every PACE_S, as arrivals get (`ConcurrencyLimiter.admit_waiter`): one
        timer per route, on the clock when it has its own timers (a FakeClock), else on
        the running loop."""
        armed = self._pacers.get(route)
        if armed is not None and (armed[1] is None or not armed[1].is_closed()):
            return
        if not limiter.queue_has_room():
            self._pacers.pop(route, None)
            return
        loop: asyncio.AbstractEventLoop | None = None
        call_later = self.call_later
        if call_later is None:
            loop = asyncio.get_running_loop()
            call_later = loop.call_later
        self._pacers[route] = (call_later(PACE_S, lambda: self._paced_turn(route, limiter)), loop)

    def _paced_turn(self, route: str, limiter: ConcurrencyLimiter) -> None:
        self._pacers.pop(route, None)
        token = limiter.admit_waiter(self.monotonic())
        if token is not None:
            self._wake(limiter, [token])
        self._pace_queue(route, limiter)

    @staticmethod
    def _wake(limiter: ConcurrencyLimiter, slots: list[object]) -> None:
        """Hand the slots a release gave to waiters over to their requests. Never raises:
        it runs as a request unwinds, before the observer's end and the context reset."""
        i = 0
        while i < len(slots):
            slot = slots[i]
            i += 1
            if not Bulkheads._tell(limiter, slot, True):
                # Its loop is gone, and its request with it: the slot goes to the next waiter.
                slots.extend(limiter.give_back())

    @staticmethod
    def _tell(limiter: ConcurrencyLimiter, slot: object, handed: bool) -> bool:
        """Tell a waiter it was handed a slot (True) or displaced (False), on its own
        event loop. False: its loop is gone (a displaced waiter is then forgotten)."""
        assert isinstance(slot, asyncio.Future)
        loop = slot.get_loop()
        # (the running loop is None when a request is unwound outside its loop, e.g.
        # finalised after it closed)
        if loop is asyncio.events._get_running_loop():
            _hand(slot, handed)
            return True
        if not loop.is_closed():
            # queued on a loop in another thread: handed over there (from here that
            # loop is not even woken up; the request sat out its queue timeout)
            try:
                loop.call_soon_threadsafe(_hand, slot, handed)
                return True
            except RuntimeError:  # closed since the check
                pass
        if not handed:
            limiter.abandon(slot)
        return False

    def _gone(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        priority: str,
        limiter: ConcurrencyLimiter,
        now: float,
    ) -> None:
        """The client left while its request waited for a slot: nobody to answer, and the
        app does not run (a `shed` `client_gone` decision, outcome `disconnected`)."""
        self._record(ctx, plan, SHED, CLIENT_GONE, priority, limiter, now)
        ctx.decided_by = LAYER_CONCURRENCY
        ctx.outcome = OUTCOME_DISCONNECTED
        ctx.client_disconnected = True

    def _expired(self, ctx: DecisionContext, now: float) -> Rejection:
        """The deadline passed while the request waited for a slot: the deadline's refusal,
        as on arrival or while the app runs (504, no Retry-After), not a capacity shed."""
        ctx.decisions.append(
            Decision(LAYER_DEADLINE, ctx.route, REJECT, EXPIRED_IN_QUEUE, SOURCE_REQUEST, 0.0, now)
        )
        ctx.decided_by = LAYER_DEADLINE
        ctx.outcome = OUTCOME_EXPIRED
        return 504, [], self._expired_body

    @staticmethod
    def _record(
        ctx: DecisionContext,
        plan: RoutePlan,
        verdict: str,
        reason: str,
        priority: str,
        limiter: ConcurrencyLimiter,
        now: float,
        waited: float | None = None,
        *,
        queued: float | None = None,
    ) -> None:
        details: dict[str, DetailValue] = {
            "limit": limiter.limit,
            "in_flight": limiter.in_flight,
            "priority": priority,
        }
        if waited is not None:  # (to be read: `shed_stale`)
            details["waited_ms"] = round(waited * 1000.0, 3)
        if queued is not None:  # (in the queue, for a slot)
            details["queued_ms"] = float(round(queued * 1000.0, 3))
        ctx.decisions.append(
            Decision(
                LAYER_CONCURRENCY,
                plan.route,
                verdict,
                reason,
                SOURCE_MEMORY,
                0.0,
                now,
                details,
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
        waited: float | None = None,
    ) -> Rejection:
        self._record(ctx, plan, SHED, reason, priority, limiter, now, waited)
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


class ClientListener:
    """Reads the request while it waits in the queue, to hear its client leave.

    After the last body message a server's `receive` answers only when the client
    disconnects. So it reads on to there, keeping what it read for the app (`replay`);
    a body in several messages is not read past its first (the app reads the rest, and
    memory holds one message per queued request at most)."""

    __slots__ = ("failed", "gone", "pending", "read", "receive", "stopped", "task")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.read: deque[Message] = deque()
        self.gone = False
        self.failed: Exception | None = None
        # the wait ended: no read after the one under way (`hand_over`)
        self.stopped = False
        # a read under way when the wait ended: the app's next `receive` awaits it
        self.pending: asyncio.Future[None] | None = None
        self.task: asyncio.Future[None] | None = None  # the one that listens (`listen`)

    async def listen(self, expects_continue: bool = False) -> None:
        if expects_continue:
            return
        # (two reads at most: a `receive` that answers at once again after the body, as
        # some hand-written ones do, is not read in a loop)
        for _ in range(2):
            try:
                message = await self.receive()
            except Exception as exc:  # the app's first read after these raises it
                self.failed = exc
                return
            self.read.append(message)
            kind = message["type"]
            if kind == "http.disconnect":
                self.gone = True
                return
            if kind != "http.request" or message.get("more_body", False) or self.stopped:
                return

    def hand_over(self) -> None:
        """The wait ended; the listener may still read. After the whole body it only
        waits for the client to leave: cancelled, nothing is lost (a server says so
        again). A read of the body is not cancelled: a server's `receive` need not
        survive a cancel (httpx's ASGITransport reads a streaming upload from a
        generator a cancel leaves broken); the next `receive` awaits it (`replay`)."""
        listening = self.task
        if listening is None or listening.done() or listening is self.pending:
            return
        if self.read or self.stopped:
            listening.cancel()
        else:
            self.stopped = True
            self.pending = listening

    def receive_now(self) -> Receive:
        """The `receive` for what comes next (the app, a rejection hook that reads the
        body): what it read first, then the server's. (The wait is over: never both the
        listener's read and the server's at once.)"""
        self.hand_over()
        if self.read or self.failed is not None or self.pending is not None:
            return self.replay
        return self.receive

    async def replay(self) -> Message:
        pending = self.pending
        if pending is not None and not self.read:
            # The read under way when the wait ended (it never raises). Shielded: an app
            # that gives up its read (Starlette's `is_disconnected` does at once) leaves
            # it under way, for its next read, as the server's own would be.
            await asyncio.shield(pending)
            self.pending = None
        if self.read:
            return self.read.popleft()
        failed = self.failed
        if failed is not None:
            self.failed = None
            raise failed
        return await self.receive()


def _expects(scope: Scope) -> bool:
    """The request asks for `100 Continue` before it sends its body."""
    for name, value in scope.get("headers") or ():
        if name.lower() == b"expect" and value.strip().lower() == b"100-continue":
            return True
    return False


def _hand(slot: asyncio.Future[bool], handed: bool) -> None:
    if not slot.done():
        slot.set_result(handed)


def _hand_on(loop: asyncio.AbstractEventLoop, ends: asyncio.Future[bool]) -> None:
    """End a queued wait from a clock's timer, on the wait's own loop. Set from another
    thread, the future's callback was queued on a loop asleep in its selector: the wait
    ended only at its queue timeout in the loop's time (20 s for a 20 s timeout the test
    had advanced past)."""
    if loop is asyncio.events._get_running_loop():
        _hand(ends, True)
    elif not loop.is_closed():
        with contextlib.suppress(RuntimeError):  # closed since the check
            loop.call_soon_threadsafe(_hand, ends, True)


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


class LoopClock:
    """When the event loop last got round to reading its sockets, from a light heartbeat.

    A request is read in the loop's I/O phase. If the loop was busy before that
    phase (another request's CPU work), the request may have arrived at any time
    since the phase before, and ASGI says neither when nor in what order. A
    timer every `TICK_S` runs just after an I/O phase; `waited` is the time
    since the last tick that ran before the phase that read the request, an
    upper bound on how long it waited. That is the tick before the latest one
    while the latest ran in this very turn (after this request was read: a
    callback the tick queues has not run yet), else the latest. While the loop
    waits for I/O, ticks come `TICK_S` apart and the bound is about a tick;
    after a long CPU step it covers the step. (On asyncio's own loop, work
    queued earlier runs between its I/O phase and its timers, so the bound can
    fall short by that work; uvloop, which uvicorn uses when installed, runs
    timers right after I/O.) The heartbeat runs while requests ask (the bulkhead
    asks only while the loop is the bottleneck) and stops `IDLE_S` after the
    last one, so a service that keeps up is not woken for it; until it has
    ticked since it (re)started the bound is unknown.
    """

    TICK_S = 0.001
    IDLE_S = 0.1
    IDLE_TICKS = 100  # IDLE_S of ticks TICK_S apart

    __slots__ = ("_handle", "_loop", "current", "idle_ticks", "last", "monotonic", "prev", "seen")

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.monotonic = monotonic
        self.last: float | None = None  # the latest tick
        self.prev: float | None = None  # the one before
        self.current = False  # the latest tick ran in this loop turn
        self.seen = 0.0  # when a request last asked
        self.idle_ticks = 0  # ticks since then
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def waited(self, now: float) -> float | None:
        """A bound on how long a request seen `now` waited to be read (None: unknown)."""
        self.seen = now
        self.idle_ticks = 0
        loop = asyncio.get_running_loop()
        if self._handle is None or loop is not self._loop:
            # (Re)started, or a new event loop: a timer left on the old one never runs.
            self._loop = loop
            self.last = self.prev = None
            self.current = False
            self._handle = loop.call_later(self.TICK_S, self._tick, loop)
            return None
        ref = self.prev if self.current else self.last
        return None if ref is None else max(0.0, now - ref)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return
        now = self.monotonic()
        self.prev, self.last = self.last, now
        self.idle_ticks += 1
        # (ticks count too: on a clock that does not move, a FakeClock not advanced,
        # `now - seen` stays 0 and the heartbeat ran until its loop closed)
        if now - self.seen > self.IDLE_S or self.idle_ticks > self.IDLE_TICKS:
            self._handle = None
            return
        # Requests read in the I/O phase just before this tick run next, before this:
        self.current = True
        loop.call_soon(self._turned)
        self._handle = loop.call_later(self.TICK_S, self._tick, loop)

    def _turned(self) -> None:
        self.current = False


# One LoopClock per event loop (and time source): when the loop last read its sockets is
# the loop's, whichever middleware asks. With one per middleware, an app of N middlewares
# (mounted sub-apps each with its own) ran N heartbeats a millisecond apart, each giving
# its own bound. Weak keys: a loop garbage-collected takes its clocks along.
_LOOP_CLOCKS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[Callable[[], float], LoopClock]
] = weakref.WeakKeyDictionary()
_LOOP_CLOCKS_LOCK = threading.Lock()


def loop_clock(monotonic: Callable[[], float]) -> LoopClock:
    """The running event loop's LoopClock on this time source, made on first use."""
    loop = asyncio.get_running_loop()
    clocks = _LOOP_CLOCKS.get(loop)
    if clocks is None:
        with _LOOP_CLOCKS_LOCK:  # (loops in several threads: once per loop)
            clocks = _LOOP_CLOCKS.get(loop)
            if clocks is None:
                # A closed loop's clock may hold its last timer, which refers to the
                # loop: the weak key alone would never let it go.
                for old in [old for old in _LOOP_CLOCKS if old.is_closed()]:
                    _LOOP_CLOCKS.pop(old, None)
                clocks = _LOOP_CLOCKS[loop] = {}
    clock = clocks.get(monotonic)
    if clock is None:
        clock = clocks[monotonic] = LoopClock(monotonic)
    return clock


class Turn:
    """One loop turn's held arrivals of a `newest_first` route (decide/concurrency.py).

    An arrival is held (a future each) until the turn ends: a callback queued at the
    first arrival, which runs once the loop has run what was ready with it (the
    requests read in the same I/O phase among it), or earlier, when a request the
    route admitted resumes first (`Deferring`). Then the limiter decides them all
    together, the newest first, and each held request goes on with its answer.

    The turn ends `READ_PASSES` loop passes later than that callback first runs: a
    request read in the pass just before another's CPU step starts its task only
    after that step, and is held alone, while the requests that arrived during the
    step are read in that same pass and reach the gate in the next. Decided at once,
    the turn took the one read early (a whole CPU step old) and refused the fresh
    ones; a pass later they are all held together and the newest is taken. (At 4x
    this was most of the p99 of served requests; a second pass also takes those whose
    bytes came in just after the step, measured in benchmarks/RESULTS.md.)"""

    __slots__ = ("held", "limiter", "loop", "monotonic", "passes", "pending")

    READ_PASSES = 2  # the passes a turn's end waits for the arrivals read with its first

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limiter: ConcurrencyLimiter,
        monotonic: Callable[[], float],
    ) -> None:
        self.loop = loop
        self.limiter = limiter
        self.monotonic = monotonic
        self.held: list[tuple[asyncio.Future[Admission], str]] = []
        self.pending = False  # the turn's end is queued
        self.passes = 0  # passes the queued end has waited

    def hold(self, answer: asyncio.Future[Admission], priority: str) -> None:
        self.held.append((answer, priority))
        if not self.pending:
            self.pending = True
            self.loop.call_soon(self.end)

    def end(self) -> None:
        if self.passes < self.READ_PASSES:
            self.passes += 1
            self.loop.call_soon(self.end)
            return
        self.pending = False
        self.passes = 0
        self.decide()

    def decide(self) -> None:
        """Answer the held arrivals (those still waiting: a cancelled one took nothing)."""
        held = [(answer, priority) for answer, priority in self.held if not answer.done()]
        self.held = []
        if not held:
            return
        limiter = self.limiter
        answers = limiter.admit_turn([priority for _, priority in held], self.monotonic())
        # The newest first, as they were decided: the one admitted starts its await
        # before the others' refusals are sent.
        admitted = False
        for (answer, _), admission in zip(reversed(held), reversed(answers), strict=True):
            answer.set_result(admission)
            admitted = admitted or admission.admitted
        if admitted:
            # The loop goes round once after the turn: its admissions are counted until
            # then (`new_turn`), here and not by each admitted request as it resumes. One
            # cancelled before it ran again, or a turn that admitted several (none of them
            # saw the count at 1), left it counting for good, and every request decided
            # at once (`try_acquire`: critical aside) was refused `paced` while one was
            # in flight.
            self.loop.call_soon(limiter.new_turn)


class Deferring:
    """Runs an admitted request's app so that its turn's decision comes first.

    The app's awaitable is driven here step by step: what it yields is yielded on,
    what it is sent or thrown (a cancellation among it) goes to it, and its result
    or exception is this one's, unchanged. When it resumes while arrivals of its
    route are held, the turn is decided now, and it yields once more (one pass of
    the loop) before it goes on: the request admitted then starts its await before
    this one's next CPU step, so that the await overlaps it. Decided only at the
    turn's end, the newcomer's first step ran after that CPU step, its await
    overlapped nothing, and the core idled through it."""

    __slots__ = ("app", "turn")

    def __init__(self, app: Awaitable[None], turn: Turn) -> None:
        self.app = app
        self.turn = turn

    def __await__(self) -> Generator[Any, Any, None]:
        steps = self.app.__await__()
        turn = self.turn
        clock = turn.monotonic
        busy = 0.0  # the app's time on the loop, its awaits not counted (the busy floor)
        sent: Any = None
        error: BaseException | None = None
        while True:
            began = clock()
            try:
                if error is not None:
                    thrown, error = error, None
                    yielded = steps.throw(thrown)
                else:
                    yielded = steps.send(sent)
            except StopIteration as stop:
                turn.limiter.busy_sample(busy + clock() - began)
                return stop.value  # type: ignore[no-any-return]
            except BaseException:
                turn.limiter.busy_sample(busy + clock() - began)
                raise
            busy += clock() - began
            try:
                sent = yield yielded
            except BaseException as exc:  # (GeneratorExit and cancellation among them)
                error = exc
                continue
            if turn.held:
                try:
                    # First the passes in which the arrivals read with the held ones reach
                    # the gate (Turn's doc), then the decision, then one pass for the
                    # newcomer. (Bare yields: the task runs again in the next pass.)
                    for _ in range(turn.READ_PASSES):
                        yield None
                    turn.decide()
                    yield None
                except BaseException as exc:
                    error = exc
