"""Response watching: what the app answered, when its answer ended, and what that
outcome means for the route breaker and the limits' quota.

The app's `send` is wrapped by one small object per request (no closure), and the
app gets its bound `__call__` (interpreted, a call through the method costs less than
a call of the object). It adds our response headers to the start message and
notes the status, the last message and a failing write to the client. Everything
else passes untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import sys
from collections.abc import Callable, Coroutine, Sequence
from sys import get_asyncgen_hooks
from typing import Any, Final, Protocol

import httpx
from starlette.requests import ClientDisconnect

from .._logs import exception as log_exception
from .._types import Message, Receive, Scope, Send
from ..context import (
    _CURRENT,
    LAYER_CONCURRENCY,
    SHED,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    inline_fields,
)
from ..decide.breaker import FAILURE, IGNORED, SUCCESS, Gate
from ..errors import SendStalled
from ..policy import BreakerConfig
from ..routeplan import RoutePlan
from ..state.base import InboundResult, StateStore
from .appfields import FIELD_NAMES, beside_app
from .refusals import (
    after_give_up,
    charged_for_upstream,
    may_answer,
    raised_by_refusal,
    raised_by_upstream,
    reports_refusal,
    reports_upstream,
    upstream_throttled,
    without_passed_on_markers,
)
from .responses import (
    DECIDED_BY_APP,
    OUTCOME_DISCONNECTED,
    OUTCOME_FAILED,
    OUTCOME_REJECTED,
    OUTCOME_SERVED,
    shed_outcome,
)
from .xratelimit import refunded_fields

logger: Final = logging.getLogger("fidelity_mw")


def _task_lookup() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    """`asyncio.current_task(loop)` as one C call. On Python 3.11 that function is Python
    code around a dict the C accelerator keeps (a frame per request); from 3.12 on it is
    the C function itself. Anything unexpected: the public function."""
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if sys.version_info < (3, 12) and type(tasks) is dict:
        return tasks.get
    return asyncio.current_task


current_task: Final = _task_lookup()
_asyncgen_hooks: Final = get_asyncgen_hooks  # compiled: a constant, not a lookup per request

ResponseEndHook = Callable[[DecisionContext, Scope, Any], None]

# Said when no asyncio event loop runs the request (trio: hypercorn's trio worker)
NOT_ASYNCIO: Final = (
    "fidelity_mw needs an asyncio event loop (asyncio's own or uvloop) and none is "
    "running: serve the app with an asyncio worker (not trio)"
)


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


# loop.call_later, or a clock's own (FakeClock fires it when advanced past)
CallLater = Callable[[float, Callable[[], None]], TimerHandle]

_START: Final = "http.response.start"
_BODY: Final = "http.response.body"
_ZEROCOPY: Final = "http.response.zerocopysend"
_PATHSEND: Final = "http.response.pathsend"  # always the whole body in one message
_GONE: Final = "http.disconnect"
_ALLOW: Final = "allow"  # a breaker gate's verdict (decide.breaker.Gate)
# The rate-limit fields an app may set itself beside ours (appfields.py), looked for by
# name in C: one set test over the start's header names
_no_fields: Final = FIELD_NAMES.isdisjoint
_header_name: Final = operator.itemgetter(0)
# the reason of the bulkhead's `shed` when a body message waited past the route's
# `send_stall_timeout_s` for its client (ResponseWatcher.stall)
SEND_STALLED: Final = "send_stalled"


class HeldSlot(Protocol):
    """A request's slot of its route's bulkhead (bulkhead.HeldSlot), given back once."""

    def leave(self, admitted_app: bool) -> None: ...


# The errors whose 500 a handler inside us sends is held (`ResponseWatcher.held`): those
# the middleware may answer (refusals.control_refusal, upstream_failure; an error raised
# from one of them too: refusals.may_answer); and how many
# messages of it at most (an error page is one or two).
_MAY_ANSWER: Final = (httpx.HTTPError,)
_MOST_HELD: Final = 8
_set_current: Final = _CURRENT.set
_reset_current: Final = _CURRENT.reset


class ResponseWatcher:
    """The `send` the app gets. `started` / `complete` say how far its response got.

    Built field by field, not by an `__init__` (the middleware sets `send` and `ctx`,
    and what else its request needs): a class call with a Python `__init__` costs an
    interpreter call of its own per request, one without it only the allocation.
    `watching` builds one in a single call."""

    # Class-level defaults (no __slots__): a request stores only what it changes.
    started = False
    complete = False
    expired = False  # the deadline passed before the response started
    # set when the route counts slow calls: then the end time is read at the
    # last message (background tasks run after it, and are not the call)
    monotonic: Callable[[], float] | None = None
    # the observer's hook at the last message, with its scope and token
    end: tuple[ResponseEndHook, Scope, Any] | None = None
    watch: DeadlineWatch | None = None  # set while armed
    task: asyncio.Task[Any] | None = None
    # the route's bulkhead slot (a HeldSlot), given back at the response's last message: a
    # background task the app runs after it (BackgroundTasks) is no request in flight.
    # (Any: compiled, a class-level default of a Protocol type is never set, and reading
    # the attribute raised AttributeError)
    slot: Any = None
    # `[concurrency] send_stall_timeout_s` on a route with a slot (0: no bound): a body
    # message before the last that its client has not taken in this long ends the
    # response (`stall`), and `stalled` says so
    stall_s = 0.0
    stalls: StallWatch | None = None  # the middleware's timer for them, with stall_s
    stall_task: asyncio.Task[Any] | None = None  # the task that sends the body
    # What `current()` was before the middleware made it this request's context (None:
    # nothing): it is again while the server takes the response's last message (`__call__`).
    outer: DecisionContext | None = None
    stalled = False
    # A 500 sent while an error the middleware may answer itself (an outbound refusal or
    # give-up: an httpx error, CircuitOpen among them) is being handled: what an error
    # handler between the app and us sends before it re-raises (Starlette's
    # ServerErrorMiddleware, inside us when we wrap a Starlette or FastAPI app from
    # outside). Held, unsent, until the error reaches the middleware: it answers the
    # error instead (503 for a CircuitOpen), or lets these out after all
    # (`release_held`). Sent at once, the 500 made our answer impossible.
    held: list[Message] | None = None
    held_exc: BaseException | None = None
    # Set once a held 500 is let out: sent from inside the handler's `except` (the
    # middleware's own, or the app's while it streams), it would be held again, and a
    # long one would recurse through `release_held` without end.
    released = False
    send: Send  # the server's
    ctx: DecisionContext
    receive: Receive  # the server's, read by `gone_receive`

    @staticmethod
    def watching(
        send: Send,
        ctx: DecisionContext,
        end: tuple[ResponseEndHook, Scope, Any] | None = None,
        monotonic: Callable[[], float] | None = None,
        watch: DeadlineWatch | None = None,
        deadline_at: float = 0.0,
        now: float = 0.0,
    ) -> ResponseWatcher:
        """A watcher of `send` for `ctx`, armed on `watch` when given."""
        watcher = ResponseWatcher()
        watcher.send = send
        watcher.ctx = ctx
        if end is not None:
            watcher.end = end
        if monotonic is not None:
            watcher.monotonic = monotonic
        if watch is not None:
            watcher.arm(watch, deadline_at, now)
        return watcher

    def arm(self, watch: DeadlineWatch, deadline_at: float, now: float) -> None:
        """Cancel the app's work (this task) if `deadline_at` passes before its response
        starts."""
        self.watch = watch
        # asyncio.current_task(), asking `home`'s loop first when this thread's asyncgen
        # hook is the one that loop installed (DeadlineWatch.running_task: no system call
        # per request)
        home = watch.home
        task = (
            current_task(home[1]) if home is not None and _asyncgen_hooks()[0] is home[0] else None
        )
        self.task = task if task is not None else watch.running_task()
        watch.inflight[self] = deadline_at
        # the common case (a deadline later than the timer's, a live timer) ends here
        if deadline_at < watch._timer_at or watch._recheck_at < now:
            watch.add(self, deadline_at, now)

    def disarm(self) -> None:
        watch = self.watch
        if watch is not None:
            self.watch = None
            del watch.inflight[self]

    def expire(self) -> None:
        if self.watch is None:
            # Disarmed (its response started, or the app returned) after the timer of
            # another thread's loop posted this expiry: too late to act on.
            return
        task = self.task
        if task is not None and not task.done():
            loop = task.get_loop()
            if running_loop() is loop and current_task(loop) is task:
                # Fired from inside the request's own task: a clock that runs its timers
                # as it is moved on (FakeClock.advance, by the app or an upstream it
                # mocks). A cancel now would land at the task's next await, whatever the
                # app did before it: its whole response sent (the task then ended
                # cancelled, the CancelledError the server's), or a body cut mid-way. From
                # the loop, as a real timer fires: the response started or the app
                # returned meanwhile, it disarmed the watcher and this is too late.
                loop.call_soon(self.expire)
                return
        self.disarm()
        if self.started or self.expired or task is None or task.done():
            return  # a started response is never cut; a request is cancelled once
        self.expired = True
        task.cancel()

    async def __call__(self, message: Message) -> None:
        # (a str: compiled, the comparisons below are native string compares, not
        # PyObject_RichCompare; the ASGI spec makes it one, and every server checks it)
        kind: str = message["type"]
        if kind == _START:
            if self.held is not None:
                # A second start while the app's 500 is held (a fallback after its own
                # error page): the 500 was its first, what the server takes without us,
                # so it goes out first; this one then goes as it is, for the server to
                # refuse as it would without us. Passed on ahead, it reached the server
                # first and the late 500 (or our answer) was the one refused.
                await self.release_held()
                await self._send(message)
                return
            status = message["status"]
            if status == 500 and not self.started and not self.released:
                handled = sys.exception()
                if handled is not None and (
                    isinstance(handled, _MAY_ANSWER) or may_answer(handled)
                ):
                    self.held = [message]
                    self.held_exc = handled
                    return
            ctx = self.ctx
            ctx.status = status
            self.started = True
            watch = self.watch
            if watch is not None:  # disarm(), inline: every armed response passes here
                self.watch = None
                del watch.inflight[self]
            headers = ctx.response_headers
            if status >= 400:  # (one test on the common path, as before)
                if status >= 500:  # its markers are ours to write: see the function
                    message = without_passed_on_markers(message, reports_refusal(ctx, status))
                if ctx.shed_by is not None or ctx.upstream_exhausted or ctx.upstream_failed:
                    if headers and reports_refusal(ctx, status):  # its units come back
                        headers = refunded_fields(ctx, headers)
                    if status >= 500:
                        headers = after_give_up(ctx, headers, message)
            if headers:
                # A new message with a new list: the app's may be shared (a reused
                # Response object, a start message it keeps and sends again), and ours
                # would pile up in it, request after request.
                # (`in` and a subscript, not `get`: compiled, two mapping slot calls
                # against a method looked up by name on a MutableMapping; interpreted,
                # no method call. The same for `more_body` below.)
                app_headers = message["headers"] if "headers" in message else ()  # noqa: SIM401
                if not _no_fields(map(_header_name, app_headers)):
                    # the app set rate-limit fields of its own: no policy named twice,
                    # no legacy field twice, no list a client cannot read (appfields.py)
                    app_headers, headers = beside_app(app_headers, headers)
                message = {**message, "headers": [*app_headers, *headers]}
        elif self.held is not None:  # the rest of a held 500
            held = self.held
            held.append(message)
            if len(held) > _MOST_HELD:  # not a short error page: it goes out as it is
                await self.release_held()
            return
        elif (
            kind in (_BODY, _ZEROCOPY) and not ("more_body" in message and message["more_body"])  # noqa: RUF019
        ) or kind == _PATHSEND:
            self.complete = True
            self.ctx.response_complete = True
            if self.monotonic is not None:
                self.ctx.ended_at = self.monotonic()
            end = self.end
            if end is not None:
                response_ends(end[0], self.ctx, end[1], end[2])
            slot: HeldSlot | None = self.slot
            if slot is not None:
                slot.leave(True)
            # The server takes the last message with this request's context out of the
            # current one. uvicorn arms its keep-alive timer inside this send, and
            # `call_later` copies the current context: with ours in it, the context and
            # everything it holds lived on in that copy until the connection's next request
            # (or the timeout), and at 256 connections the collector ran twice as often as
            # bare's (benchmarks/RESULTS.md). Ours again right after, for the rest of the app
            # (a background task after the response still sees `current()`).
            # Reset with the middleware's token where it can be: `set(outer)` would leave a
            # new mapping of the variable (to None) in the timer's copy, two objects more
            # per idle connection for the collector (benchmarks/RESULTS.md).
            # (the middleware's token, `DecisionContext._token`: after the reset, the token of
            # making the request's context current again replaces it, for the middleware's
            # `finally` to reset with)
            ctx = self.ctx
            token = ctx._token
            if token is not None:
                try:
                    _reset_current(token)
                except (RuntimeError, ValueError):  # used, or set in another context (a
                    token = None  # child task sends: Starlette's streaming responses)
            if token is None:
                _set_current(self.outer)
            try:
                await self.send(message)
            except OSError:
                self.ctx.client_disconnected = True  # (as below)
                raise
            finally:
                if token is not None:  # the middleware resets with this one
                    ctx._token = _set_current(ctx)
                else:
                    _set_current(ctx)
            return
        elif kind == _BODY and (self.monotonic is not None or self.stall_s):
            # A body message before the last: a server's `send` waits while its client
            # has not taken what it was sent (uvicorn, past its write buffer's mark). That
            # wait is the client's (`DecisionContext.client_wait_s`).
            if self.stall_s:
                await self._bounded(message)  # (and timed, where the route measures)
                return
            monotonic = self.monotonic
            if monotonic is not None:
                begun = monotonic()
                await self._send(message)
                self.ctx.client_wait_s += monotonic() - begun
                return
        # (inline, not `_send`: one coroutine frame less on every message of every request;
        # a local: interpreted, calling an instance attribute is never specialized)
        send = self.send
        try:
            await send(message)
        except OSError:
            # The server could not write to the client: a disconnect, not the
            # route's failure (an OSError from the app's own backends is).
            self.ctx.client_disconnected = True
            raise

    async def gone_receive(self) -> Message:
        """The `receive` the app gets on routes that do not measure their latency
        (interpreted; a bound method, one allocation per request; compiled, `GoneReceive`):
        the server's, noting the client leaving when the app reads it before its response
        started. A handler that races its work against the client (`receive` until
        `http.disconnect`, Starlette's `is_disconnected()`) and then answers anyway (a
        499, its partial result) answers nobody: the request is `disconnected` and no
        outcome of the route breaker's, as when the app raises on the cancel. After the
        response started the server's disconnect is no news (uvicorn answers one to every
        read once the response is complete)."""
        message: Message = await self.receive()
        if message["type"] == _GONE and self.ctx.status is None:
            self.ctx.client_disconnected = True  # (as `gone_receive`)
        return message

    async def release_held(self) -> None:
        """Send the held 500 after all (the middleware does not answer its error)."""
        held = self.held
        if held is None:
            return
        self.held = None
        self.held_exc = None
        self.released = True
        for message in held:
            await self(message)

    async def _send(self, message: Message) -> None:
        try:
            await self.send(message)
        except OSError:
            self.ctx.client_disconnected = True  # (as in __call__)
            raise

    async def _bounded(self, message: Message) -> None:
        """Send a body message before the last, for at most `stall_s`: a client that
        stopped reading (and keeps its connection) would hold the request's bulkhead
        slot for as long as it likes, since a deadline never cuts a started response
        and the server has no write timeout. Past the bound `stall` gives the slot back
        and ends the response: this send raises `SendStalled`, an `OSError`, as a
        server's send does for a connection that is gone."""
        ctx = self.ctx
        stalls = self.stalls
        assert stalls is not None
        task = self.stall_task
        if task is None:  # (the task that sends: Starlette's streaming runs in a child)
            try:
                task = self.stall_task = asyncio.current_task()
            except RuntimeError:  # no asyncio loop (trio): nothing to keep the bound on
                self.stall_s = 0.0
                await self._send(message)
                return
        begun = stalls.monotonic()
        at = begun + self.stall_s
        stalls.waiting[self] = at
        # no timer set earlier; or one a second overdue, whose loop may be gone (or only
        # busy: then the new one does its work)
        if at < stalls._timer_at or begun > stalls._timer_at + 1.0:
            stalls._schedule(at)
        try:
            await self.send(message)
        except asyncio.CancelledError:
            # ours (`stall`), and nobody else's cancel with it: the send ends here
            if self.stalled and task is not None and task.uncancel() == 0:
                stalled = self._stalled_error()
                # (`from None` by hand too: compiled, mypyc 2.4.1 drops a raise's `from`)
                stalled.__suppress_context__ = True
                raise stalled from None
            raise
        except OSError:
            ctx.client_disconnected = True  # (as in __call__)
            raise
        finally:
            stalls.waiting.pop(self, None)
            if self.monotonic is not None:
                ctx.client_wait_s += self.monotonic() - begun

    def stall(self) -> None:
        """A body message waited `stall_s` for its client (StallWatch): give the slot
        back, record the bulkhead's `shed` `send_stalled` decision and end the response
        (cancel the send; `_bounded` raises `SendStalled` in its place, as any later
        send does)."""
        task = self.stall_task
        if task is not None:
            loop = task.get_loop()
            if running_loop() is not loop and not loop.is_closed():
                # (a clock's timer, advanced in another thread: the task is the loop's)
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(self.stall)
                return
        if self.stalled or self.complete:
            return
        self.stalled = True
        ctx = self.ctx
        # the client is as good as gone: no latency sample, no breaker outcome
        ctx.client_disconnected = True
        details = {"stalled_ms": float(round(self.stall_s * 1000.0, 3))}
        now = ctx.engine.clock.monotonic()
        ctx.decisions.append(
            Decision(
                LAYER_CONCURRENCY, ctx.route, SHED, SEND_STALLED, SOURCE_REQUEST, 0.0, now, details
            )
        )
        slot: HeldSlot | None = self.slot
        if slot is not None:
            slot.leave(False)
        self.send = self._closed
        if task is not None and not task.done():
            task.cancel()

    def _stalled_error(self) -> SendStalled:
        return SendStalled(
            f"fidelity_mw: the client took no part of the response of {self.ctx.route!r} "
            f"for {self.stall_s:g} s ([concurrency] send_stall_timeout_s): response ended",
            route=self.ctx.route,
            stalled_s=self.stall_s,
        )

    async def _closed(self, message: Message) -> None:
        """`send` once the response was ended for a stalled client: nothing more goes out
        (not even a last message the app sends after catching `SendStalled`)."""
        self.complete = False
        self.ctx.response_complete = False
        raise self._stalled_error()


# Its fields, in the table its instances share from the first request on (a field first
# set after the class's first ~30 instances, by a 500 held or a nested request, gave each
# watcher that set it a dict of its own: context.inline_fields)
WATCHER_FIELDS: Final = (
    *("send", "ctx", "end", "stall_s", "slot", "monotonic", "expired", "watch", "task"),
    *("started", "complete", "outer", "stalls", "stall_task", "stalled", "held"),
    *("held_exc", "released", "receive"),
)
inline_fields(ResponseWatcher, WATCHER_FIELDS)


class ClientReceive:
    """The `receive` the app gets on a route that measures its latency (slow calls, an
    adaptive limit): it counts how long the app waited for its request's body to come in
    before the response started (`DecisionContext.client_wait_s`), a read that ends in a
    cancel too (the deadline's, while the body still trickles in). Once the body is in, a
    read waits for the client to leave (Starlette's, beside a streamed response; an app's
    own, raced against its work): that waits alongside the app's work, and is not counted."""

    __slots__ = ("ctx", "done", "monotonic", "receive")

    def __init__(
        self, receive: Receive, ctx: DecisionContext, monotonic: Callable[[], float]
    ) -> None:
        self.receive = receive
        self.ctx = ctx
        self.monotonic = monotonic
        self.done = False  # the body's last message came

    async def __call__(self) -> Message:
        if self.done or self.ctx.status is not None:
            message: Message = await self.receive()
            if message["type"] == _GONE and self.ctx.status is None:
                self.ctx.client_disconnected = True  # (as `gone_receive`)
            return message
        monotonic = self.monotonic
        begun = monotonic()
        try:
            message = await self.receive()
        finally:
            ctx = self.ctx
            if ctx.status is None:
                ctx.client_wait_s += monotonic() - begun
        kind = message["type"]
        if kind != "http.request" or not message.get("more_body", False):
            self.done = True
            if kind == _GONE:
                ctx.client_disconnected = True  # (as `gone_receive`)
        return message


class GoneReceive:
    """`ResponseWatcher.gone_receive` as an object, for the compiled build: one native
    object per request, its call native too. Interpreted, the watcher's bound method
    stays: calling an instance of a Python class goes through `slot_tp_call`."""

    __slots__ = ("ctx", "receive")

    def __init__(self, receive: Receive, ctx: DecisionContext) -> None:
        self.receive = receive
        self.ctx = ctx

    async def __call__(self) -> Message:
        message: Message = await self.receive()
        if message["type"] == _GONE and self.ctx.status is None:
            self.ctx.client_disconnected = True  # (as `gone_receive`)
        return message


def response_ends(hook: ResponseEndHook, ctx: DecisionContext, scope: Scope, token: Any) -> None:
    try:
        hook(ctx, scope, token)
    except Exception:
        log_exception(logger, "before_response_end", "fidelity_mw: telemetry observer failed")


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def cancel_timer(
    timer: TimerHandle, owner: asyncio.AbstractEventLoop | None, loop: asyncio.AbstractEventLoop
) -> None:
    """Cancel `timer`, set on `owner`'s loop, from `loop`'s thread. One middleware may
    serve event loops in several threads, and a watch's one timer belongs to the loop
    that set it: a handle's `cancel` is not thread-safe (asyncio's updates its loop's
    timer bookkeeping unlocked; uvloop's stops a libuv timer, which only the loop's own
    thread may do). Another loop's handle is cancelled in its own thread, or left alone
    when that loop is closed (it never fires then)."""
    if owner is None or owner is loop:
        timer.cancel()
    elif not owner.is_closed():
        with contextlib.suppress(RuntimeError):  # closed meanwhile
            owner.call_soon_threadsafe(timer.cancel)


class DeadlineWatch:
    """One timer for every in-flight request of a middleware, not one per request.

    Armed requests sit in a dict with their deadline; the single timer is set for
    the earliest one known when it was set and, when it fires, expires every
    request past its deadline and sets itself for the next. Per request that is a
    dict insert and delete, where a timer handle each (`call_later` + `cancel`)
    cost several times more.
    """

    __slots__ = (
        "_call_later",
        "_loop",
        "_monotonic",
        "_recheck_at",
        "_timer",
        "_timer_at",
        "home",
        "inflight",
    )

    def __init__(self, monotonic: Callable[[], float], call_later: CallLater | None) -> None:
        self._monotonic = monotonic
        self._call_later = call_later  # None: the running event loop's
        self._timer: TimerHandle | None = None
        self._timer_at = math.inf
        # A timer this late (a second past its time) may belong to an event loop that
        # is gone: the next arming looks (once, then again a second later).
        self._recheck_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self.inflight: dict[ResponseWatcher, float] = {}
        # (the asyncgen hook a loop's run installed in its thread, that loop): see running_task
        self.home: tuple[object, asyncio.AbstractEventLoop] | None = None

    def running_task(self) -> asyncio.Task[Any] | None:
        """The current task, found the long way; remembers the running loop as `home`.

        On Python 3.11 `asyncio.get_running_loop()` (inside `asyncio.current_task()`)
        makes a getpid() system call, its fork check, every time: under a server, one
        system call more per request (about 1 µs with the caches it leaves cold, where
        the same call costs 0.1 µs in a tight loop). So arming first asks `home`'s loop
        for its current task when this thread's asyncgen `firstiter` hook is the one
        that loop installed as its run began (asyncio's and uvloop's loops install a
        new bound method per run, in the running thread, and put the old hook back when
        the run ends): then that loop runs in this thread, and its current task is ours.
        (A thread ident would not do: a stopped loop may be run again by another
        thread, where its current task is not this request's.) Any other hook: this
        lookup, which checks.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (trio): say why, not "no running event loop"
            error = RuntimeError(NOT_ASYNCIO)
            error.__suppress_context__ = True  # (by hand: compiled, `from` is dropped)
            raise error from None
        firstiter = get_asyncgen_hooks()[0]
        # a hook that is not this loop's (another library's) proves nothing: no home
        self.home = (firstiter, loop) if getattr(firstiter, "__self__", None) is loop else None
        return current_task(loop)

    def add(self, watcher: ResponseWatcher, deadline_at: float, now: float) -> None:
        self.inflight[watcher] = deadline_at
        if deadline_at < self._timer_at:
            self._schedule(deadline_at)
        elif self._recheck_at < now:
            if self._call_later is None and self._loop is not asyncio.get_running_loop():
                # an overdue timer of an event loop that is gone
                self._schedule(deadline_at)
            else:
                # a busy loop's timer is only late: no need to look at every request
                self._recheck_at = now + 1.0

    def _schedule(self, at: float) -> None:
        timer = self._timer
        call_later = self._call_later
        fire = self._fire
        if call_later is None:
            loop = asyncio.get_running_loop()
            if timer is not None:  # (the loop it was set on: `_loop`)
                cancel_timer(timer, self._loop, loop)
            self._loop = loop
            call_later = loop.call_later
        else:
            if timer is not None:  # a clock's timer: no loop's
                timer.cancel()
            # A clock's timer fires in whichever thread advances the clock, but the
            # expiry cancels this loop's tasks: only the loop's own thread may do that
            # (from another, the loop is not even woken up).
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
            fire = self._fire_in_loop
        self._timer_at = at
        self._recheck_at = at + 1.0
        # From the clock now, not the request's arrival: admission may have waited
        # (a bulkhead queue, a Redis round trip) and the timer would fire that much late.
        delay = at - self._monotonic()
        self._timer = call_later(delay if delay > 0.0 else 0.0, fire)

    def _fire_in_loop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed() or running_loop() is loop:
            self._fire()
        else:
            loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = self._recheck_at = math.inf
        now = self._monotonic()
        earliest = math.inf
        expired = []
        # a copy made in one step: loops in other threads arm and disarm meanwhile
        for watcher, at in list(self.inflight.items()):
            if at <= now:
                expired.append(watcher)
            elif at < earliest:
                earliest = at
        running = running_loop()
        for watcher in expired:
            task = watcher.task
            loop = task.get_loop() if task is not None else None
            if loop is None or loop is running or loop.is_closed():
                watcher.expire()
            else:
                # a request of a loop in another thread: cancelled there (from here
                # that loop is not even woken up, and the request hangs)
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(watcher.expire)
        if earliest < math.inf:
            self._schedule(earliest)


class StallWatch:
    """One timer for the body messages being sent on routes that bound a send's stall
    (`send_stall_timeout_s`), not one per message: per message a clock read, a dict
    insert and a delete (a timer handle each cost several times the message's own
    work). The timer is set for the earliest bound it knows; when it fires it stalls the
    sends past their bound and sets itself for the next. As sends end long before their
    bound, most firings find nothing to do: one per bound's length at most."""

    __slots__ = ("_call_later", "_loop", "_timer", "_timer_at", "monotonic", "waiting")

    def __init__(self, monotonic: Callable[[], float], call_later: CallLater | None) -> None:
        self.monotonic = monotonic
        self._call_later = call_later  # None: the running event loop's
        self._timer: TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one `_timer` was set on
        self._timer_at = math.inf
        self.waiting: dict[ResponseWatcher, float] = {}

    def _schedule(self, at: float) -> None:
        timer = self._timer
        call_later = self._call_later
        if call_later is None:
            loop = asyncio.get_running_loop()
            if timer is not None:
                cancel_timer(timer, self._loop, loop)
            self._loop = loop
            call_later = loop.call_later
        elif timer is not None:  # a clock's timer: no loop's
            timer.cancel()
        self._timer_at = at
        delay = at - self.monotonic()
        self._timer = call_later(delay if delay > 0.0 else 0.0, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self.monotonic()
        earliest = math.inf
        stalled = []
        for watcher, at in list(self.waiting.items()):  # (a copy: other loops' threads)
            if at <= now:
                stalled.append(watcher)
            elif at < earliest:
                earliest = at
        for watcher in stalled:
            self.waiting.pop(watcher, None)
            watcher.stall()
        if earliest < math.inf:
            self._schedule(earliest)


class OutcomeRecorder:
    """Reports how an admitted request ended: to the route breaker, and refunds.

    With an in-process store (`record_now` / `refund_now` set) it is done before
    returning; with a remote one the work comes back as a coroutine for the
    middleware to await after the response went out (or to spawn, when unwinding).
    """

    def __init__(self, store: StateStore, monotonic: Callable[[], float]) -> None:
        self.store = store
        self.monotonic = monotonic
        self.record_now = store.record_now
        self.refund_now = store.refund_now
        self._background: set[asyncio.Task[Any]] = set()

    def after_error(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
        exc: BaseException,
        complete: bool = False,
    ) -> Coroutine[Any, Any, Any] | None:
        """The app raised `exc`. With `complete`, its response had gone out whole: an
        error after a response below 500 came after it (a background task, which
        Starlette runs after the last body message) and the request counts as its
        response says, not as a failure: a failing e-mail task must not open the breaker
        of the route that answered. (A 5xx then is the answer to `exc` itself, e.g.
        Starlette's ServerErrorMiddleware inside ours answers 500, then re-raises.)"""
        status = ctx.status
        if complete and status is not None and status < 500 and not ctx.client_disconnected:
            return self.after_app(ctx, plan, result, keys, True)
        ctx.decided_by = DECIDED_BY_APP
        if ctx.client_disconnected or isinstance(exc, asyncio.CancelledError | ClientDisconnect):
            ctx.outcome = OUTCOME_DISCONNECTED
            ctx.client_disconnected = True
            outcome = IGNORED
        elif ctx.shed_by is not None and isinstance(exc, Exception) and raised_by_refusal(exc):
            # e.g. CircuitOpen left uncaught: the 500 is the outbound layer's decision (not
            # an error of the app's own after a refusal it handled: `raised_by_refusal`)
            return self.shed_downstream(ctx, plan, result, keys)
        elif isinstance(exc, Exception):
            ctx.outcome = OUTCOME_FAILED
            if (ctx.upstream_exhausted or ctx.upstream_failed) and raised_by_upstream(exc):
                if charged_for_upstream(ctx):  # a host the client chose: its own doing
                    return self.finish(ctx, plan, result, IGNORED)
                # the upstream's fault: not the client's quota; and when a breaker for the
                # upstream counted it, not the route breaker's either (`owned_upstream`)
                # (an upstream's 429 given up on: no breaker's failure, ours neither)
                owned = IGNORED if upstream_throttled(exc) else owned_upstream(ctx)
                pending = self.finish(ctx, plan, result, owned)
                return _in_order(pending, self.refund(plan, result, keys, served_only=True))
            return self.finish(ctx, plan, result, FAILURE)
        else:  # KeyboardInterrupt, SystemExit: not the route's fault
            outcome = IGNORED
        return self.finish(ctx, plan, result, outcome)

    def refused(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
    ) -> Coroutine[Any, Any, Any] | None:
        """The middleware answered a control decision for the app (an outbound refusal
        that escaped it, or the deadline): not the route's failure, and the limits that
        charge only served requests get their units back."""
        pending = self.finish(ctx, plan, result, IGNORED)  # frees a probe slot, if any
        if charged_for_upstream(ctx):  # (a host the client chose failed, hung or was refused)
            return pending
        return _in_order(pending, self.refund(plan, result, keys, served_only=True))

    def after_app(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
        complete: bool,
    ) -> Coroutine[Any, Any, Any] | None:
        ctx.decided_by = DECIDED_BY_APP
        status = ctx.status
        breaker = plan.breaker
        if (status is not None and not complete) or ctx.client_disconnected:
            # The app stopped mid-response without an error: the client went away
            # (Starlette's streaming responses end quietly on http.disconnect). Or it
            # read the client leaving before it answered (`gone_receive`): nobody took it.
            ctx.outcome = OUTCOME_DISCONNECTED
            ctx.client_disconnected = True
            outcome = IGNORED
        elif reports_refusal(ctx, status):
            return self.shed_downstream(ctx, plan, result, keys)
        elif (plan.slash_redirect and (status == 307 or status == 308)) or (
            plan.not_allowed and status == 405
        ):
            # The router's own trailing-slash redirect: not the resource. A client that
            # follows it pays for the request it lands on; `charge = "always"` limits
            # keep this charge too. No retry credit: nothing failed. So too the router's
            # 405 (a method no route of the path serves): it never reached an endpoint.
            ctx.outcome = OUTCOME_SERVED
            pending = self.finish(ctx, plan, result, SUCCESS)
            return _in_order(pending, self.refund(plan, result, keys, True, False))
        elif reports_upstream(ctx, status):
            # the outbound layer gave up on an upstream, or the upstream failed a call our
            # breaker for it counted, and the answer says so: not the client's quota (its
            # retry, which we did not make, is paid from the credit the refund earns)
            ctx.outcome = OUTCOME_FAILED
            if charged_for_upstream(ctx):  # a host the client chose: charged, not the route's
                return self.finish(ctx, plan, result, IGNORED)
            failed = status is None or (breaker is not None and status in breaker.failure_statuses)
            owned = owned_upstream(ctx) if failed else SUCCESS
            pending = self.finish(ctx, plan, result, owned)
            return _in_order(pending, self.refund(plan, result, keys, served_only=True))
        elif status is None or (breaker is not None and status in breaker.failure_statuses):
            ctx.outcome = OUTCOME_FAILED
            outcome = FAILURE
        else:
            ctx.outcome = OUTCOME_SERVED if status < 500 else OUTCOME_FAILED
            outcome = SUCCESS
        gate = result.gate if result is not None else None
        if breaker is None or gate is None or plan.breaker_key is None:
            return None
        if breaker.slow_call_ms is None and outcome == SUCCESS and self.record_now is not None:
            # A success never opens the breaker and lands in a 3 s bucket: the
            # start time is close enough and saves a clock read per request.
            pending = self.record(
                ctx.route, plan.breaker_key, breaker, gate, outcome, False, ctx.started_at
            )
            # (a coroutine: the store needs a round trip, a probe's outcome)
            return None if pending is None else _noting(pending, ctx, gate.state)
        return self.finish(ctx, plan, result, outcome)

    def shed_downstream(
        self,
        ctx: DecisionContext,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
    ) -> Coroutine[Any, Any, Any] | None:
        """An outbound control layer refused the app's upstream call before sending it,
        and the app answered with an error (or a per-route form rejected the request
        inside the app, e.g. `Depends(limit)`'s 429). That layer decided: the route breaker does
        not count it (no second breaker on the same evidence) and the limits get their
        units back (a request rejected by one layer consumes no quota of another)."""
        shed_by = ctx.decided_by = ctx.shed_by
        assert shed_by is not None
        outcome = ctx.outcome = shed_outcome(ctx, shed_by)
        limited = outcome == OUTCOME_REJECTED
        pending = self.finish(ctx, plan, result, IGNORED)  # frees a probe slot, if any
        if not limited and charged_for_upstream(ctx):
            return pending  # our refusal of a host the client chose: still its request
        # another limit's 429 is the client's own doing: its units come back, no retry credit
        return _in_order(pending, self.refund(plan, result, keys, credit=not limited))

    def refund(
        self,
        plan: RoutePlan,
        result: InboundResult | None,
        keys: Sequence[str],
        served_only: bool = False,
        credit: bool = True,
    ) -> Coroutine[Any, Any, Any] | None:
        """Give the admitted limits their units back (now, or as a coroutine); with
        `served_only`, only those with `charge = "served"`; without `credit`, the
        refund earns no retry credit (`RateLimit.retry_credit_s`)."""
        if result is None or not result.admitted or not keys:
            return None
        served = plan.served
        charged = [
            i
            for i, verdict in enumerate(result.limits)
            if verdict.allowed and (not served_only or served[i])
        ]
        if not charged:
            return None
        charged_keys = [keys[i] for i in charged]
        if credit:
            specs = plan.specs
            charged_specs = [specs[i] for i in charged]
        else:
            # No new credit; but a limit that admitted from retry credit gets back the
            # credit it spent: its refund returns the cost as credit, nothing to the
            # bucket (`decide.gcra.credit_verdict`), as a refund that earns credit does.
            limits, specs = result.limits, plan.specs_without_credit
            charged_specs = [plan.specs[i] if limits[i].credit else specs[i] for i in charged]
        charged_tats = [result.limits[i].tat for i in charged]  # units that refilled stay spent
        now = self.monotonic()
        refund_now = self.refund_now
        if refund_now is None:
            fleet = result.fleet  # said only when set: a store of the user's may not know it
            if fleet is not None:
                return self.store.refund(
                    charged_keys, charged_specs, result.source, now, charged_tats, fleet=fleet
                )
            return self.store.refund(charged_keys, charged_specs, result.source, now, charged_tats)
        try:
            refund_now(charged_keys, charged_specs, now, charged_tats)
        except Exception:
            log_exception(logger, "refund", "fidelity_mw: could not refund quota of %s", plan.route)
        return None

    def finish(
        self, ctx: DecisionContext, plan: RoutePlan, result: InboundResult | None, outcome: str
    ) -> Coroutine[Any, Any, Any] | None:
        """Report the outcome to the breaker: done at once in process, else a coroutine."""
        breaker = plan.breaker
        gate = result.gate if result is not None else None
        if gate is None or breaker is None or plan.breaker_key is None:
            return None
        now = self.monotonic()
        ended = ctx.ended_at if ctx.ended_at is not None else now
        slow = breaker.slow_call_ms is not None and (
            (ended - ctx.started_at - ctx.client_wait_s) * 1000.0 >= breaker.slow_call_ms
        )
        pending = self.record(ctx.route, plan.breaker_key, breaker, gate, outcome, slow, now)
        if pending is not None and (gate.verdict != _ALLOW or outcome != SUCCESS or slow):
            # a shared store's answer may move the breaker (a probe's success closes it, a
            # failure opens it), which no decision says: noted for the gauge
            return _noting(pending, ctx, gate.state)
        return pending

    def record(
        self,
        route: str,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        at: float,
    ) -> Coroutine[Any, Any, Any] | None:
        """One outcome to the breaker: done in process when the store's fast path takes
        it (None; a failure there is logged, never raised), else the store's coroutine (a
        remote store, or a gate only Redis settles, as a tiered probe)."""
        record_now = self.record_now
        if record_now is not None:
            try:
                if record_now(breaker_key, breaker, gate, outcome, slow, at) is not None:
                    return None
            except Exception:
                log_exception(
                    logger, "record", "fidelity_mw: could not record the outcome of %s", route
                )
                return None
        return self.store.record(breaker_key, breaker, gate, outcome, slow, at)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Record to a remote store without holding up the unwinding request."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _noting(record: Coroutine[Any, Any, Any], ctx: DecisionContext, gate_state: str) -> None:
    """Record, and note the route breaker's state afterwards when the outcome moved it
    (`DecisionContext.note_breaker`, read by the breaker gauge)."""
    state = await record
    if isinstance(state, str) and state and state != gate_state:
        ctx.note_breaker(ctx.route, "route", state)


def _in_order(*steps: Coroutine[Any, Any, Any] | None) -> Coroutine[Any, Any, None] | None:
    if all(step is None for step in steps):
        return None
    return _run_in_order(steps)


async def _run_in_order(steps: Sequence[Coroutine[Any, Any, Any] | None]) -> None:
    for step in steps:
        if step is not None:
            await step


def owned_upstream(ctx: DecisionContext) -> str:
    """The route breaker's outcome for an answer that reports an upstream's failure: none
    when a breaker for that upstream counted it (`upstream_failed`: ours, or one past a
    trusted callee that said so), which owns the fault. Counted here too, one upstream's
    outage opened the route breaker of every hop above it (A's for a fault of C's that
    B's breaker for C owned), which then shed the requests of the route's healthy
    upstreams and, after the fault, held them a whole open period more than the breaker
    next to it did. With `breaker = false` on the upstream nobody else counts it: the
    route breaker does, as before. An upstream's 429 given up on (`upstream_throttled`)
    is nobody's failure: counted here, C throttling B opened B's route breaker."""
    return IGNORED if ctx.upstream_failed or ctx.upstream_throttled else FAILURE
