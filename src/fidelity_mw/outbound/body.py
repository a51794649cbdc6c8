"""A body that breaks after its head: the call counts as failed after all.

The transport records an attempt's outcome when the response's head arrives and hands
the response back; its body is read later, by the caller (`client.stream(...)`, an SSE
or LLM token stream, a download). An upstream that answers 200 and then drops the
connection mid-body would look healthy to its breaker, and a service instance doing it
would keep its share of calls. So the final answer of a call recorded as a success, its
body still to be read, gets its stream wrapped (`watch_body`): chunks pass through, and
when the upstream breaks the body (an `httpx` network error, timeout or remote protocol
error while reading) the failure is reported once, then the same exception goes on to
the caller:

- to the breaker the call was counted on (the host's, or the service instance's) as
  `BROKEN`, which turns the call's success into a failure (decide/breaker.py), through
  the store like any outcome: in-process state at once; a remote store in a task of its
  own (held in `_RECORDS`), never awaited by the caller's read; the blocking transport's
  remote store on a background thread; at most `MAX_PENDING_REPORTS` of those pending,
  the rest dropped and counted (`dropped()`); a report left pending by an event loop
  closed before it ended gives its room back when the bound is reached;
- as a `Decision` on the call's context: layer `breaker`, verdict `fail`, reason
  `failed_in_body`, details `error` (the exception's class) and `bytes` (read before
  the break), and `instance` for a service.

The caller closing the response early or its client (the transport closed: the pool
drops the connection, a `ReadError` of ours), a cancellation, or a decoding error above the
stream report nothing: they say nothing about the upstream. Save the cancellation by the
request's own deadline (the middleware cancels the app at it): an upstream that sends its
head at once and then trickles its body never lets a read wait the attempt timeout
(httpx's timeouts are per read), so the deadline is what ends it, as a timeout would an
upstream that hangs; it counts as a body that broke (a `ReadTimeout`), unless that
deadline was under half the attempt timeout (`Watch.cut_by_deadline`). Uncounted, an
instance of a service trickling its bodies kept its share of calls, each waiting out the
whole deadline, and no breaker ever opened. A report that fails (the
store down) is logged, throttled, and never reaches the caller's read. Bodies already in
memory (`httpx.ByteStream`: a `MockTransport` handler's `content=`) are not wrapped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final, NamedTuple

import httpx

from .._logs import warn
from ..context import GIVE_UP, LAYER_BREAKER, LAYER_RETRY, Decision, DecisionContext
from ..decide.breaker import BROKEN, OPEN, Gate, open_time
from ..decide.retry import GIVE_UP_FAILED_AFTER_RETRY
from ..policy import BreakerConfig
from .decisions import GIVE_UP_EXTENSION, mark
from .upstream import Instance

logger = logging.getLogger("fidelity_mw")

FAIL: Final = "fail"  # the verdict: the breaker counted the call as failed
FAILED_IN_BODY: Final = "failed_in_body"
# What breaking a body is: the upstream's doing. (Not a `LocalProtocolError`, our own
# misuse, nor a `DecodingError`, raised above the stream.)
UPSTREAM_FAULTS: Final = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
_NOT_RECORDED: Final = "fidelity_mw: could not record a broken body of %s: %s"
_MAX_WATCHERS: Final = 64
# A cancellation this close before the deadline is the deadline's (its timer's rounding)
_DEADLINE_SLACK_S: Final = 0.005

# Reports to a remote store, sent without the caller waiting: held until they end.
_RECORDS: Final[set[asyncio.Task[Any]]] = set()
# The blocking transport's reports to a remote store: one thread, made on first use.
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_executor_lock: Final = threading.Lock()
# At most this many reports to a remote store pending at once (tasks and the blocking
# transport's queue together); past it a report is dropped and counted (`dropped()`,
# and the store's `stats.dropped_records` where it keeps one). A slow store (each call
# up to its `timeout_ms`) behind an upstream that breaks many bodies at once held a task
# per break, and the one worker thread's queue grew for as long as the breaks came
# faster than it could send them. The breaker has long had its evidence by then.
MAX_PENDING_REPORTS: Final = 256
# [the blocking transport's reports queued, reports dropped] (under _executor_lock); the
# tasks pending are those in `_RECORDS`
_pending = [0, 0]
_DROPPED: Final = "fidelity_mw: %d reports of broken bodies to a slow state store dropped"


def dropped() -> int:
    """How many broken-body reports to a remote store were dropped (pending at the bound)."""
    return _pending[1]


def _take(store: Any, start: Callable[[], asyncio.Task[Any]] | None = None) -> bool:
    """Room for one more pending report (True), or it is dropped and counted. `start`
    makes the report's task, held in `_RECORDS` (its room, under the lock: loops in
    other threads take room too); without it, a place in the blocking queue."""
    with _executor_lock:
        if len(_RECORDS) + _pending[0] >= MAX_PENDING_REPORTS:
            _forget_closed_loops()
        if len(_RECORDS) + _pending[0] < MAX_PENDING_REPORTS:
            if start is None:
                _pending[0] += 1
            else:
                _RECORDS.add(start())
            return True
        _pending[1] += 1
        total = _pending[1]
    stats = getattr(store, "stats", None)
    if stats is not None and isinstance(getattr(stats, "dropped_records", None), int):
        stats.dropped_records += 1
    warn(logger, "body_dropped", _DROPPED, total)
    return False


def _done() -> None:
    with _executor_lock:
        _pending[0] -= 1


def _forget_closed_loops() -> None:
    """(Under the lock, at the bound.) Let go of the report tasks whose event loop is
    closed: a loop closed without running its pending tasks to their end (its own
    `run_until_complete`, then `close`) never ends them, nor runs the callback that gives
    their room back (a task done, its callback not yet run, too). Held, each kept its
    room, and enough such loops dropped every later report, in every loop."""
    for task in list(_RECORDS):
        try:
            closed = task.get_loop().is_closed()
        except Exception:  # (a task of another make: left as it is)
            continue
        if not closed:
            continue
        _RECORDS.discard(task)
        # it will never run: no "destroyed but pending" line when it is collected, nor
        # "never awaited" for a report that had not begun
        with contextlib.suppress(Exception):
            task._log_destroy_pending = False  # type: ignore[attr-defined]
        coro = task.get_coro()
        if inspect.iscoroutine(coro) and inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
            coro.close()


# Set on the error of a body that broke while read (`Watch.broke`): counted by our
# breaker for the upstream, so the middleware answers it, let out, as the upstream's
# failure (a 502 marked `x-fidelity-fault: upstream`), not the app's bare 500.
BROKEN_BODY: Final = "fidelity_broken_body"


class Watch(NamedTuple):
    """What a broken body is reported to: the call's context and the breaker its success
    was counted on (`gate` None: no breaker counted it, the balancer went around an open
    one; only the instance's evidence and the decision then). A tuple: the transport's
    shortcut builds it in one C call (`tuple.__new__`, every field given), no frame."""

    ctx: DecisionContext
    subject: str
    store: Any
    local: Any
    breaker_key: str
    breaker: BreakerConfig | None  # (None: `breaker = false`, the balancer's weight only)
    gate: Gate | None
    source: str
    target: Instance | None
    # [True] once the transport that handed out the body is closed: the caller's close
    # cut it (the pool drops the connection: a ReadError), not the upstream
    shut: list[bool] | None = None
    attempts: int = 1  # the call's attempts, this answer's included
    # The attempt timeout of the upstream's plan (its `[[upstream]]` entry's), carried: the
    # subject cannot always say its host (`fd00::5:8080`: an IPv6 address and a port?).
    # None: looked up by the subject (a watch built outside the transport).
    attempt_timeout_s: float | None = None

    def broke(self, exc: BaseException, read: int, blocking: bool) -> None:
        """Report the broken body: the breaker, the instance, the decision. Never raises."""
        shut = self.shut
        if shut is not None and shut[0]:
            return
        if self.breaker is None:
            # No breaker for the upstream (`breaker = false`): nobody counts the break (the
            # route breaker does, if the app lets it out: the app's 500), but the balancer
            # weighs the instance up as after a failed attempt, which it does breaker or
            # none. Unweighed, an instance answering heads and breaking every body kept a
            # third of a service's calls (its head as quick as the others').
            if self.target is not None:
                with contextlib.suppress(Exception):
                    self.target.failed_at = self.ctx.engine.clock.monotonic()
            return
        try:
            self._decide(exc, read)
            mark(self.ctx, False, None, True)  # (our 5xx for it: the upstream's fault)
            with contextlib.suppress(Exception):  # (an error that takes no attribute)
                setattr(exc, BROKEN_BODY, True)  # (the middleware's answer, if let out)
            if self.attempts > 1:
                self._exhausted(exc)
            target = self.target
            if target is not None:
                if self.gate is None:
                    target.answered = False  # the attempt around its open breaker failed
                # a failure after all: the balancer weighs the instance up for a while, as
                # after an attempt that failed (`decide.balance.failure_weight`)
                target.failed_at = self.ctx.engine.clock.monotonic()
            if self.gate is not None:
                self._record(blocking)
        except Exception as failure:  # never into the caller's read
            warn(logger, "body", _NOT_RECORDED, self.subject, failure)

    def cut_by_deadline(self) -> bool:
        """Was the read just cancelled by the request's deadline (passed now), one at least
        half the upstream's attempt timeout long? (A caller's shorter deadline is no
        evidence against the upstream, as for an attempt it cuts: `deadline_spent`.)"""
        ctx = self.ctx
        deadline_at = ctx.deadline_at
        if deadline_at is None:
            return False
        now = ctx.engine.clock.monotonic()
        if now < deadline_at - _DEADLINE_SLACK_S:
            return False  # someone else's cancellation
        timeout_s = self.attempt_timeout_s
        if timeout_s is None:
            subject = self.subject
            host = subject.rsplit(":", 1)[0] if subject.count(":") == 1 else subject
            timeout_s = ctx.engine.policy.upstream_for(host).attempt_timeout_ms / 1000.0
        return deadline_at - ctx.started_at >= timeout_s * 0.5

    def _decide(self, exc: BaseException, read: int) -> None:
        ctx = self.ctx
        clock = ctx.engine.clock
        details: dict[str, str | int] = {"error": type(exc).__name__, "bytes": read}
        if self.target is not None:
            details["instance"] = self.target.key
        ctx.decisions.append(
            Decision(LAYER_BREAKER, self.subject, FAIL, FAILED_IN_BODY, self.source, 0.0,
                     clock.monotonic(), details)
        )  # fmt: skip

    def _exhausted(self, exc: BaseException) -> None:
        """The call retried, and its last answer broke: this hop owned the call's retries,
        so it is exhausted as after a last attempt that failed (`failed_after_retry`),
        and our callers are told not to send the whole round again. Said on the error
        too, for the middleware's answer to it when the app lets it out (a 502)."""
        ctx = self.ctx
        decision = Decision(
            LAYER_RETRY, self.subject, GIVE_UP, GIVE_UP_FAILED_AFTER_RETRY, self.source, 0.0,
            ctx.engine.clock.monotonic(), {"attempts": self.attempts, "error": type(exc).__name__},
        )  # fmt: skip
        ctx.decisions.append(decision)
        mark(ctx, True, None)
        with contextlib.suppress(Exception):  # (an error that takes no attribute)
            setattr(exc, GIVE_UP_EXTENSION, decision)

    def _record(self, blocking: bool) -> None:
        gate = self.gate
        assert gate is not None
        now = self.ctx.engine.clock.monotonic()
        args = (self.breaker_key, self.breaker, gate, BROKEN, False, now)
        local = self.local
        if local is not None:  # in process: at once
            self.learned(local.record(*args), now)
            return
        store = self.store
        if blocking:
            sync = getattr(store, "record_sync", None)
            if sync is not None:
                if _take(store):
                    try:
                        _background().submit(self._sync, sync, args)
                    except BaseException:  # (shut down at exit)
                        _done()
                        raise
                return
            # (a store of its own without a blocking client: on the worker thread's loop)
            import anyio.from_thread

            self.learned(anyio.from_thread.run(store.record, *args), now)
            return
        loop = asyncio.get_running_loop()

        def start() -> asyncio.Task[Any]:
            task = loop.create_task(store.record(*args))
            task.add_done_callback(self._recorded)  # (gives its room back: leaves the set)
            return task

        _take(store, start)

    def _sync(self, record: Any, args: tuple[Any, ...]) -> None:
        try:
            self.learned(record(*args), args[-1])
        except Exception as failure:
            warn(logger, "body", _NOT_RECORDED, self.subject, failure)
        finally:
            _done()

    def _recorded(self, task: asyncio.Task[Any]) -> None:
        _RECORDS.discard(task)
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:
            warn(logger, "body", _NOT_RECORDED, self.subject, failure)
            return
        self.learned(task.result(), self.ctx.engine.clock.monotonic())

    def learned(self, state: Any, now: float) -> None:
        """A service instance's breaker state after the report (the balancer ejects an
        instance whose breaker it opened, as after any attempt that opens it)."""
        target = self.target
        breaker = self.breaker
        if target is None or breaker is None or not isinstance(state, str) or not state:
            return
        target.seen_at = now
        target.open_until = now + open_time(breaker, 0) if state == OPEN else 0.0


def _background() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fidelity-body")
        return _executor


class _Watched:
    """A response body passed through, its break reported once (`Watch.broke`)."""

    def __init__(self, inner: Any, watch: Watch) -> None:
        self._inner = inner
        self._watch: Watch | None = watch

    def _broke(self, exc: BaseException, read: int, blocking: bool) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.broke(exc, read, blocking)


class WatchedAsyncStream(_Watched, httpx.AsyncByteStream):
    """An async body (httpx.AsyncHTTPTransport's), watched. Its own iterator, not an async
    generator: each of those costs the event loop's first-iteration hook and a weak
    reference in its set of generators, more than the watching itself (most bodies are
    one or two chunks)."""

    _next: Any  # the inner body's iterator's __anext__
    _read = 0

    def __aiter__(self) -> WatchedAsyncStream:
        self._next = self._inner.__aiter__().__anext__
        self._read = 0
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = await self._next()
        except UPSTREAM_FAULTS as exc:
            self._broke(exc, self._read, False)
            raise
        except asyncio.CancelledError:
            watch = self._watch
            if watch is not None and watch.cut_by_deadline():
                cut = httpx.ReadTimeout("the request's deadline passed while the body was read")
                self._broke(cut, self._read, False)
            raise
        self._read += len(chunk)
        return chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class WatchedSyncStream(_Watched, httpx.SyncByteStream):
    """A blocking body (httpx.HTTPTransport's), watched."""

    def __iter__(self) -> Iterator[bytes]:
        read = 0
        try:
            for chunk in self._inner:
                read += len(chunk)
                yield chunk
        except UPSTREAM_FAULTS as exc:
            self._broke(exc, read, True)
            raise

    def close(self) -> None:
        self._inner.close()


class WatchedStream(WatchedAsyncStream, WatchedSyncStream):
    """A body that is both (an inner transport's own stream class), watched both ways."""


# A body's stream class -> the class that watches it (`watch_body` learns them): the
# transport's shortcut wraps a body of a class seen before without the function's call.
WATCHERS: Final[dict[type, Any]] = {}


def watch_body(response: httpx.Response, watch: Watch) -> None:
    """Wrap the body of a response recorded as a success (its stream not in memory), as
    the kind of stream it is: a sync read of an async body still fails as httpx says."""
    stream = response.stream
    kind = type(stream)
    watcher = WATCHERS.get(kind)
    if watcher is None:
        if isinstance(stream, httpx.AsyncByteStream):
            if isinstance(stream, httpx.SyncByteStream):
                watcher = WatchedStream
            else:
                watcher = WatchedAsyncStream
        elif isinstance(stream, httpx.SyncByteStream):
            watcher = WatchedSyncStream
        else:
            return
        if len(WATCHERS) < _MAX_WATCHERS:  # (classes made at run time: bounded)
            WATCHERS[kind] = watcher
    response.stream = watcher(stream, watch)
