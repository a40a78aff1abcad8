"""Command line: `treeidx <command>` or `python -m treeidx <command>`.

Commands: `demo` (the main job: train a code-search dual encoder with treeidx
negatives and with in-batch negatives, print the test table, write a plot) and `info`
(version, threading layer, CPU count).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="treeidx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="print version and runtime facts")
    from .codesearch import demo

    demo.add_arguments(
        sub.add_parser(
            "demo",
            help="train a dual encoder with treeidx negatives vs in-batch negatives",
            description=demo.__doc__.split("\n\n")[0].replace("\n", " "),
        )
    )
    args = parser.parse_args(argv)
    if args.command == "info":
        import numba

        from ._version import __version__

        print(
            f"treeidx {__version__}; numba {numba.__version__} "
            f"({numba.config.THREADING_LAYER} threading layer), {os.cpu_count()} CPUs"
        )
        return 0
    if args.command == "demo":
        return demo.run(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
