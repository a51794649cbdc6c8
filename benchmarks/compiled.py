"""The mypyc-compiled build against the pure-Python build, in the same interleaved rounds.

One worker process per build (each its own venv: `.venv` runs the sources, `.venv-compiled`
the compiled wheel that `scripts/compiled.sh` installs), both warmed up and kept alive. Each
round asks both workers, in a shuffled order and one at a time (they never compete for a
core), to time the in-process variants of benchmarks/overhead.py (bare, handwritten,
fidelity) in a shuffled order. Per build, the fidelity overhead is the per-round paired
difference to that process's own bare route; the builds are compared by the per-round
ratio of those overheads. Medians throughout.

    bash scripts/compiled.sh -q tests/test_compiled.py    # build + install the wheel
    .venv/bin/python benchmarks/compiled.py [--rounds 20] [--batch 2000] [--cpu-time]

Against another version of the code (say main's, installed in venvs of its own): `--base-pure
PYTHON` and `--base-compiled PYTHON` add a worker each, timed in the same shuffled rounds, and
the report gives each build's overhead as a share of its base's (paired per round).

Under a real server: `--server [server.py options]` runs benchmarks/server.py with one more
variant, `fidelity-memory-compiled`: the same app as `fidelity-memory`, served by the
compiled venv's Python, in the same alternating rounds as `bare` and `fidelity-memory`;
`--base-compiled PYTHON` adds `fidelity-memory-basecompiled` (another compiled build) and
`--base-rev REV` server.py's `fidelity-memory@REV` (the pure build of a git revision).

    .venv/bin/python benchmarks/compiled.py --server --rounds 3 --connections 32,256
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._worker import Worker, serve_rounds  # noqa: E402

VARIANTS = ("bare", "handwritten", "fidelity")


def worker(batch: int, seed: int, cpu_time: bool) -> None:
    """Serve rounds over stdin/stdout: one JSON line of seconds per request per variant."""
    from benchmarks.overhead import build_apps

    apps = {name: app for name, app in build_apps().items() if name in VARIANTS}
    serve_rounds(apps, batch, seed, time.process_time if cpu_time else time.perf_counter)


def start_worker(python: str, args: argparse.Namespace) -> Worker:
    cmd = [python, __file__, "--worker", "--batch", str(args.batch), "--seed", str(args.seed)]
    if args.cpu_time:
        cmd.append("--cpu-time")
    return Worker(cmd)


COMPILED_VARIANT = "fidelity-memory-compiled"
BASE_COMPILED_VARIANT = "fidelity-memory-basecompiled"


def under_server(pythons: dict[str, str], base_rev: str | None, argv: list[str]) -> None:
    """benchmarks/server.py as it is, with variants served by other venvs' Pythons
    (`pythons`: variant -> its Python, each serving `fidelity-memory`) and, with
    `base_rev`, server.py's own `fidelity-memory@REV` (the pure build of that revision)."""
    check = "import fidelity_mw; assert fidelity_mw.compiled, fidelity_mw.__file__"
    for python in pythons.values():
        subprocess.run([python, "-c", check], check=True)
    sys.path.insert(0, str(ROOT))
    from benchmarks import server

    plain_pinned = server.pinned

    def pinned(cpu: int | None, argv: list[str]) -> list[str]:
        for variant, python in pythons.items():
            if variant in argv:
                argv = [python, *argv[1:]]
                argv[argv.index(variant)] = "fidelity-memory"
        return plain_pinned(cpu, argv)

    server.pinned = pinned
    server.VARIANTS = (*server.VARIANTS, *pythons)
    names = ["bare", "fidelity-memory", *pythons]
    if base_rev is not None:
        names.insert(2, f"fidelity-memory@{base_rev}")
    sys.argv = [str(Path(server.__file__)), "--variants", ",".join(names), "--no-write", *argv]
    server.main()


def main() -> None:
    if "--server" in sys.argv:
        args = [a for a in sys.argv[1:] if a != "--server"]
        options = {"--compiled": str(ROOT / ".venv-compiled/bin/python")}
        for name in ("--compiled", "--base-compiled", "--base-rev"):
            if name in args:
                i = args.index(name)
                options[name] = args[i + 1]
                del args[i : i + 2]
        pythons = {COMPILED_VARIANT: options["--compiled"]}
        if "--base-compiled" in options:
            pythons[BASE_COMPILED_VARIANT] = options["--base-compiled"]
        under_server(pythons, options.get("--base-rev"), args)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true", help="time in process CPU time")
    parser.add_argument("--pure", default=str(ROOT / ".venv/bin/python"))
    parser.add_argument("--compiled", default=str(ROOT / ".venv-compiled/bin/python"))
    parser.add_argument("--base-pure", help="python of a pure build to compare with")
    parser.add_argument("--base-compiled", help="python of a compiled build to compare with")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.batch, args.seed, args.cpu_time)
        return
    pythons = {"pure": args.pure, "compiled": args.compiled}
    if args.base_pure:
        pythons["base-pure"] = args.base_pure
    if args.base_compiled:
        pythons["base-compiled"] = args.base_compiled
    builds = {name: start_worker(python, args) for name, python in pythons.items()}
    for name, w in builds.items():
        if w.hello["compiled"] != name.endswith("compiled"):
            raise SystemExit(f"{name}: {w.hello} is not the {name} build")
    load_before = os.getloadavg()[0]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    order = list(builds)
    shuffle = random.Random(args.seed + 1).shuffle
    for r in range(args.rounds):
        shuffle(order)
        for name in order:
            samples[name].append(builds[name].round())
        print(f"\rround {r + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for w in builds.values():
        w.close()
    print(report(samples, args))
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")


def report(samples: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    med = statistics.median
    lines = [
        "| build | bare µs/req | fidelity µs/req | overhead vs bare | ratio vs bare "
        "| overhead / hand-written floor's |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    overheads: dict[str, list[float]] = {}
    for name, rounds in samples.items():
        over = [r["fidelity"] - r["bare"] for r in rounds]
        floor = [r["handwritten"] - r["bare"] for r in rounds]
        to_floor = [o / f if f > 0 else float("inf") for o, f in zip(over, floor, strict=True)]
        overheads[name] = over
        lines.append(
            f"| {name} | {med(r['bare'] for r in rounds) * 1e6:.2f} "
            f"| {med(r['fidelity'] for r in rounds) * 1e6:.2f} | {med(over) * 1e6:+.2f} µs "
            f"| {med(r['fidelity'] / r['bare'] for r in rounds):.3f} "
            f"| {med(to_floor):.1f} |"
        )

    def paired(a: str, b: str) -> float:
        return med(x / y for x, y in zip(overheads[a], overheads[b], strict=True))

    clock = "process CPU time" if args.cpu_time else "wall time"
    lines += ["", f"compiled overhead / pure overhead: {paired('compiled', 'pure'):.3f}"]
    for name in ("pure", "compiled"):
        if f"base-{name}" in overheads:
            lines.append(
                f"{name} overhead / base-{name} overhead: {paired(name, 'base-' + name):.3f}"
            )
    lines += [
        "",
        "(medians of per-round ratios). "
        f"{args.rounds} rounds; per round each build's worker ran {args.batch} sequential "
        f"requests per variant, the builds one after the other in a shuffled order ({clock}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
