"""Hedged requests: a slow idempotent call gets another attempt, and the first answer wins.

`FidelityTransport` (async) races the call's attempt loop against up to
`max_hedges` hedge loops (`attempts(..., hedge=True)`), each started when the
delay passes with no answer: the upstream's `[upstream.hedge]` `after_ms`, or
the p95 of its recent attempt latencies (`LatencyWindow`, in process memory)
once there are `min_samples` of them, while the call's own attempt is out
(a failed attempt stops the timer: its retry, after the backoff, starts it
again; `Race.pause`). A hedge is an attempt like a retry: it
asks the retry budget and the breaker, goes to another instance of a service,
and counts in the decision record and `x-fidelity-attempt`. The first good
answer wins; the other loops are cancelled (they release what they hold and
close any response they got). A failed hedge does not end the call: the
primary loop's own answer (retries included) stands unless a hedge answers well.
A retry of the call with no instance left that it did not try waits while a hedge is
still out (`Race.out`, `Race.settled`) rather than send the request to that instance a
second time at once.

The sync transport does not hedge: a blocking call has no second thread to race on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import httpx

from .._types import Clock
from ..decide.retry import IDEMPOTENT_METHODS
from . import wire as _wire
from .wire import SPEND_MAX_BYTES, replayable, unread, worth_reading

HEDGE: Final = "hedge"  # the retry layer's verdict on a hedge attempt
SLOW_ATTEMPT: Final = "slow_attempt"  # why: no answer within the hedge delay
NO_HEDGE: Final = "no_hedge"  # a hedge the budget or a breaker refused (reason)
HEDGE_PAUSED: Final = "retry_pause"  # why no hedge: a 429's Retry-After pauses retries

_WINDOW: Final = 256  # attempt latencies kept per upstream
_REFRESH: Final = 16  # samples between two p95 computations


class NoHedge(Exception):
    """The hedge was refused before it was sent (recorded as a `no_hedge` decision)."""


class Race:
    """One hedged call's shared state: the attempts it sent, the instances they went to,
    and whether the hedge timer runs.

    The timer runs only while the call's own attempt is out and has not answered: a
    hedge is for a slow attempt. Once that attempt has failed, the retry path owns the
    next attempt (after its backoff, as Envoy does: it hedges on a per-try timeout,
    never on a failure), so the call's loop pauses the timer when its attempt answers
    and starts it again, with the whole delay, when it sends its retry."""

    __slots__ = ("delay_s", "inbox", "out", "paused", "sent", "targets", "waiter")

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.sent = 0
        # The `upstream.Instance`s sent to (not positions: the service's list may be renamed).
        self.targets: list[Any] = []
        # The instances an attempt of the call is out to now (sent, no answer yet): a retry
        # that has no instance left it did not try waits for them (`settled`) rather than
        # send the same request again to one of them.
        self.out: list[Any] = []
        self.paused = False
        self.inbox: _Inbox | None = None  # the running race's (`run_race`)
        self.waiter: anyio.Event | None = None  # the call's retry waiting (`settled`)

    def next(self) -> int:
        """The number of the attempt about to be sent (1 for the first)."""
        self.sent += 1
        return self.sent

    def pause(self) -> None:
        """The call's attempt answered: no hedge until it sends another one (`resume`)."""
        self.paused = True
        inbox = self.inbox
        if inbox is not None and inbox.timer is not None:
            inbox.timer.cancel()

    async def settled(self) -> None:
        """Wait until no attempt of the call is out any more (`out` is empty), each
        attempt's loop having posted its outcome: a good one ends the race, and with it
        this wait (cancelled); a failure lets the retry be decided again."""
        while self.out:
            self.waiter = waiter = anyio.Event()
            await waiter.wait()
        inbox = self.inbox
        if inbox is not None and inbox.won:
            # (the race has its winner, or is about to pick it: its end cancels this wait,
            # and a retry decided meanwhile would only be taken and given back)
            await anyio.sleep_forever()

    def landed(self) -> None:
        """An attempt loop of the call posted its outcome: a waiting retry looks again."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            waiter.set()

    def resume(self) -> None:
        """The call's loop sends an attempt (its retry): the hedge delay starts again."""
        self.paused = False
        inbox = self.inbox
        if inbox is not None and inbox.wake is not None:
            inbox.wake.set()


class LatencyWindow:
    """The last attempt latencies of one upstream, and their p95 (recomputed every few
    samples: a call reads it, it need not be exact)."""

    __slots__ = ("_at", "_p95", "_since", "samples")

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._at = 0
        self._since = 0
        self._p95: float | None = None

    def add(self, seconds: float) -> None:
        if len(self.samples) < _WINDOW:
            self.samples.append(seconds)
        else:
            self.samples[self._at] = seconds
            self._at = (self._at + 1) % _WINDOW
        self._since += 1

    def p95(self, min_samples: int) -> float | None:
        """The p95 of the window; None until it holds `min_samples`."""
        n = len(self.samples)
        if n < min_samples:
            return None
        if self._p95 is None or self._since >= _REFRESH:
            ordered = sorted(self.samples)
            self._p95 = ordered[min(n - 1, int(0.95 * n))]
            self._since = 0
        return self._p95


def hedge_delay(after: str, after_ms: int, min_samples: int, window: LatencyWindow | None) -> float:
    """Seconds to wait for an answer before hedging."""
    if after == "p95" and window is not None:
        p95 = window.p95(min_samples)
        if p95 is not None:
            return p95
    return after_ms / 1000.0


def hedgeable(request: httpx.Request, retried: frozenset[str] = IDEMPOTENT_METHODS) -> bool:
    """An idempotent method that the upstream's policy retries (`retried`), and a body two
    attempts can send at once: bytes in memory.

    A method that is not idempotent is never hedged, not even when `[upstream.retry]
    methods` retries it: a retry follows an attempt that failed, a hedge runs while the
    first attempt may still be doing the work, and both would do it at once.

    An `Idempotency-Key` makes a request retryable, not hedgeable: a hedge is a second
    request while the first is still in progress, which is what the IETF draft has the
    server answer 409 for (a key in use), and that answer, no failure, won the race over
    the first request that went on to do the work. A multipart file object is no body to
    hedge either, replayable as it is for a retry: httpx rewinds it and reads it in chunks
    as it sends, so a hedge reading it while the first attempt still sends would leave
    each attempt part of the file."""
    method = request.method
    if method not in IDEMPOTENT_METHODS or method not in retried:
        return False
    stream = request.stream
    if type(stream) is httpx.ByteStream:
        return True
    return replayable(stream) and all(
        isinstance(getattr(part, "file", b""), str | bytes)
        for part in getattr(stream, "fields", ())
    )


def copy_request(request: httpx.Request, url: httpx.URL) -> httpx.Request:
    """A request of its own for a hedge, to `url`: the loop rewrites URL, headers and
    timeouts of the request it sends."""
    return httpx.Request(
        request.method,
        url,
        headers=request.headers.copy(),
        stream=request.stream,
        extensions=dict(request.extensions),
    )


def _good(response: httpx.Response | None, retry_statuses: frozenset[int]) -> bool:
    return (
        response is not None
        and response.status_code < 500
        and (response.status_code not in retry_statuses)
    )


async def _close(response: httpx.Response | None) -> None:
    if response is None:
        return
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(Exception):  # a broken connection is closed enough
            await response.aclose()


async def _drain(response: httpx.Response | None) -> None:
    """Close an answer that came in whole but lost the race (a failed hedge's 503, the
    call's own answer given up on when a hedge won), read to its end first when it is
    short (`wire.worth_reading`), as a failed attempt's before its retry: closed unread,
    its HTTP/1.1 connection was dropped. At most `SPEND_MAX_S` (real time: it is I/O; the
    request's own read timeout is back on it by now). A loser still running is cancelled,
    not drained (`_close`)."""
    if response is None:
        return
    stream = response.stream
    if worth_reading(response) and unread(response) and isinstance(stream, httpx.AsyncByteStream):
        with anyio.move_on_after(_wire.SPEND_MAX_S), contextlib.suppress(Exception):
            read = 0
            async for chunk in stream:
                read += len(chunk)
                if read > SPEND_MAX_BYTES:
                    break
    await _close(response)


_DRAINING: Final[set[asyncio.Task[None]]] = set()  # (held until they end)


async def _drain_later(response: httpx.Response | None) -> None:
    """`_drain` in a task of its own: the race (and the winner's answer) is not held back
    while a loser's body is read."""
    if response is None:
        return
    if not worth_reading(response):
        await _close(response)
        return
    try:
        task = asyncio.get_running_loop().create_task(_drain(response))
    except RuntimeError:  # (not on asyncio: closed at once, dropped with its connection)
        await _close(response)
        return
    _DRAINING.add(task)
    task.add_done_callback(_DRAINING.discard)


Outcome = tuple[int, httpx.Response | None, Exception | None]


class _Inbox:
    """Outcomes of the call's attempt loops, and the wait they end (the hedge delay's
    sleep, or a plain wait once no hedge is left to send)."""

    __slots__ = ("outcomes", "retry_statuses", "timer", "wake", "won")

    def __init__(self, retry_statuses: frozenset[int] = frozenset()) -> None:
        self.outcomes: list[Outcome] = []
        self.timer: anyio.CancelScope | None = None
        self.wake: anyio.Event | None = None
        self.retry_statuses = retry_statuses
        self.won = False  # a good answer was posted: the race ends with it

    def post(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome[2] is None and _good(outcome[1], self.retry_statuses):
            self.won = True
        if self.timer is not None:
            self.timer.cancel()
        if self.wake is not None:
            self.wake.set()


async def run_race(
    race: Race,
    clock: Clock,
    max_hedges: int,
    deadline_at: float | None,
    retry_statuses: frozenset[int],
    run_primary: Callable[[], Awaitable[httpx.Response]],
    run_hedge: Callable[[], Awaitable[httpx.Response]],
) -> httpx.Response:
    """Race the call against its hedges (module docstring); the winner's response, or
    the primary's outcome when no hedge answers well.

    The loops run as tasks; this task sleeps the hedge delay itself (on the engine's
    clock), and an outcome cuts that sleep short: one task per attempt, nothing more."""
    inbox = race.inbox = _Inbox(retry_statuses)
    outcomes = inbox.outcomes
    winner: tuple[httpx.Response | None, Exception | None] | None = None
    primary: tuple[httpx.Response | None, Exception | None] | None = None

    async def run(index: int, attempt: Callable[[], Awaitable[httpx.Response]]) -> None:
        try:
            response = await attempt()
        except Exception as exc:
            inbox.post((index, None, exc))
        else:
            inbox.post((index, response, None))
        race.landed()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(run, 0, run_primary)
            pending, hedges, hedging = 1, 0, True
            while winner is None:
                if not outcomes:
                    if hedging and hedges < max_hedges and not race.paused:
                        with anyio.CancelScope() as timer:
                            inbox.timer = timer
                            await clock.sleep(race.delay_s)
                        inbox.timer = None
                        if outcomes or timer.cancel_called:
                            # an answer came first, or the call's attempt answered (paused:
                            # wait for its retry; resumed already: the delay starts again)
                            continue
                        if deadline_at is not None and deadline_at - clock.monotonic() <= 0.0:
                            hedging = False
                            continue
                        hedges += 1
                        pending += 1
                        group.start_soon(run, hedges, run_hedge)
                        continue
                    inbox.wake = wake = anyio.Event()
                    await wake.wait()
                    inbox.wake = None
                    continue
                index, response, error = outcomes.pop(0)
                pending -= 1
                if error is None and _good(response, retry_statuses):
                    winner = (response, None)
                    if primary is not None:
                        await _drain_later(primary[0])
                elif index == 0:
                    primary = (response, error)
                    hedging = False  # the call has given up or been refused: no new attempts
                else:
                    await _drain_later(response)
                    if isinstance(error, NoHedge):
                        hedging = False
                if winner is None and pending == 0 and primary is not None:
                    winner = primary
            group.cancel_scope.cancel()
        # Answers that came in whole after the winner: losers, read short and closed.
        while outcomes:
            _, response, _ = outcomes.pop(0)
            if winner is None or response is not winner[0]:
                await _drain_later(response)
    except BaseException:
        # Cancelled (or failed) once the winner was chosen, while the losers wound down:
        # its response is handed back to no one, so it is closed like theirs.
        if winner is not None:
            await _close(winner[0])
        raise
    finally:
        # Answers that came in after the winner (or while we were cancelled) are losers.
        for _, response, _ in outcomes:
            if winner is None or response is not winner[0]:
                await _close(response)
        outcomes.clear()
        if winner is None and primary is not None:
            await _close(primary[0])
    assert winner is not None  # the loop ends with one, or the task group raised
    response, error = winner
    if error is not None:
        raise error
    assert response is not None
    return response
