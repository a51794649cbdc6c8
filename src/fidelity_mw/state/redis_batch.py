"""Coalescing: the admissions and outcome records of one event-loop tick in one script call.

The cost of Redis mode is mostly the client: one asyncio round trip through
redis-py costs far more CPU than the script itself. Requests that reach
`RedisStore.admit` (or report an outcome) in the same tick are queued; a task
scheduled by the first of them runs in the next tick and sends them all as one
`EVALSHA` of `batch.lua`, which decides each one exactly as `admit.lua` /
`record.lua` would alone, in arrival order, at one server time. A tick with a
single operation sends that operation's own script, unchanged.

`Coalescer.call` answers exactly what `RedisStore.call` answers for that one
operation (its own reply and age, or None when the call failed), so the
store's fallback and failure-mode handling applies per request unchanged: a
failed batch degrades every request in it as `on_error` says, each recorded as
its own fallback decision. An operation that fails on its own inside the batch
(Redis answered it with an error, say a key holding a value of another type)
fails alone, as its own call would have: None for it, and `failed` is told.
Nothing is retried.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from .redis_sync import reply_error

if TYPE_CHECKING:
    from .scripts import Script

# Operations per batch call: bounds the script's run time (Redis runs it alone)
# and the reply size. A busier tick sends several calls, concurrently, each
# from its own task.
MAX_BATCH: Final = 64

# The scripts whose calls may share a batch, by script name, and their op codes.
_OP_CODES: Final = {"admit": "a", "record": "r"}

Reply = tuple[Any, float] | None
Call = Callable[["Script", Sequence[str], Sequence[Any]], Awaitable[Reply]]


class _Op:
    __slots__ = ("args", "future", "keys", "script", "text")

    def __init__(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any] | None,
        future: asyncio.Future[Reply],
        text: str | None,
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.future = future
        self.text = text


class _Queue:
    """The operations one event loop queued in its current tick."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[_Op] = []


class Coalescer:
    """Queues `admit.lua` / `record.lua` calls and sends each event-loop tick's queue as
    one call. Each loop has its own queue (a sync transport's worker threads run their
    own loops), touched only by that loop's thread."""

    __slots__ = (
        "_batch",
        "_bound",
        "_call",
        "_failed",
        "_lock",
        "_queues",
        "_tasks",
        "batches",
        "coalesced",
    )

    def __init__(
        self, call: Call, batch: Script, failed: Callable[[Exception], None] | None = None
    ) -> None:
        self._call = call
        self._batch = batch
        self._failed = failed  # told of an operation's own error inside a batch
        # the last loop used and its queue (one attribute: swapped atomically)
        self._bound: tuple[asyncio.AbstractEventLoop | None, _Queue] = (None, _Queue())
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # batch.lua calls sent
        self.coalesced = 0  # operations that shared a call with others

    def _queue_of(self, loop: asyncio.AbstractEventLoop) -> _Queue:
        bound = self._bound
        if bound[0] is loop:
            return bound[1]
        with self._lock:
            queue = self._queues.get(loop)
            if queue is None:
                queue = self._queues[loop] = _Queue()
            self._bound = (loop, queue)
            return queue

    async def call(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any] | None,
        text: str | None = None,
    ) -> Reply:
        """`text`, when given, is `args` as a batch sends them: ",".join(map(str, args))
        (a caller that caches the constant parts saves most of that cost). With `text`,
        `args` may be None: an operation sent alone then sends `text.split(",")`, the
        same bytes (redis-py sends a number as its repr, which is its str)."""
        loop = asyncio.get_running_loop()
        queue = self._queue_of(loop)
        future: asyncio.Future[Reply] = loop.create_future()
        ops = queue.ops
        ops.append(_Op(script, keys, args, future, text))
        n = len(ops)
        if n == 1:
            # The task's first step runs in the next tick: everything queued
            # until then goes with it (at most MAX_BATCH operations).
            task = loop.create_task(self._flush(queue, ops))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._flushed, queue, ops))
        elif n >= MAX_BATCH:
            # Full: the next operation starts another batch with a task of its
            # own. Every batch of a busy tick then goes out in the next tick,
            # each from its own task, rather than one task splitting the queue
            # and starting a task per chunk (a tick later for all of them).
            queue.ops = []
        return await future

    def _flushed(self, queue: _Queue, ops: list[_Op], task: asyncio.Task[None]) -> None:
        """The batch task ended. Cancelled (aclose), maybe before its first step: its
        operations are answered as failed calls (each request then decides per
        `on_error`, rather than waiting forever or being cancelled itself), and the
        queue no longer holds their list (later operations would join it unsent)."""
        self._tasks.discard(task)
        if queue.ops is ops:
            queue.ops = []
        for op in ops:
            if not op.future.done():
                op.future.set_result(None)

    async def _flush(self, queue: _Queue, ops: list[_Op]) -> None:
        if queue.ops is ops:
            queue.ops = []
        # A request cancelled before its tick's call went out (its client left) is not
        # sent: an admission would charge quota, a record count, for nobody.
        live = [op for op in ops if not op.future.done()]
        if len(live) == 1:
            await self._send_one(live[0])
        elif live:
            await self._send(live)

    async def _send_one(self, op: _Op) -> None:
        args = op.args
        if args is None:  # given as text only: the same values, the same bytes sent
            assert op.text is not None
            args = op.text.split(",")
        try:
            got = await self._call(op.script, op.keys, args)
        except Exception as exc:  # the caller's await raises it, as a direct call would
            _fail(op, exc)
            return
        if not op.future.done():
            op.future.set_result(got)

    async def _send(self, ops: Sequence[_Op]) -> None:
        if len(ops) == 1:
            await self._send_one(ops[0])
            return
        # Each key goes once (the client's cost is per argument, and a tick's
        # requests mostly share keys); an operation names its keys by index. The
        # operations go as one argument, joined by ';'.
        keys: list[str] = []
        index: dict[str, str] = {}
        parts: list[str] = []
        last_keys: Sequence[str] | None = None
        head = ""
        for op in ops:
            op_keys = op.keys
            if op_keys != last_keys:  # (a tick's requests mostly name the same keys)
                refs = []
                for key in op_keys:
                    ref = index.get(key)
                    if ref is None:
                        keys.append(key)
                        ref = index[key] = str(len(keys))
                    refs.append(ref)
                last_keys = op_keys
                head = f"k{'.'.join(refs)},"
            # str(float) is repr: the digits redis-py would send for the value
            text = op.text if op.text is not None else ",".join(map(str, op.args or ()))
            parts.append(f"{_OP_CODES[op.script.name]},{head}{text}")
        self.batches += 1
        self.coalesced += len(ops)
        try:
            got = await self._call(self._batch, keys, (";".join(parts),))
        except Exception as exc:
            for op in ops:
                _fail(op, exc)
            return
        replies: Sequence[Any] = ()
        age = 0.0
        if got is not None:
            age = got[1]
            replies = _split(got[0])
            if len(replies) != len(ops):
                replies = ()  # not our script's reply: each operation sees a bad reply
        for j, op in enumerate(ops):
            reply = replies[j] if j < len(replies) else []
            if reply and reply[0][:1] == "!":  # this operation's own error reply
                if self._failed is not None:
                    self._failed(reply_error(reply[0][1:]))
                reply = None
            if op.future.done():  # the request was cancelled meanwhile
                continue
            if got is None or reply is None:
                op.future.set_result(None)
            else:
                op.future.set_result((reply, age))

    async def aclose(self, wait_s: float = 0.0) -> None:
        """End this loop's batches: the ones queued or out now go, for at most `wait_s`
        (cancelled at once, a record queued by a request that ended just before the close
        was dropped, and an admission fell back per `on_error`); the rest are cancelled
        (answered as failed calls)."""
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._tasks if task.get_loop() is loop]
        if tasks and wait_s > 0.0:
            _done, tasks_left = await asyncio.wait(tasks, timeout=wait_s)
            tasks = list(tasks_left)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fail(op: _Op, exc: Exception) -> None:
    if not op.future.done():
        op.future.set_exception(exc)


def _split(reply: Any) -> list[list[Any]]:
    """batch.lua's reply, one list of values per operation, each value as text (the
    parsers convert what they read: int(), float(), and `parse_admit` takes "1" as 1)."""
    if isinstance(reply, bytes):
        reply = reply.decode()
    if not isinstance(reply, str):
        return []
    return [op.split(",") for op in reply.split(";")]


def coalescable(script: Script) -> bool:
    return script.name in _OP_CODES
