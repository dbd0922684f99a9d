"""`python -m bench SCENARIO`: run a benchmark scenario; results go to bench/results/ (JSON + PNG)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from .report import RESULTS_ENV

SCENARIOS = {
    "overhead": "per-request cost of the mesh: direct vs one forwarding hop, sync and 64 in flight (+ Ray Serve)",
    "scaling": "throughput of 1, 2, 4, 8 nodes of a fixed-capacity sleep model, saturated",
    "heterogeneous": "routing policies on nodes of speed 1x/2x/4x under the same Poisson trace, vs a JSQ oracle",
    "failover": "kill -9 and SIGSTOP of one of 4 nodes under load: lost requests, detection, p99, recovery",
    "soak": "a bounded chaos run: kills, restarts, hangs, packet loss and a slow link under steady load",
    "models": "the default models through one node: tokens/s, time to first token, embeddings/s, start times",
    "transfer": "a >= 100 MB model pulled from 3 peers over a 200 Mbit/s link: clean, a sender killed, rotten chunks",
    "rollout": "every node of a 4-node mesh moves to a new model version under steady load: failures, step times",
    "scale": "100 idle echo nodes in namespaces: time to see all, packets/s, CPU and RSS per node, detection, churn",
    "gossip": "the membership protocol simulated to 10,000 nodes at 1% loss: messages/node/s, convergence, false "
    "suspicions",
    "prefix": "conversations on 3 SmolLM2 nodes: cache-aware routing vs p2c with and without the prefix cache",
    "split": "SmolLM2 split over 2 and 3 pinned hosts vs one node whole: tok/s, first token, memory, a stage killed",
}


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so every `with Testbed` stops its processes and tears its Lan down.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="lanmesh benchmarks. Nodes run as separate processes, each in a network namespace of its own "
        "on a private bridge when run as root (else on 127.0.0.1); the load generator runs on a host of its own. "
        "Results are printed and written as JSON plus a PNG to bench/results/; `report` renders "
        "bench/results/README.md from them.",
    )
    parser.add_argument("--results-dir", help=f"write results here instead of bench/results/ (env {RESULTS_ENV})")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)
    for name, text in SCENARIOS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--quick", action="store_true", help="a short CI-sized run; figures are rough")
        if name not in ("models", "gossip"):
            p.add_argument(
                "--mode",
                choices=["auto", "netns", "loopback"],
                default="auto",
                help="netns: one network namespace per host (needs root); loopback: processes on 127.0.0.1",
            )
        if name in ("overhead", "scaling", "heterogeneous", "failover", "models", "split"):
            p.add_argument("--reps", type=int, default=3, help="repetitions; the summary reports medians")
        if name == "overhead":
            p.add_argument("--no-ray", action="store_true", help="skip the Ray Serve anchor")
            p.add_argument("--identities", action="store_true",
                           help="every node and the client its own key (lanmesh init), not one mesh key")  # fmt: skip
        if name == "scale":
            p.add_argument("--nodes", type=int, help="how many nodes (default 100; --quick: 12)")
        if name == "prefix":
            p.add_argument("--conversations", type=int, help="conversations of 8 turns (default 12; --quick: 3 of 3)")
            p.add_argument("--seed", type=int, default=1, help="seed of the conversations, their times and entries")
            p.add_argument("--order", default="abc", help="the order of the runs (e.g. cba; the machine may change)")
        if name == "soak":
            p.add_argument("--minutes", type=float, default=10.0, help="length of the run (--quick: 1)")
            p.add_argument("--seed", type=int, default=7, help="seed of the fault schedule")
    sub.add_parser("report", help="render bench/results/README.md from the JSON results")
    args = parser.parse_args(argv)
    if args.results_dir:
        os.environ[RESULTS_ENV] = os.path.abspath(args.results_dir)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.scenario == "report":
        from . import summary

        print(f"written to {summary.render()}")
        return 0
    if args.scenario == "overhead":
        from . import overhead

        overhead.run(quick=args.quick, reps=args.reps, mode=args.mode, ray=not args.no_ray, identities=args.identities)
    elif args.scenario == "scaling":
        from . import scaling

        scaling.run(quick=args.quick, reps=args.reps, mode=args.mode)
    elif args.scenario == "heterogeneous":
        from . import heterogeneous

        heterogeneous.run(quick=args.quick, reps=args.reps, mode=args.mode)
    elif args.scenario == "failover":
        from . import failover

        result = failover.run(quick=args.quick, mode=args.mode, reps=args.reps)
        return 0 if result["summary"]["lost"] == 0 else 1
    elif args.scenario == "soak":
        from . import soak

        minutes = 1.0 if args.quick else args.minutes
        result = soak.run(minutes=minutes, quick=args.quick, mode=args.mode, seed=args.seed)
        return 0 if result["summary"]["failed"] == 0 else 1
    elif args.scenario == "models":
        from . import models

        models.run(quick=args.quick, reps=args.reps)  # prints why and writes nothing when the models are missing
    elif args.scenario == "transfer":
        from . import transfer

        result = transfer.run(quick=args.quick, mode=args.mode)
        return 0 if result["summary"]["all_intact"] else 1
    elif args.scenario == "scale":
        from . import scale

        result = scale.run(quick=args.quick, mode=args.mode, nodes=args.nodes)
        return 0 if result["summary"]["churn_failed"] == 0 else 1
    elif args.scenario == "gossip":
        from . import gossip

        result = gossip.run(quick=args.quick)
        return 0 if all(result["summary"]["met"].values()) else 1
    elif args.scenario == "split":
        from . import split

        result = split.run(quick=args.quick, mode=args.mode, reps=args.reps)
        return 0 if result is None or result["summary"]["failed_when_a_stage_is_killed"] == 0 else 1
    elif args.scenario == "rollout":
        from . import rollout

        result = rollout.run(quick=args.quick, mode=args.mode)
        return 0 if result["summary"]["failed"] == 0 else 1
    elif args.scenario == "prefix":
        from . import prefix

        result = prefix.run(args.quick, args.mode, args.conversations, args.seed, args.order)
        return 0 if not any(result["summary"]["failed"].values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
