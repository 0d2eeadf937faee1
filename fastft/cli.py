"""``fastft`` command line: ``demo`` (the offline main job) and the subcommands later issues add."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from fastft.smoke import run_smoke

    return run_smoke()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft", description="Faster, leaner fine-tuning for Hugging Face TRL.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline CPU demo")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    return args.func(args)
