"""Where a real server's CPU per request goes: the time split beside what can be counted.

benchmarks/server.py says how much server CPU a request costs under uvicorn (1 worker,
uvloop, httptools) and benchmarks/loadgen.c; this script says where it goes, per
variant (server.py's apps, default `bare,fidelity-memory`), each its own server pinned
to one CPU, the generator on the other, 32 connections:

  user / kernel µs   the server process's utime and stime per request, rounds alternating
                     between the variants (medians; differences to bare paired per round)
  kernel, polling    the same with a generator that polls without sleeping (LOADGEN_SPIN):
                     the server's writes then wake no sleeping process on the other CPU,
                     which on a virtual machine costs the writer an inter-processor interrupt
  wake-ups           processes the server's own system calls woke, per request (perf's
                     sched:sched_wakeup tracepoint over the server: the generator, asleep in
                     epoll_wait, woken by a response write), and the server's own context
                     switches (it slept waiting for requests, or was preempted)
  system calls       per request, by name (`strace -c -f` over one window; strace slows the
                     server, the counts stay)
  collections        the cyclic collector's runs per 1,000 requests, per generation
  instructions       (`--instructions`) user-space instructions per request under the real
                     server: valgrind's callgrind runs the server, its counting switched on
                     when the generator's window opens (slow: a few hundred requests a second)

Counts do not move with the machine's load; the times do (say the load).
benchmarks/server_inprocess.py counts the same instructions without the kernel, for
comparison.

    .venv/bin/python benchmarks/server_where.py [--variants bare,fidelity-memory]
        [--rounds 4] [--duration 4] [--instructions]

Needs `cc` (the generator); `perf` and `strace` for their columns (left out without
them); `valgrind` for `--instructions`. Prints only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import server as served

CONNECTIONS = 32
TRACEPOINTS = ("sched:sched_wakeup", "sched:sched_switch", "raw_syscalls:sys_enter")


@contextlib.contextmanager
def spinning(on: bool) -> Iterator[None]:
    """The generator polls without sleeping while inside (loadgen.c reads LOADGEN_SPIN)."""
    before = os.environ.get("LOADGEN_SPIN")
    os.environ["LOADGEN_SPIN"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LOADGEN_SPIN", None)
        else:
            os.environ["LOADGEN_SPIN"] = before


def window(
    loadgen: str, port: int, seconds: float, at_open: Callable[[], None] = lambda: None,
    warmup: float = 1.0, timeout_s: float = 5.0,
) -> int:  # fmt: skip
    """One measured window of the generator on a server; the requests answered in it."""
    result = served.run_loadgen(
        loadgen, port, CONNECTIONS, warmup, seconds, 1, False, at_open, timeout_s
    )
    if int(result["status"]) or any(int(result[k]) for k in ("connect", "read", "write")):
        raise RuntimeError(f"non-2xx answers or socket errors: {result}")
    return int(result["requests"])


def timed(loadgen: str, pid: int, port: int, seconds: float, spin: bool) -> tuple[float, float]:
    """(user, kernel) µs of the server process per request over one window."""
    before: list[tuple[float, float]] = []
    with spinning(spin):
        n = window(loadgen, port, seconds, lambda: before.append(served.cpu_times(pid)))
    user, system = served.cpu_times(pid)
    return (user - before[0][0]) * 1e6 / n, (system - before[0][1]) * 1e6 / n


def parse_perf_stat(text: str) -> dict[str, int]:
    """perf stat's CSV output (`-x ,`): event name -> count."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            counts[parts[2].strip()] = int(parts[0])
    return counts


def parse_strace_summary(text: str) -> dict[str, int]:
    """`strace -c`'s table: system call -> calls."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 5 and re.fullmatch(r"[\d.]+", cols[0]) and cols[-1] != "total":
            calls[cols[-1]] = int(cols[3])
    return calls


def attached(argv: list[str], loadgen: str, port: int, seconds: float) -> tuple[int, int]:
    """Run a tool attached to the server over one window: (requests, the tool's exit)."""
    tool: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        tool.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.2)  # attached before the counted requests (a few are missed: < 1 %)

    n = window(loadgen, port, seconds, start)
    tool[0].send_signal(signal.SIGINT)
    return n, tool[0].wait(timeout=60)


def counted(
    loadgen: str, pid: int, port: int, seconds: float, gc_file: Path, tmp: Path
) -> dict[str, Any]:
    """Wake-ups, context switches, system calls and collections per request (one window
    each)."""
    found: dict[str, Any] = {}
    if shutil.which("perf"):
        out = tmp / f"perf-{pid}.txt"
        argv = ["perf", "stat", "-x", ",", "-e", ",".join(TRACEPOINTS), "-p", str(pid)]
        n, _ = attached([*argv, "-o", str(out)], loadgen, port, seconds)
        stats = parse_perf_stat(out.read_text()) if out.exists() else {}
        for name in TRACEPOINTS:
            if name in stats:
                found[name.split(":")[1]] = stats[name] / n
    if shutil.which("strace"):
        out = tmp / f"strace-{pid}.txt"
        n, _ = attached(
            ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)], loadgen, port, seconds
        )
        calls = parse_strace_summary(out.read_text()) if out.exists() else {}
        found["syscalls"] = {
            name: c / n for name, c in sorted(calls.items(), key=lambda kv: -kv[1])
        }
    before: list[list[list[float]]] = []
    n = window(loadgen, port, seconds, lambda: before.append(served.gc_totals(pid, gc_file)))
    after = served.gc_totals(pid, gc_file)
    found["gc_per_1k"] = [(a[0] - b[0]) * 1000 / n for a, b in zip(after, before[0], strict=True)]
    return found


def instructions(variant: str, loadgen: str, seconds: float) -> float:
    """User-space instructions per request of a real server (callgrind, counting switched on
    when the generator's window opens and off after it)."""
    with tempfile.TemporaryDirectory(prefix="server-where-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        port = served.free_port()
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
        argv += [f"--callgrind-out-file={out}", sys.executable, str(Path(served.__file__))]
        argv += ["--serve", variant, "--port", str(port), "--redis-url", "redis://127.0.0.1:1/0"]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        proc = subprocess.Popen(
            served.pinned(0, argv), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            served.wait_ready(port, proc, timeout_s=600)

            def switch(on: bool) -> None:
                subprocess.run(
                    ["callgrind_control", "-i", "on" if on else "off", str(proc.pid)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )

            with spinning(False):
                n = window(loadgen, port, seconds, lambda: switch(True), 3.0, 60.0)
            switch(False)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
        for line in out.read_text().splitlines():
            if line.startswith("totals:"):  # (`summary:` is 0 with the counting off at start)
                return int(line.split()[1]) / n
    raise RuntimeError("callgrind wrote no totals")


def report(
    variants: list[str],
    times: dict[str, dict[str, list[float]]],
    counts: dict[str, dict[str, Any]],
    instr: dict[str, float],
) -> str:
    def cell(variant: str, key: str) -> str:
        values = times[variant][key]
        text = f"{statistics.median(values):.1f}"
        if variant != "bare":
            diffs = [v - b for v, b in zip(values, times["bare"][key], strict=True)]
            text += f" ({statistics.median(diffs):+.1f})"
        return text

    head = "| variant | user µs/req | kernel µs/req | kernel, generator polling |"
    rule = "|---|---:|---:|---:|"
    have_perf = any("sched_wakeup" in c for c in counts.values())
    if have_perf:
        head += " wake-ups caused / context switches / system calls per req |"
        rule += "---:|"
    head += " collections per 1k req (gen 0/1/2) |"
    rule += "---:|"
    if instr:
        head += " instructions/req, real server |"
        rule += "---:|"
    lines = [head, rule]
    for v in variants:
        c = counts[v]
        row = f"| {v} | {cell(v, 'user')} | {cell(v, 'kernel')} | {cell(v, 'kernel_polling')} |"
        if have_perf:
            row += (
                f" {c.get('sched_wakeup', 0):.2f} / {c.get('sched_switch', 0):.3f} / "
                f"{c.get('sys_enter', 0):.2f} |"
            )
        row += " " + "/".join(f"{g:.1f}" for g in c["gc_per_1k"]) + " |"
        if instr:
            over = "" if v == "bare" else f" ({instr[v] - instr['bare']:+,.0f})"
            row += f" {instr[v]:,.0f}{over} |"
        lines.append(row)
    calls = {v: counts[v].get("syscalls") for v in variants if counts[v].get("syscalls")}
    if calls:
        lines += ["", "System calls per request (strace -c):", ""]
        for v, by_name in calls.items():
            listed = ", ".join(f"{name} {c:.2f}" for name, c in by_name.items() if c >= 0.005)
            lines.append(f"- {v}: {listed}")
    rounds = len(times[variants[0]]["user"])
    lines += [
        "",
        f"{rounds} rounds, variants alternating (order reversed each round), {CONNECTIONS} "
        "connections, medians (differences to bare paired per round, in brackets); counts "
        "over one window each. Load average at the end: "
        + " ".join(Path("/proc/loadavg").read_text().split()[:3])
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="bare,fidelity-memory")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per window")
    parser.add_argument(
        "--instructions", action="store_true", help="also count instructions under callgrind"
    )
    parser.add_argument("--instructions-duration", type=float, default=20.0)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    if "bare" not in variants:
        variants.insert(0, "bare")
    bad = [v for v in variants if v not in served.VARIANTS or served.is_redis(v)]
    if bad:
        parser.error(f"not a memory-state variant of benchmarks/server.py: {bad}")
    with tempfile.TemporaryDirectory(prefix="server-where-") as tmp_name:
        tmp = Path(tmp_name)
        loadgen = served.build_loadgen(tmp)
        if loadgen is None:
            raise SystemExit("needs a C compiler (cc) for benchmarks/loadgen.c")
        times = {v: {"user": [], "kernel": [], "kernel_polling": []} for v in variants}
        counts: dict[str, dict[str, Any]] = {}
        with served.servers(variants, "", 0, tmp, gc_stats=True) as running:
            order = list(variants)
            for r in range(args.rounds):
                for v in order:
                    port, pid = running[v]
                    user, kernel = timed(loadgen, pid, port, args.duration, spin=False)
                    _, polling = timed(loadgen, pid, port, args.duration, spin=True)
                    times[v]["user"].append(user)
                    times[v]["kernel"].append(kernel)
                    times[v]["kernel_polling"].append(polling)
                    print(
                        f"round {r + 1} {v}: user {user:.1f} kernel {kernel:.1f} "
                        f"(polling {polling:.1f}) µs/req",
                        file=sys.stderr,
                        flush=True,
                    )
                order.reverse()
            for v in variants:
                port, pid = running[v]
                counts[v] = counted(
                    loadgen, pid, port, args.duration, served.gc_stats_path(tmp, v), tmp
                )
        instr: dict[str, float] = {}
        if args.instructions:
            if shutil.which("valgrind") is None:
                raise SystemExit("valgrind not found (Debian package valgrind)")
            for v in variants:
                instr[v] = instructions(v, loadgen, args.instructions_duration)
    print(report(variants, times, counts, instr))


if __name__ == "__main__":
    main()
