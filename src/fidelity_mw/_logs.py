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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

INTERVAL_S: Final = 10.0
_MAX_KINDS: Final = 256  # distinct (logger, message, kind) entries kept

_lock = threading.Lock()
# (logger name, message, kind) -> [monotonic time of the last line logged, left out since]
_seen: dict[tuple[str, str, str], list[float]] = {}
clock: Callable[[], float] = time.monotonic  # tests swap it for a fake clock


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
        if entry is not None and now - entry[0] < INTERVAL_S:
            entry[1] += 1
            return False
        if entry is None and len(_seen) >= _MAX_KINDS:
            _seen.clear()
        _seen[key] = [now, 0.0]
    if entry is None:
        logger.log(
            level,
            msg + " (repeats: at most one line per %g s, with a count)",
            *args,
            INTERVAL_S,
            exc_info=exc_info,
        )
    elif entry[1]:
        logger.log(
            level,
            msg + " (%d more like it in the last %.0f s, not logged)",
            *args,
            int(entry[1]),
            now - entry[0],
            exc_info=exc_info,
        )
    else:
        logger.log(level, msg, *args, exc_info=exc_info)
    return True


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
