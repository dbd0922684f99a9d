"""`failover`: kill -9, then (a separate run) SIGSTOP, of one of 4 nodes under steady load.

Measures requests lost, how long until every survivor reports the node suspect and dead, p99 in the seconds
after the fault against the seconds before, and how long until throughput is back within 10% of the level the
remaining nodes sustain.
"""

from __future__ import annotations

import time
from typing import Any

from .plots import plot_failover
from .procs import NodeProc
from .report import median, percentile, write
from .testbed import Testbed, read_events

NODES = 4
MODEL, SPEC = "sleep:100", "sleep:100:cap=8"
IN_FLIGHT = 32
VICTIM = f"n{NODES}"
FAULTS = {"kill -9": NodeProc.kill, "SIGSTOP": NodeProc.pause}


def one_run(fault: str, quick: bool, mode: str, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One cluster, one fault of the victim at `pre` seconds into the load; (measurements, where it ran)."""
    pre, post, window = (4.0, 8.0, 3.0) if quick else (10.0, 20.0, 5.0)
    with Testbed(NODES, mode) as bed:
        for i in range(1, NODES + 1):
            bed.start_node(i, ["--model", SPEC, "--grace", "2"])
        bed.converge()
        survivors = [n for n in bed.nodes if n != VICTIM]
        detector = bed.spawn_tool(
            "detect", "--nodes", ",".join(bed.addresses(survivors)), "--peer", VICTIM, "--timeout", str(pre + post + 15)
        )
        watch = read_events(detector)
        if not any(ev["event"] == "ready" for ev in watch):
            raise RuntimeError(f"the detector never saw {VICTIM} alive on every survivor\n{bed.logs()}")
        t_fault: list[float] = []

        def inject(event: dict[str, Any]) -> None:
            if event["event"] == "tick" and not t_fault and event["second"] + 1 >= pre:
                FAULTS[fault](bed.nodes[VICTIM])
                t_fault.append(time.monotonic())

        summary, samples = bed.run_load(MODEL, IN_FLIGHT, pre + post, on_event=inject, label=label)
        seen: dict[str, Any] = {}
        for ev in watch:
            if ev["event"] == "summary":
                seen = ev
        detector.wait(30)
        where = bed.describe()
    if not t_fault:
        raise RuntimeError("the load ended before the fault was injected")
    fault_at = t_fault[0] - summary["t0"]  # seconds into the load generator's run
    return analyse(summary, samples, fault_at, t_fault[0], seen, pre, post, window), where


def analyse(
    summary: dict[str, Any],
    samples: list[list[Any]],
    fault_at: float,
    t_fault: float,
    seen: dict[str, Any],
    pre: float,
    post: float,
    window: float,
) -> dict[str, Any]:
    ok = [(s[0] - fault_at, s[1] - fault_at) for s in samples if s[2]]  # times relative to the fault

    def lat_ms(lo: float, hi: float) -> list[float]:
        return [(e - s) * 1000 for s, e in ok if lo <= e < hi]

    # Per-second throughput and p99 over a trailing 1 s window, every 0.25 s.
    timeline: list[dict[str, Any]] = []
    t = -pre + 1.0
    while t <= post - 0.5:
        lat = lat_ms(t - 1.0, t)
        timeline.append({"t": round(t, 2), "req_per_s": len(lat), "p99_ms": percentile(lat, 99) if lat else None})
        t += 0.25
    settled = [r["req_per_s"] for r in timeline if post / 2 <= r["t"] <= post - 0.5]
    before = [r["req_per_s"] for r in timeline if -pre + 2 <= r["t"] <= 0]
    level = median(settled)
    recovery = None
    after = [r for r in timeline if r["t"] >= 1.0]
    for i, r in enumerate(after):
        span = [x for x in after[i:] if x["t"] <= r["t"] + 2.0]
        if all(abs(x["req_per_s"] - level) <= 0.1 * level for x in span):
            recovery = r["t"] - 1.0  # the start of the first 1 s window that is back within 10%
            break
    detection: dict[str, Any] = {"per_survivor": {}}
    marks = seen.get("seen", {})
    for addr, m in marks.items():
        detection["per_survivor"][addr] = {k: (v - t_fault if v is not None else None) for k, v in m.items()}
    rows = detection["per_survivor"].values()
    firsts = [r["first_not_alive"] for r in rows]
    deads = [r["dead"] for r in rows]
    detection["suspect_s"] = max(firsts) if firsts and None not in firsts else None
    detection["dead_s"] = max(deads) if deads and None not in deads else None
    detection["complete"] = bool(seen.get("complete"))
    return {
        "requests": summary["ok"] + summary["failed"],
        "lost": summary["failed"],
        "failures": summary["failures"],
        "retried": summary.get("retried"),
        "served_by": summary["served_by"],
        "routes": summary["routes"],
        "fault_at_s": fault_at,
        "detection": detection,
        "p99_before_ms": percentile(lat_ms(-window, 0), 99),
        "p99_fault_window_ms": percentile(lat_ms(0, window), 99),
        "max_latency_fault_window_ms": max(lat_ms(0, window), default=None),
        "req_per_s_before": median(before),
        "req_per_s_after": level,
        "min_req_per_s_after_fault": min((r["req_per_s"] for r in after if r["t"] <= window), default=None),
        "recovery_s": recovery,
        "timeline": timeline,
    }


def run(quick: bool = False, mode: str = "auto", reps: int = 3) -> dict[str, Any]:
    reps = 1 if quick else reps
    runs: dict[str, dict[str, Any]] = {}
    all_reps: dict[str, list[dict[str, Any]]] = {}
    where: dict[str, Any] = {}
    for fault in FAULTS:
        all_reps[fault] = []
        for rep in range(reps):
            print(f"failover: {fault} of {VICTIM}, rep {rep + 1}/{reps}")
            r, where = one_run(fault, quick, mode, f"{fault} {rep + 1}/{reps}")
            all_reps[fault].append(r)
            d = r["detection"]
            print(
                f"  lost {r['lost']}/{r['requests']}, all suspect after {_s(d['suspect_s'])}, dead after"
                f" {_s(d['dead_s'])}, p99 {r['p99_before_ms']:.0f} -> {r['p99_fault_window_ms']:.0f} ms,"
                f" recovered in {_s(r['recovery_s'])}"
            )
        first = all_reps[fault][0]
        runs[fault] = {**first, "lost": sum(r["lost"] for r in all_reps[fault])}
        runs[fault]["requests"] = sum(r["requests"] for r in all_reps[fault])
    summary: dict[str, Any] = {"lost": sum(r["lost"] for rs in all_reps.values() for r in rs)}
    for fault, rs in all_reps.items():
        summary[fault] = {
            "lost": sum(r["lost"] for r in rs),
            "requests": sum(r["requests"] for r in rs),
            "suspect_s": _med([r["detection"]["suspect_s"] for r in rs]),
            "dead_s": _med([r["detection"]["dead_s"] for r in rs]),
            "p99_before_ms": median([r["p99_before_ms"] for r in rs]),
            "p99_fault_window_ms": median([r["p99_fault_window_ms"] for r in rs]),
            "recovery_s": _med([r["recovery_s"] for r in rs]),
            "req_per_s_before": median([r["req_per_s_before"] for r in rs]),
            "req_per_s_after": median([r["req_per_s_after"] for r in rs]),
        }
    result = {
        "quick": quick,
        "repetitions": reps,
        "testbed": where,
        "nodes": NODES,
        "model": SPEC,
        "load": {"kind": "closed loop entering at every node (the victim too)", "in_flight": IN_FLIGHT},
        "definitions": {
            "suspect_s": "from the fault until every survivor reports the victim not alive (suspect, dead or gone)",
            "dead_s": "from the fault until every survivor reports it dead",
            "p99_fault_window_ms": "p99 of requests completing in the first seconds after the fault (see window_s)",
            "recovery_s": "until a 1 s window of throughput is back within 10% of the post-fault steady level "
            "and stays there for 2 s",
            "window_s": 3.0 if quick else 5.0,
        },
        "summary": summary,
        "runs": runs,
        "all_runs": {f: [{k: v for k, v in r.items() if k != "timeline"} for r in rs] for f, rs in all_reps.items()},
    }
    path = write("failover", result, plot=plot_failover)
    print(f"lost {summary['lost']} requests in all; written to {path}")
    return result


def _med(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if len(known) == len(values) and known else None


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f}s"
