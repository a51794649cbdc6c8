"""`fidelity-mw`: check, map, audit, demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fidelity-mw")
    sub = parser.add_subparsers(dest="command", required=True)
    from .demo import add_demo_arguments, run_demo

    demo = sub.add_parser("demo", help="run the side-by-side demo on in-memory state")
    add_demo_arguments(demo)
    demo.set_defaults(func=run_demo)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
