"""Command line: `treeidx <command>` or `python -m treeidx <command>`.

Commands: `info` (version, threading layer, CPU count). The one-command training
demo (`treeidx demo`) arrives with the training issue; until then the main job is the
benchmarks: `python -m bench.search ...` and `python -m bench.sample ...`.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="treeidx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print version and runtime facts")
    sub.add_parser("demo", help="train a dual encoder with treeidx negatives (not yet available)")
    args = parser.parse_args(argv)
    if args.command == "info":
        import numba

        from . import __version__
        print(f"treeidx {__version__}; numba {numba.__version__} "
              f"({numba.config.THREADING_LAYER} threading layer), {os.cpu_count()} CPUs")
        return 0
    if args.command == "demo":
        print("treeidx demo is not available yet; run the benchmarks instead:\n"
              "  python -m bench.search --n 200000 --dim 64 --dataset clustered\n"
              "  python -m bench.sample --n 200000 --dim 64 --k 64", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
