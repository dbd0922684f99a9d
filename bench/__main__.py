"""`python -m bench SCENARIO`: run a benchmark scenario; results go to bench/results/."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="lanmesh benchmarks. Nodes run as separate processes bound to 127.0.0.1 (no mDNS); "
        "results are printed and written as JSON to bench/results/.",
    )
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)
    p = sub.add_parser(
        "overhead", help="per-request cost of the mesh: direct vs one forwarding hop, sync and 64 in flight"
    )
    p.add_argument("--quick", action="store_true", help="a short run (for CI smoke tests); figures are rough")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the summary reports medians")
    args = parser.parse_args(argv)
    if args.scenario == "overhead":
        from . import overhead

        overhead.run(quick=args.quick, reps=args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
