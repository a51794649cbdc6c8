"""`fidelity-mw demo`: the load-balancer-chaos scenario, scattered control layers against
fidelity_mw's one decision context, side by side (docs/demo.md); with `--variants`, also
the same front on one all-in-one toolkit (nopanic, `toolkit.py`).

Real servers on loopback (uvicorn, in this process's event loop): three
upstream instances with scripted faults, a front service in two variants,
and a population of clients. Nothing to install beyond the dev extra, no
server to run: state is in memory unless `--redis URL` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from typing import Any

_NEEDED = {
    "uvicorn": "uvicorn",
    "tenacity": "tenacity",
    "httpx_retries": "httpx-retries",
    "limits": "limits",
}
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


_VARIANT_NAMES = ("scattered", "toolkit", "fidelity")  # runner.VARIANTS, without its imports
_VARIANT_MODULES = {"toolkit": {"nopanic": "nopanic"}}  # what a variant needs beyond the demo extra


def _variants(text: str) -> tuple[str, ...]:
    """`--variants`: a comma-separated subset of scattered, toolkit, fidelity (any order;
    they run and show in that order), or a usage error (exit 2)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in _VARIANT_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of " + ", ".join(_VARIANT_NAMES)
        )
    return tuple(n for n in _VARIANT_NAMES if n in names)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 4.0 <= value <= 3600.0:
        raise argparse.ArgumentTypeError(f"{value:g} s is out of range: allowed 4 to 3600")
    return value


def _clients(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 200:
        raise argparse.ArgumentTypeError(f"{value} clients is out of range: allowed 1 to 200")
    return value


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "tiered+redis://", "tiered+rediss://")


def _redis_url(text: str) -> str:
    """`--redis`: a URL the store can build a Redis client from, or a usage error (exit
    2, like every malformed argument). Whether a Redis answers there is checked before
    the run (exit 1)."""
    from ..policy.model import redact_url

    shown = redact_url(text)
    if text.startswith("memory://"):
        raise argparse.ArgumentTypeError(
            f"{shown}: in-memory state is what the demo runs on without --redis; "
            "give a Redis URL or leave out --redis"
        )
    if not text.startswith(_REDIS_SCHEMES):
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not a Redis URL: use one of "
            + ", ".join(_REDIS_SCHEMES)
            + " (e.g. redis://localhost:6379/0)"
        )
    try:
        from redis.asyncio.connection import parse_url

        from ..state.redis import redis_url
    except ImportError:  # said before the run: the redis extra is not installed
        return text
    try:
        parse_url(redis_url(text)[0])
    except ValueError as exc:  # a port that is no number, a bad query value...
        raise argparse.ArgumentTypeError(f"{shown}: {exc}") from None
    return text


def _otlp_url(text: str) -> str:
    """`--otlp`: an OTLP/HTTP endpoint, http(s)://host[:port], or a usage error (exit 2).
    (A bare "localhost:4318" ran the whole demo, every export failing, and said
    "exported".)"""
    from urllib.parse import urlsplit

    from ..policy.model import redact_url

    shown = redact_url(text)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is no number
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{shown}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not an OTLP/HTTP endpoint: give http://HOST:PORT "
            "(e.g. http://localhost:4318)"
        )
    return text


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "The load-balancer-chaos scenario: an upstream fleet with scripted faults, a front "
        "service with scattered control layers (tenacity, httpx-retries, a breaker on a "
        "delayed metrics snapshot, a fixed-window limiter) and the same service on "
        "fidelity_mw, driven by the same clients; the numbers side by side. "
        "--variants toolkit adds the same front built on one all-in-one toolkit (nopanic)."
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for every random choice")
    parser.add_argument(
        "--duration",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="approximate length of the whole run in seconds, both variants (default 60)",
    )
    parser.add_argument(
        "--clients", type=_clients, default=20, metavar="N", help="clients (default 20)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of the table"
    )
    parser.add_argument(
        "--plot", metavar="FILE.png", help="save a picture (needs the 'plot' extra: matplotlib)"
    )
    parser.add_argument(
        "--otlp",
        type=_otlp_url,
        metavar="URL",
        help="send the fidelity variant's traces over OTLP/HTTP (e.g. http://localhost:4318)",
    )
    parser.add_argument(
        "--redis",
        type=_redis_url,
        metavar="URL",
        help="run the fidelity variant on Redis state (policy state.url), e.g. "
        "redis://localhost:6379/0 (also rediss://, unix://, tiered+redis://). A malformed "
        "URL is a usage error (exit 2); a Redis that does not answer a PING stops the demo "
        "before the run (exit 1)",
    )
    parser.add_argument(
        "--variants",
        type=_variants,
        default=("scattered", "fidelity"),
        metavar="LIST",
        help="which fronts to run, comma-separated: scattered, toolkit (the same front on "
        "nopanic, an all-in-one toolkit: pip install nopanic), fidelity (default "
        "scattered,fidelity)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _missing_modules(variants: tuple[str, ...] = ()) -> list[str]:
    needed = dict(_NEEDED)
    for variant in variants:
        needed.update(_VARIANT_MODULES.get(variant, {}))
    return [pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None]


def _error(message: str) -> int:
    print(f"fidelity-mw demo: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _telemetry_observer(url: str) -> tuple[Any, Any, str | None]:
    """(observer, setup to shut down, message if unavailable) for `--otlp URL`."""
    from .. import telemetry

    configure = getattr(telemetry, "configure_otel", None)
    default = getattr(telemetry, "default_telemetry", None)
    if configure is None or default is None:
        return None, None, "OTLP export is unavailable in this build (no telemetry setup helper)"
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = url
    setup = configure(service_name="fidelity-mw-demo")
    return default(), setup, None


async def _redis_unreachable(state: Any) -> str | None:
    """Why the policy's Redis does not answer a PING (None: it does)."""
    try:
        from ..state.redis import build_client
    except ImportError:
        return "the redis extra is not installed: pip install 'fidelity-mw[redis]'"
    client = build_client(state.url, state)
    try:
        await client.ping()
    except Exception as exc:  # any failure is the answer
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()
    return None


def run_demo(args: argparse.Namespace) -> int:
    variants: tuple[str, ...] = tuple(getattr(args, "variants", ("scattered", "fidelity")))
    missing = _missing_modules(variants)
    if "nopanic" in missing:
        return _error(
            "--variants toolkit runs the front on nopanic, which is not installed: "
            "pip install nopanic"
        )
    if missing:
        return _error(
            "the demo needs " + ", ".join(missing) + " (install the demo extra: "
            "pip install 'fidelity-mw[demo]')"
        )
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            return _error(
                "--plot needs matplotlib, which is not installed: "
                "pip install 'fidelity-mw[plot]' (or pip install matplotlib)"
            )
        if not str(args.plot).lower().endswith(".png"):
            return _error(f"--plot {args.plot}: give a .png file name")

    from ..errors import PolicyError
    from .fronts import fidelity_policy
    from .report import decision_lines, json_document, plot, render_scenario, render_table
    from .runner import Progress, run_scenario
    from .scenario import ScenarioConfig

    cfg = ScenarioConfig(
        seed=args.seed,
        duration_s=args.duration,
        clients=args.clients,
        redis_url=args.redis,
    )
    try:
        policy = fidelity_policy(cfg)
    except PolicyError as exc:
        print(f"fidelity-mw demo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if cfg.redis_url:
        unreachable = asyncio.run(_redis_unreachable(policy.state))
        if unreachable:
            # Run anyway and every decision would be the fallback's: a demo of an outage,
            # not of Redis state, and no word why.
            print(
                f"fidelity-mw demo: --redis {args.redis}: Redis does not answer "
                f"({unreachable}); start it, or leave out --redis to run on in-memory state",
                file=sys.stderr,
            )
            return EXIT_FAILED

    extra: dict[str, Any] = {"otlp": None}
    observer = setup = None
    if args.otlp:
        observer, setup, unavailable = _telemetry_observer(args.otlp)
        if unavailable:
            print(f"fidelity-mw demo: --otlp: {unavailable}", file=sys.stderr)
            extra["otlp"] = {"url": args.otlp, "exported": False, "reason": unavailable}
        else:
            extra["otlp"] = {"url": args.otlp, "exported": True}

    progress = Progress(sys.stderr, enabled=not args.no_progress)
    if not args.json:
        print(render_scenario(cfg))
        print()
    try:
        results = asyncio.run(run_scenario(cfg, progress, observer, variants))
    except PolicyError as exc:
        print(f"fidelity-mw demo: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nfidelity-mw demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if setup is not None:
            setup.shutdown()

    if args.plot:
        plot(results, cfg, args.plot)
        extra["plot"] = args.plot
    if args.json:
        print(json.dumps(json_document(results, cfg, extra), indent=2))
        return EXIT_OK
    for result in results.values():
        print(f"{result.label}: one line per decision, for a few requests")
        for line in decision_lines(result):
            print(line)
        print()
    print(render_table(results, cfg))
    if args.plot:
        print(f"plot saved to {args.plot}")
    return EXIT_OK


__all__ = ["add_demo_arguments", "run_demo"]
