"""`scaling`: saturated throughput of 1, 2, 4, 8 nodes serving a sleep model of fixed capacity.

The load is a closed loop with twice the total capacity in flight, entering at every node, so every node always
has work queued; efficiency is throughput(N) / (N x throughput(1)).
"""

from __future__ import annotations

from typing import Any

from .plots import plot_scaling
from .report import median, percentile, write
from .testbed import Testbed

MS, CAP = 100, 4
MODEL = f"sleep:{MS}"


def steady(samples: list[list[Any]], warmup: float, until: float) -> tuple[float, list[float]]:
    """Requests/s completed in [warmup, until) seconds of a run, and their latencies (ms)."""
    done = [s for s in samples if s[2] and warmup <= s[1] < until]
    return len(done) / (until - warmup), [(s[1] - s[0]) * 1000 for s in done]


def run(quick: bool = False, reps: int = 3, mode: str = "auto") -> dict[str, Any]:
    sizes = (1, 2) if quick else (1, 2, 4, 8)
    duration, warmup = (5.0, 1.0) if quick else (15.0, 3.0)
    reps = 1 if quick else reps
    points: list[dict[str, Any]] = []
    where: dict[str, Any] = {}
    for n in sizes:
        in_flight = 2 * n * CAP
        per_rep = []
        with Testbed(n, mode) as bed:
            where = bed.describe()
            print(f"scaling: {n} node(s), {bed.mode} mode, {in_flight} in flight")
            for i in range(1, n + 1):
                bed.start_node(i, ["--model", f"{MODEL}:cap={CAP}", "--grace", "2"])
            bed.converge()
            for rep in range(reps):
                summary, samples = bed.run_load(MODEL, in_flight, duration, label=f"{n} nodes, rep {rep + 1}/{reps}")
                rps, lat = steady(samples, warmup, duration)
                per_rep.append(
                    {
                        "req_per_s": rps,
                        "p50_ms": percentile(lat, 50),
                        "p99_ms": percentile(lat, 99),
                        "ok": summary["ok"],
                        "failed": summary["failed"],
                        "served_by": summary["served_by"],
                    }
                )
        points.append(
            {
                "nodes": n,
                "in_flight": in_flight,
                "capacity_req_per_s": n * CAP * 1000 / MS,
                "req_per_s": median([r["req_per_s"] for r in per_rep]),
                "p50_ms": median([r["p50_ms"] for r in per_rep]),
                "p99_ms": median([r["p99_ms"] for r in per_rep]),
                "failed": sum(r["failed"] for r in per_rep),
                "runs": per_rep,
            }
        )
    one = points[0]["req_per_s"]
    for p in points:
        p["ideal_req_per_s"] = p["nodes"] * one
        p["efficiency"] = p["req_per_s"] / p["ideal_req_per_s"]
        p["of_capacity"] = p["req_per_s"] / p["capacity_req_per_s"]
    summary = {
        "points": points,
        "efficiency_at_max": points[-1]["efficiency"],
        "nodes_at_max": points[-1]["nodes"],
        "goal": "efficiency >= 95% at 8 nodes",
    }
    result = {
        "quick": quick,
        "repetitions": reps,
        "testbed": where,
        "model": {"spec": f"{MODEL}:cap={CAP}", "ms": MS, "capacity": CAP},
        "load": {"kind": "closed loop, in flight = 2 x total capacity, entering at every node", "seconds": duration},
        "measured_window": f"completions from {warmup:g} s to {duration:g} s of each run",
        "summary": summary,
    }
    path = write("scaling", result, plot=plot_scaling)
    print(f"{'nodes':>5} {'req/s':>8} {'ideal':>8} {'eff':>6} {'of cap':>7} {'p50':>7} {'p99':>7} {'failed':>6}")
    for p in points:
        print(
            f"{p['nodes']:>5} {p['req_per_s']:>8.1f} {p['ideal_req_per_s']:>8.1f} {p['efficiency'] * 100:>5.1f}%"
            f" {p['of_capacity'] * 100:>6.1f}% {p['p50_ms']:>5.0f}ms {p['p99_ms']:>5.0f}ms {p['failed']:>6}"
        )
    print(f"written to {path}")
    return result
