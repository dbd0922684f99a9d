"""`heterogeneous`: routing policies on nodes of speed 1x, 2x and 4x under the same seeded Poisson trace.

Six nodes serve one model name (sleep 200/100/50 ms, capacity 2 each); the open-loop trace offers ~75% of the
total capacity and enters at every node uniformly. Each of lanmesh's `--routing` policies routes it, then an
ideal central join-shortest-queue dispatcher (exact outstanding counts, sent straight to the chosen node).
"""

from __future__ import annotations

from typing import Any

from .plots import plot_heterogeneous
from .report import median, progress, write
from .testbed import Testbed, read_events

SPEEDS_MS = (200, 200, 100, 100, 50, 50)  # 1x, 1x, 2x, 2x, 4x, 4x
CAP = 2
MODEL = "work"  # one model name served at three speeds (a name of its own: "sleep" becomes "sleep:MS")
UTILISATION = 0.75
POLICIES = ("p2c", "round-robin", "random", "least-loaded", "jsq-oracle")


def capacity() -> float:
    return sum(CAP * 1000 / ms for ms in SPEEDS_MS)


def run(quick: bool = False, reps: int = 3, mode: str = "auto") -> dict[str, Any]:
    duration = 8.0 if quick else 30.0
    reps = 1 if quick else reps
    rate = UTILISATION * capacity()
    per_policy: dict[str, list[dict[str, Any]]] = {}
    where: dict[str, Any] = {}
    for policy in POLICIES:
        per_policy[policy] = []
        with Testbed(len(SPEEDS_MS), mode) as bed:
            where = bed.describe()
            routing = "p2c" if policy == "jsq-oracle" else policy  # the oracle bypasses routing (hops=1)
            print(f"heterogeneous: {policy}, {bed.mode} mode, {rate:.0f} req/s offered")
            for i, ms in enumerate(SPEEDS_MS, start=1):
                spec = f"name={MODEL},kind=sleep,ms={ms},cap={CAP}"
                bed.start_node(i, ["--model", spec, "--routing", routing, "--grace", "2"])
            bed.converge()
            for rep in range(reps):
                args = ["trace", "--nodes", ",".join(bed.addresses()), "--model", MODEL, "--rate", f"{rate:.3f}"]
                args += ["--duration", str(duration), "--seed", str(rep + 1), "--timeout", "60"]
                if policy == "jsq-oracle":
                    args += ["--jsq", ",".join(str(CAP) for _ in SPEEDS_MS)]
                proc = bed.spawn_tool(*args)
                s: dict[str, Any] | None = None
                label = f"{policy} {rep + 1}/{reps}"
                for ev in read_events(proc):
                    if ev["event"] == "tick" and ev["second"] + 1 <= duration:
                        progress(int(ev["second"] + 1), int(duration), f"{label}: {ev['total_ok']} ok")
                    elif ev["event"] == "summary":
                        s = ev
                err = proc.stderr.read() if proc.stderr is not None else ""
                proc.wait(30)
                if s is None:
                    raise RuntimeError(f"the trace generator died:\n{err[-3000:]}\n{bed.logs()}")
                s.pop("timeline", None)
                by_speed: dict[str, int] = {}
                for i, ms in enumerate(SPEEDS_MS, start=1):
                    key = f"{1000 // ms // 5}x"
                    by_speed[key] = by_speed.get(key, 0) + s["served_by"].get(f"n{i}", 0)
                s["served_by_speed"] = by_speed
                per_policy[policy].append(s)
                print(
                    f"  p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms, {s['ok']}/{s['count']} ok,"
                    f" {s['rejected']} rejected, {s['failed']} failed, served by speed {by_speed}"
                )
    policies = {}
    for policy, rs in per_policy.items():
        policies[policy] = {
            "p50_ms": median([r["p50_ms"] for r in rs if r["p50_ms"] is not None]),
            "p99_ms": median([r["p99_ms"] for r in rs if r["p99_ms"] is not None]),
            "mean_ms": median([r["mean_ms"] for r in rs if r["mean_ms"] is not None]),
            "throughput_req_per_s": median([r["ok"] / r["seconds"] for r in rs]),
            "requests": sum(r["count"] for r in rs),
            "ok": sum(r["ok"] for r in rs),
            "rejected": sum(r["rejected"] for r in rs),
            "failed": sum(r["failed"] for r in rs),
            "served_by_speed": rs[0]["served_by_speed"],
        }
    p2c, oracle, least = policies["p2c"], policies["jsq-oracle"], policies["least-loaded"]
    summary = {
        "policies": policies,
        "p2c_p99_over_oracle": p2c["p99_ms"] / oracle["p99_ms"],
        "least_loaded_p99_over_p2c": least["p99_ms"] / p2c["p99_ms"],
        "goals": "p2c p99 <= 1.3x the oracle's; least-loaded-on-gossip p99 >= 2x p2c's",
    }
    result = {
        "quick": quick,
        "repetitions": reps,
        "testbed": where,
        "nodes": [{"name": f"n{i}", "ms": ms, "capacity": CAP} for i, ms in enumerate(SPEEDS_MS, start=1)],
        "trace": {
            "kind": "open loop, Poisson arrivals, entry node drawn uniformly; seeds 1..reps, the same for every policy",
            "rate": rate,
            "utilisation": UTILISATION,
            "capacity_req_per_s": capacity(),
            "seconds": duration,
        },
        "oracle": "central join-shortest-queue on exact (outstanding + 1) / capacity, ties at random; "
        "requests sent straight to the chosen node with hops=1 (served there, no routing)",
        "summary": summary,
        "runs": per_policy,
    }
    path = write("heterogeneous", result, plot=plot_heterogeneous)
    print(f"{'policy':<14} {'p50':>8} {'p99':>8} {'req/s':>7} {'rejected':>8} {'failed':>6}")
    for name, p in policies.items():
        print(
            f"{name:<14} {p['p50_ms']:>6.0f}ms {p['p99_ms']:>6.0f}ms {p['throughput_req_per_s']:>7.1f}"
            f" {p['rejected']:>8} {p['failed']:>6}"
        )
    print(
        f"p2c p99 = {summary['p2c_p99_over_oracle']:.2f}x the oracle's; least-loaded p99 ="
        f" {summary['least_loaded_p99_over_p2c']:.2f}x p2c's; written to {path}"
    )
    return result
