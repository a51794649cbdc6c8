"""`fidelity-mw`: check, map, audit, demo.

Exit codes: 0 clean, 1 findings (policy errors; audit findings of a
`--fail-on` kind), 2 usage errors (bad arguments, unreadable files, an app
that cannot be imported), 3 an audit under `--fail-on` that could not read
every file (unless `--allow-skipped`) or found no Python file to scan, 141
when the reader of the output went away (`fidelity-mw map app | head`), as for
a process a shell's SIGPIPE ended.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 3  # audit --fail-on: some files were not read, so the gate cannot vouch for them
EXIT_PIPE = 128 + 13  # SIGPIPE: `| head` stopped reading


def _usage_error(command: str, message: str) -> int:
    print(f"fidelity-mw {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ---------------------------------------------------------------- check


def run_check(args: argparse.Namespace) -> int:
    from .check import CheckResult, Finding, check_file

    results: list[CheckResult] = []
    for name in args.policy:
        # A path that is no policy file is that path's error: the others are still checked.
        path = Path(name)
        problem = None
        if path.is_dir():
            problem = "is a directory, not a policy file"
        elif not path.exists():
            problem = "no such file"
        else:
            try:
                results.append(check_file(name, workers=args.workers))
            except OSError as exc:
                problem = f"cannot read: {exc.strerror or exc}"
        if problem is not None:
            results.append(CheckResult(name, errors=[Finding(name, None, "", problem)]))
    failed = any(not r.ok or (args.strict and r.warnings) for r in results)
    if args.json:
        doc = {
            "ok": not failed,
            "files": [r.to_json() for r in results],
        }
        print(json.dumps(doc, indent=2))
        return EXIT_FINDINGS if failed else EXIT_OK
    for r in results:
        findings = sorted(r.errors + r.warnings, key=lambda f: (f.line or 0, f.path))
        for f in findings:
            print(f)
        if r.policy is not None:
            p = r.policy
            summary = (
                f"ok, policy version {p.version}: {len(p.rate_limits)} rate limit(s), "
                f"{len(p.routes)} route(s), {len(p.upstreams)} upstream(s), "
                f"state {p.state.url.split('://')[0]}"
            )
            if r.warnings:
                summary += f"; {len(r.warnings)} warning(s)"
            print(f"{r.file}: {summary}")
        else:
            print(f"{r.file}: {len(r.errors)} error(s)")
    return EXIT_FINDINGS if failed else EXIT_OK


# ---------------------------------------------------------------- map


def run_map(args: argparse.Namespace) -> int:
    from ..errors import PolicyError
    from .statemap import build, render

    target: str = args.target
    is_policy = target.endswith(".toml") or Path(target).is_file()
    if is_policy and Path(target).is_dir():
        return _usage_error("map", f"{target}: is a directory, not a policy file")
    if is_policy and not Path(target).is_file():
        return _usage_error("map", f"{target}: no such file")
    if not is_policy and ":" not in target:
        return _usage_error(
            "map", f"{target!r} is neither a policy file nor an app import path (module:app)"
        )
    if not is_policy and not target.partition(":")[0].strip():
        # (importlib said "Empty module name", after "importing  raised ValueError")
        return _usage_error(
            "map",
            f"{target!r} names no module before its ':': write the app's import path as "
            "module:attr (e.g. myservice.main:app, or path/to/app.py:app)",
        )
    try:
        smap = build(target)
    except PolicyError as exc:
        print(f"fidelity-mw map: {exc}\n(run `fidelity-mw check {target}` for lines)")
        return EXIT_FINDINGS
    except (ImportError, AttributeError) as exc:
        return _usage_error("map", f"cannot load {target}: {type(exc).__name__}: {exc}")
    except TypeError as exc:  # (load_target: the object named is no app)
        return _usage_error("map", f"cannot map {target}: {exc}")
    sys.stdout.write(render(smap, args.format))
    return EXIT_OK


# ---------------------------------------------------------------- audit


def _fail_on(text: str) -> frozenset[str]:
    from .audit import parse_fail_on

    try:
        return parse_fail_on(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_count(text: str) -> int:
    # 0 or -3 workers was taken and the memory:// check quietly skipped: no server runs
    # an app on fewer than one process, so such a count is a typo to name
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} is not a worker count: give 1 or more")
    return count


def run_audit(args: argparse.Namespace) -> int:
    from .audit import audit_paths, render_text

    for name in args.paths:
        if not Path(name).exists():
            return _usage_error("audit", f"{name}: no such file or directory")
    report = audit_paths(args.paths, args.exclude)
    report.keep_at_least(args.min_confidence)
    if args.json:
        doc = report.to_json()
        doc["fail_on"] = sorted(args.fail_on)
        doc["allow_skipped"] = args.allow_skipped
        print(json.dumps(doc, indent=2))
    else:
        sys.stdout.write(render_text(report))
    if not args.fail_on:
        return EXIT_OK  # a report, not a gate
    if report.skipped and not args.allow_skipped:
        # A gate that passed over files it never read would vouch for code it has not seen.
        # This outranks findings: fixing every finding listed still leaves the unread files.
        print(
            f"fidelity-mw audit: {len(report.skipped)} file(s) could not be read and were "
            "not scanned; failing the gate (--allow-skipped to pass over them)",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    if report.scanned == 0 and not report.skipped:
        # A gate over no files passes everything: a mistyped path or an --exclude that
        # matches the whole tree would turn CI's check off without anyone noticing.
        print(
            "fidelity-mw audit: no Python files were scanned (check the paths and "
            "--exclude); failing the gate",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    if any(f.kind in args.fail_on for f in report.findings):
        return EXIT_FINDINGS
    return EXIT_OK


# ---------------------------------------------------------------- main


def _version() -> str:
    from .. import __version__
    from ..buildinfo import build_name

    return f"fidelity-mw {__version__} ({build_name()})"


def build_parser() -> argparse.ArgumentParser:
    from ..demo import add_demo_arguments, run_demo

    parser = argparse.ArgumentParser(
        prog="fidelity-mw",
        description="Retries, circuit breaking and rate limiting for ASGI apps, in one place.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser(
        "check",
        help="validate policy files",
        description="Validate policy files: every problem with file, line and key path. "
        "Exit 1 on errors, 0 when clean, 2 on usage errors.",
    )
    check.add_argument("policy", nargs="+", metavar="POLICY.toml")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N",
        help="worker processes that will serve the app (uvicorn --workers, gunicorn -w; "
        "default: $WEB_CONCURRENCY): more than one with memory:// state is a warning",
    )
    check.set_defaults(func=run_check)

    map_ = sub.add_parser(
        "map",
        help="print the layer and state map",
        description="Every control layer, what it decides, on which data, where that state "
        "lives, who writes it, how stale it may be and what happens when it is unreachable. "
        "Given module:app, also walk the app's middleware stack and httpx/redis clients and "
        "warn about overlapping control layers. Exit 0 with the map, 1 when the policy is "
        "invalid, 2 on usage errors (no such file, an app that cannot be imported).",
    )
    map_.add_argument("target", metavar="POLICY.toml|module:app")
    map_.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    map_.set_defaults(func=run_map)

    audit = sub.add_parser(
        "audit",
        help="find scattered retry/breaker/limiter logic",
        description="Static scan (nothing is imported) for retry, circuit-breaker and "
        "rate-limiter logic outside fidelity_mw (and the timeouts, bulkheads and hedges of "
        "the all-in-one toolkits), with the policy key that replaces each. Exit 0, or 1 "
        "when findings of the --fail-on kinds exist, or 3 under --fail-on when some files "
        "could not be read (syntax errors, unreadable files) or no Python file was scanned; "
        "2 on usage errors.",
    )
    audit.add_argument("paths", nargs="+", metavar="PATH")
    audit.add_argument("--json", action="store_true", help="machine-readable output")
    audit.add_argument(
        "--fail-on",
        type=_fail_on,
        default=frozenset(),
        metavar="KINDS",
        help="exit 1 when findings of these kinds exist: comma-separated retry, breaker, "
        "limiter, timeout, bulkhead, hedge, or any (default: always exit 0)",
    )
    audit.add_argument(
        "--allow-skipped",
        action="store_true",
        help="under --fail-on, do not fail (exit 3) when some files could not be read; "
        "they are still listed as skipped",
    )
    audit.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip files or directories matching GLOB (repeatable); "
        ".venv, build, site-packages and the like are always skipped",
    )
    audit.add_argument(
        "--min-confidence",
        choices=("high", "medium", "low"),
        default="low",
        help="report only findings at least this sure (default: low, everything)",
    )
    audit.set_defaults(func=run_audit)

    demo = sub.add_parser("demo", help="run the side-by-side demo on in-memory state")
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or EXIT_OK
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (`| head`, `| grep -q`) is gone: stop quietly, as other tools do,
        # not with a traceback. Python's own flush at exit would raise again: point
        # stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # stdout is no file (replaced in-process): nothing flushes it at exit
        finally:
            os.close(devnull)
        return EXIT_PIPE
    return code


if __name__ == "__main__":
    sys.exit(main())
