"""`fidelity-mw demo`. Placeholder: filled in with the Core demo."""

from __future__ import annotations

import argparse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=1)


def run_demo(args: argparse.Namespace) -> int:
    print("demo not built yet")
    return 1
