"""A benchmark worker process (one per venv or build), driven round by round over a pipe."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class Worker:
    """Starts `cmd`, reads its hello line, then answers one JSON line per `round()`.

    The worker prints one JSON line when ready and one per "go" line it reads on stdin;
    closing stdin ends it.
    """

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=None if env is None else dict(env),
        )
        self.hello: dict[str, Any] = json.loads(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[0]} exited")
        return line

    def round(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        result: dict[str, float] = json.loads(self._line())
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def serve_rounds(
    apps: Mapping[str, Any], batch: int, seed: int, timer: Callable[[], float]
) -> None:
    """The worker's side of `Worker`: warm every app up, say which fidelity_mw runs, then per
    line read on stdin time `batch` requests of each app in a shuffled order and print one JSON
    line of seconds per request per app."""
    import fidelity_mw
    from benchmarks._asgi import run_batch

    loop = asyncio.new_event_loop()
    for app in apps.values():
        loop.run_until_complete(run_batch(app, 500))
    shuffle = random.Random(seed).shuffle
    order = list(apps)
    print(json.dumps({"compiled": fidelity_mw.compiled, "file": fidelity_mw.__file__}), flush=True)
    for _ in sys.stdin:
        shuffle(order)
        result = {
            name: loop.run_until_complete(run_batch(apps[name], batch, timer)) for name in order
        }
        print(json.dumps(result), flush=True)
