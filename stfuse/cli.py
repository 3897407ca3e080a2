"""The ``stfuse`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stfuse", description="Multi-tenant inference compiler")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile bundled tenants, check them against eager, time them")
    demo.add_argument("--repeat", type=int, default=50, help="timed repetitions (default 50)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(repeat=args.repeat)
    return 2


if __name__ == "__main__":
    sys.exit(main())
