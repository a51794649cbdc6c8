"""A one-shot timer that runs its callback in the event loop that armed it.

For work a remote store holds back to batch it (budget counts, cached breaker outcomes)
and must still send when no further call comes to carry it: a process that goes quiet
after its last requests would otherwise keep them for as long as it stays quiet.

A timer handle, not a sleeping task: a handle dropped with its loop (a loop closed
without the store's `aclose`) says nothing and holds nothing, where a pending task is
reported destroyed; and a `FakeClock` fires it when a test advances the clock past it,
where a task sleeping on that clock would move the clock itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, TypeGuard


def alive(task: asyncio.Future[Any] | None) -> TypeGuard[asyncio.Future[Any]]:
    """Whether a store's background task (or a future its requests wait on) may still
    finish: not done, and its event loop not closed. A loop closed without cancelling
    its tasks (`run_until_complete` then `close()`, as a worker or a test runner may do)
    leaves them pending for good; a store that waited for its flush, probe or sync of
    that loop to end started none on the loops after it."""
    return task is not None and not task.done() and not task.get_loop().is_closed()


async def ended(task: asyncio.Future[Any]) -> None:
    """Wait for a background task `aclose` cancelled to end, whatever it raised; a
    cancellation of `aclose` itself still ends it (suppressing every CancelledError here
    swallowed that too, and the caller's shutdown timeout or task group went on waiting)."""
    current = asyncio.current_task()
    # (counted from here: a caller closing in its own cancellation's handler has one)
    before = current.cancelling() if current is not None else 0
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > before:
            raise
    except Exception:  # (its own failure: closing goes on)
        pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class LoopTimer:
    """At most one pending callback, on the clock's `call_later` when it has one (a
    `FakeClock`), else on the running event loop's; the callback runs in that loop's
    thread either way (a fake clock fires in whichever thread advances it)."""

    __slots__ = ("_call_later", "_callback", "_handle", "_loop")

    def __init__(self, clock: Any, callback: Callable[[], None]) -> None:
        self._call_later: Callable[[float, Callable[[], None]], Any] | None = getattr(
            clock, "call_later", None
        )
        self._callback = callback
        self._handle: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self, delay: float) -> None:
        """Call back in `delay` seconds unless armed already on the running loop (an
        earlier arming stands: callers arm for their oldest work first)."""
        loop = asyncio.get_running_loop()
        if self._handle is not None:
            if self._loop is loop:
                return
            # armed on a loop that is gone, or runs in another thread: this one's now
            self._cancel_handle(loop)
        self._loop = loop
        call_later = self._call_later
        delay = delay if delay > 0.0 else 0.0
        if call_later is None:
            self._handle = loop.call_later(delay, self._fire)
        else:
            self._handle = call_later(delay, self._fire_in_loop)

    def elsewhere(self) -> bool:
        """Whether the last arming was on another event loop than the running one (or
        none was made): a loop closed since drops its handle, and nothing fires."""
        return self._loop is not _running_loop()

    def cancel(self) -> None:
        if self._handle is not None:
            self._cancel_handle(_running_loop())

    def _cancel_handle(self, loop: asyncio.AbstractEventLoop | None) -> None:
        handle, owner = self._handle, self._loop
        self._handle = None
        if self._call_later is not None or owner is None or owner is loop:
            handle.cancel()
        elif not owner.is_closed():
            # a loop's handle is cancelled in that loop's thread (asyncio's bookkeeping
            # is not thread-safe); a closed loop's never fires
            with contextlib.suppress(RuntimeError):
                owner.call_soon_threadsafe(handle.cancel)

    def _fire_in_loop(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._handle = None
        elif _running_loop() is loop:
            self._fire()
        else:
            try:
                loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # closed meanwhile
                self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._callback()
