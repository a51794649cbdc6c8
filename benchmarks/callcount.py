"""Python calls and memory allocations per inbound request: where the hot path's work is.

Counts rather than times, so the numbers do not move with the machine's load: the
same app and request give the same counts on any machine with this Python. The
variants are those of benchmarks/overhead.py (with its `--breakdown` layers), each a
Starlette app with one route called directly as ASGI, warmed up first.

Per request:
  calls       Python function calls (new frames), from `sys.setprofile` "call" events
  resumes     coroutine / generator resumptions (also "call" events, told apart by where
              the frame resumes)
  c_calls     calls of functions implemented in C (builtins, C methods)
  bytecodes   bytecode instructions executed (`sys.settrace` opcode events): the
              interpreter's work, which the time per request follows closely
  blocks      memory blocks allocated, a lower bound: the rises of `sys.getallocatedblocks()`
              between consecutive profile events (a block allocated and freed between two
              events is not seen); pymalloc blocks only (objects up to 512 bytes)
  peak KiB    the most memory a request held at once beyond what was live before it
              (tracemalloc, median over requests)
  retained    blocks still allocated after the requests, per request (a leak shows here)

Then, for one variant (default `fidelity`), the functions it calls per request beyond
`bare`'s, most frequent first, and the bytecodes each function runs per request beyond
`bare`'s: the lists to shorten.

`--fastapi` adds the same route on FastAPI, bare and with FidelityMiddleware, and compares
what the middleware adds there with what it adds on Starlette.

    .venv/bin/python benchmarks/callcount.py [--requests 500] [--top 25]
        [--variant fidelity] [--fastapi] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dis
import gc
import statistics
import sys
import tracemalloc
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._asgi import make_scope, receive
from benchmarks._results import stamp, write_section
from benchmarks.overhead import build_apps, fastapi_app, fidelity_policy
from fidelity_mw import FidelityMiddleware

GENERATOR_FLAGS = (
    0x20 | 0x80 | 0x200  # CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR (inspect.CO_*)
)


def _first_resume(code: CodeType) -> int:
    """Offset of the code's first RESUME: a frame entered at or before it starts afresh."""
    for instruction in dis.get_instructions(code):
        if instruction.opname == "RESUME":
            return instruction.offset
    return 0


def _where(code: CodeType) -> str:
    path = Path(code.co_filename)
    parts = path.parts
    if "fidelity_mw" in parts:
        name = "/".join(parts[parts.index("fidelity_mw") + 1 :])
    elif "site-packages" in parts:
        name = "/".join(parts[parts.index("site-packages") + 1 :])
    else:
        name = path.name
    return f"{name}:{code.co_firstlineno} {code.co_qualname}"


class Profile:
    """The `sys.setprofile` hook: counts, and allocated blocks between events."""

    def __init__(self) -> None:
        self.calls = 0
        self.resumes = 0
        self.c_calls = 0
        self.blocks = 0
        self.by_function: collections.Counter[str] = collections.Counter()
        self._fresh_at: dict[CodeType, int] = {}
        self._names: dict[CodeType, str] = {}
        self._last = sys.getallocatedblocks()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        rise = sys.getallocatedblocks() - self._last
        if rise > 0:
            self.blocks += rise
        if event == "call":
            code = frame.f_code
            if code.co_flags & GENERATOR_FLAGS:
                fresh_at = self._fresh_at.get(code)
                if fresh_at is None:
                    fresh_at = self._fresh_at[code] = _first_resume(code)
                if frame.f_lasti > fresh_at:
                    self.resumes += 1
                    self._last = sys.getallocatedblocks()
                    return
            self.calls += 1
            name = self._names.get(code)
            if name is None:
                name = self._names[code] = _where(code)
            self.by_function[name] += 1
        elif event == "c_call":
            self.c_calls += 1
            self.by_function["C " + getattr(arg, "__qualname__", type(arg).__name__)] += 1
        # re-read after our own bookkeeping, so the hook's allocations are not counted
        self._last = sys.getallocatedblocks()


async def _requests(app: Any, n: int, profile: Profile | None = None) -> None:
    scopes = [make_scope() for _ in range(n)]

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise RuntimeError(f"unexpected status {message['status']}")

    if profile is not None:
        sys.setprofile(profile)
    try:
        for scope in scopes:
            await app(scope, receive, send)
    finally:
        sys.setprofile(None)


class Instructions:
    """The `sys.settrace` hook that counts the bytecode instructions every frame executes,
    in all and per function (`by_code`)."""

    def __init__(self) -> None:
        self.count = 0
        self.by_code: collections.Counter[CodeType] = collections.Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.count += 1
            self.by_code[frame.f_code] += 1
        return self._local

    def by_function(self, n: int) -> dict[str, float]:
        """Bytecodes per request (over `n` requests) by function, named as `_where` does."""
        out: dict[str, float] = collections.defaultdict(float)
        for code, count in self.by_code.items():
            out[_where(code)] += count / n
        return dict(out)


async def _instructions(app: Any, n: int) -> Instructions:
    scopes = [make_scope() for _ in range(n)]
    counter = Instructions()

    async def send(message: dict[str, Any]) -> None:
        pass

    for scope in scopes:
        sys.settrace(counter)
        try:
            await app(scope, receive, send)
        finally:
            sys.settrace(None)
    return counter


async def _peaks(app: Any, n: int) -> list[int]:
    """Per request: the traced memory's peak above what was live when it began."""
    scopes = [make_scope() for _ in range(n)]
    peaks = []

    async def send(message: dict[str, Any]) -> None:
        pass

    tracemalloc.start()
    try:
        for scope in scopes:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            await app(scope, receive, send)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return peaks


async def measure(n: int, fastapi: bool = False) -> dict[str, dict[str, Any]]:
    apps = build_apps(breakdown=True)
    if fastapi:
        apps["fastapi"] = fastapi_app()
        apps["fastapi+fidelity"] = fastapi_app(
            middleware=FidelityMiddleware, policy=fidelity_policy(), telemetry=False
        )
    results: dict[str, dict[str, Any]] = {}
    for name, app in apps.items():
        await _requests(app, 500)  # warm up: stacks built, caches and key tables filled
        profile = Profile()
        await _requests(app, n, profile)
        gc.collect()
        before = sys.getallocatedblocks()
        await _requests(app, n)
        gc.collect()
        retained = (sys.getallocatedblocks() - before) / n
        peaks = await _peaks(app, min(n, 500))
        traced = min(n, 200)
        instructions = await _instructions(app, traced)
        results[name] = {
            "calls": profile.calls / n,
            "resumes": profile.resumes / n,
            "c_calls": profile.c_calls / n,
            "blocks": profile.blocks / n,
            "bytecodes": instructions.count / traced,
            "bytecodes_by_function": instructions.by_function(traced),
            "peak_kib": statistics.median(peaks) / 1024,
            "retained": retained,
            "by_function": {k: v / n for k, v in profile.by_function.items()},
        }
        print(f"{name}: {profile.calls / n:.1f} calls/request", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, Any]], n: int, variant: str, top: int) -> str:
    lines = [
        "| variant | Python calls | resumes | C calls | bytecodes | blocks allocated (≥) "
        "| peak KiB | retained blocks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['calls']:.1f} | {r['resumes']:.1f} | {r['c_calls']:.1f} "
            f"| {r['bytecodes']:.0f} | {r['blocks']:.1f} | {r['peak_kib']:.2f} "
            f"| {r['retained']:.3f} |"
        )
    lines += [
        "",
        f"Per request, counted over {n} sequential requests after 500 to warm up; in-process "
        "ASGI calls, the apps of benchmarks/overhead.py (FidelityMiddleware: one permissive "
        "per-client limit, the default route breaker, deadline from `x-request-timeout-ms`, "
        "memory state, telemetry off; `fid:*` rows add its layers one at a time). Calls are "
        "`sys.setprofile` events: new Python frames, coroutine resumptions, C calls (not the "
        "C slots the interpreter calls itself, such as a `with` block's `__enter__`); bytecodes "
        "are the instructions every Python frame executed (`sys.settrace` opcode events). Blocks "
        "allocated is a lower bound (rises of `sys.getallocatedblocks()` between profile "
        "events); peak KiB is tracemalloc's peak above the memory live before the request "
        "(median); retained is blocks still allocated after the requests. Counts, not "
        "times: they do not depend on the machine's load.",
    ]
    if {"bare", "fidelity", "fastapi", "fastapi+fidelity"} <= set(results):
        lines += [
            "",
            "What FidelityMiddleware adds per request on each framework (`--fastapi`):",
            "",
        ]
        for app, bare in (("fidelity", "bare"), ("fastapi+fidelity", "fastapi")):
            mine, base = results[app], results[bare]
            lines.append(
                f"- {app} minus {bare}: {mine['calls'] - base['calls']:+.1f} Python calls, "
                f"{mine['c_calls'] - base['c_calls']:+.1f} C calls, "
                f"{mine['bytecodes'] - base['bytecodes']:+.0f} bytecodes, "
                f"{mine['blocks'] - base['blocks']:+.1f} blocks"
            )
    if variant in results and "bare" in results:
        mine = results[variant]["by_function"]
        base = results["bare"]["by_function"]
        extra = {k: v - base.get(k, 0.0) for k, v in mine.items()}
        rows = sorted(((v, k) for k, v in extra.items() if v >= 0.5), reverse=True)[:top]
        lines += [
            "",
            f"`{variant}`: calls per request beyond `bare`'s, most frequent first "
            f"(top {top}; total {results[variant]['calls'] - results['bare']['calls']:+.1f} "
            f"Python calls, {results[variant]['c_calls'] - results['bare']['c_calls']:+.1f} "
            "C calls):",
            "",
            "```",
            *(f"{v:6.1f}  {k}" for v, k in rows),
            "```",
        ]
        ours = results[variant]["bytecodes_by_function"]
        base_ops = results["bare"]["bytecodes_by_function"]
        extra_ops = {k: v - base_ops.get(k, 0.0) for k, v in ours.items()}
        op_rows = sorted(((v, k) for k, v in extra_ops.items() if v >= 0.5), reverse=True)
        lines += [
            "",
            f"`{variant}`: bytecodes per request beyond `bare`'s, by function (top {top}; "
            f"total {results[variant]['bytecodes'] - results['bare']['bytecodes']:+.0f}):",
            "",
            "```",
            *(f"{v:7.1f}  {k}" for v, k in op_rows[:top]),
            "```",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--variant", default="fidelity", help="whose calls to list by function")
    parser.add_argument(
        "--fastapi", action="store_true", help="add the route on FastAPI, bare and with ours"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    results = asyncio.run(measure(args.requests, args.fastapi))
    table = report(results, args.requests, args.variant, args.top)
    print(table)
    if not args.no_write:
        write_section(
            "Calls and allocations per request (benchmarks/callcount.py)",
            f"{stamp()}\n\n{table}",
        )


if __name__ == "__main__":
    main()
