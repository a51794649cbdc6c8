"""Warnings a lasting fault repeats per request or per call, logged once per interval.

Some faults hit every request while they last: Redis out of memory (`noeviction`)
or a read-only replica after a failover answers every script call with an error,
and with `on_error = "closed"` every request of a Redis outage is refused. One log
line each would be a log storm at the request rate, burying everything else in the
log (and costing its pipeline) exactly when an operator reads it. So these sites
log through `warn`: the first occurrence of a message (per logger, message and
kind) at once, then at most one line per `INTERVAL_S` that says how many were left
out since. The metrics and decision records still count every one. The same holds
for code of the app's that fails on every request (a `key=` function, a telemetry
observer): one traceback per interval, not one per request.

When the fault stops, the lines left out since the last one are not lost: inside an
event loop, the first one left out schedules a line for the end of its interval,
which says how many there were and how long ago the last of them happened (when
the fault stopped, if it did).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

INTERVAL_S: Final = 10.0
_MAX_KINDS: Final = 256  # distinct (logger, message, kind) entries kept


class _Entry:
    """One (logger, message, kind): when its last line was logged, how many were left
    out since, the latest of them (its arguments, when) and whether a line for them
    is scheduled."""

    __slots__ = ("args", "at", "last", "left_out", "level", "scheduled")

    def __init__(self, at: float, level: int) -> None:
        self.at = at
        self.left_out = 0
        self.args: tuple[object, ...] = ()
        self.last = at
        self.level = level
        self.scheduled = False


_lock = threading.Lock()
# (logger name, message, kind) -> its entry
_seen: dict[tuple[str, str, str], _Entry] = {}
clock: Callable[[], float] = time.monotonic  # tests swap it for a fake clock


def _call_later(delay: float, callback: Callable[[], None]) -> bool:
    """Run `callback` in `delay` seconds on the running event loop; False without one
    (a thread of the blocking transport: its left-out lines wait for its next one)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    loop.call_later(delay, callback)
    return True


schedule: Callable[[float, Callable[[], None]], bool] = _call_later  # tests swap it


def warn(
    logger: logging.Logger,
    kind: str,
    msg: str,
    *args: object,
    level: int = logging.WARNING,
    exc_info: bool = False,
) -> bool:
    """`logger.log(level, msg, *args, exc_info=exc_info)` (a warning by default; ERROR
    with `exc_info` for what `logger.exception` logged), or count it when the same
    (logger, msg, kind) was logged less than `INTERVAL_S` ago. True when logged."""
    key = (logger.name, msg, kind)
    now = clock()
    with _lock:
        entry = _seen.get(key)
        if entry is not None and now - entry.at < INTERVAL_S:
            entry.left_out += 1
            entry.args, entry.last = args, now
            if not entry.scheduled:
                delay = INTERVAL_S - (now - entry.at)
                entry.scheduled = schedule(delay, _flusher(logger, key, msg, entry))
            return False
        if entry is None and len(_seen) >= _MAX_KINDS:
            _seen.clear()
        left_out = entry.left_out if entry is not None else 0
        since = now - entry.at if entry is not None else 0.0
        # (a flush still scheduled for `entry` finds `fresh` in its place and does nothing;
        # carrying its flag over kept one that never ran, its loop closed with it
        # (`asyncio.run` per job, a forked worker), from ever scheduling another)
        _seen[key] = _Entry(now, level)
    if entry is None:
        logger.log(
            level,
            msg + " (repeats: at most one line per %g s, with a count)",
            *args,
            INTERVAL_S,
            exc_info=exc_info,
        )
    elif left_out:
        logger.log(
            level,
            msg + " (%d more like it in the last %.0f s, not logged)",
            *args,
            left_out,
            since,
            exc_info=exc_info,
        )
    else:
        logger.log(level, msg, *args, exc_info=exc_info)
    return True


def _flusher(
    logger: logging.Logger, key: tuple[str, str, str], msg: str, entry: _Entry
) -> Callable[[], None]:
    return lambda: _flush(logger, key, msg, entry)


def _flush(logger: logging.Logger, key: tuple[str, str, str], msg: str, mine: _Entry) -> None:
    """The end of an interval with lines left out and none logged since: say how many,
    and how long ago the last one was (a fault that stopped says so here). Only for the
    entry it was scheduled for: a line logged since has told the count."""
    now = clock()
    with _lock:
        entry = _seen.get(key)
        if entry is not mine or not entry.scheduled:
            return
        entry.scheduled = False
        if not entry.left_out:
            return  # a line logged since counted them
        if now - entry.at < INTERVAL_S:  # early (a clock of its own): try again then
            entry.scheduled = schedule(
                INTERVAL_S - (now - entry.at), _flusher(logger, key, msg, entry)
            )
            return
        left_out, args, since, ago = entry.left_out, entry.args, now - entry.at, now - entry.last
        entry.at, entry.left_out = now, 0
        level = entry.level
    logger.log(
        level,
        msg + " (%d more like it in the last %.0f s, not logged; the last %.1f s ago)",
        *args,
        left_out,
        since,
        ago,
    )


def exception(logger: logging.Logger, kind: str, msg: str, *args: object) -> bool:
    """`logger.exception(msg, *args)` (ERROR, with the traceback), throttled like `warn`."""
    return warn(logger, kind, msg, *args, level=logging.ERROR, exc_info=True)


def error_kind(exc: BaseException) -> str:
    """What makes two error replies the same fault: the text without its error code
    (redis-py turns `OOM ...` into an exception of its own without the code; a
    batch's per-operation error keeps it), cut before the details that vary."""
    text = str(exc)
    code, _, rest = text.partition(" ")
    if code.isupper() and rest:
        text = rest
    return text[:40]


def reset() -> None:
    """Forget every entry (tests)."""
    with _lock:
        _seen.clear()
