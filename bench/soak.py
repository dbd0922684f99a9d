"""`soak`: a bounded chaos run. Steady load on 5 nodes while a seeded schedule kills and restarts nodes,
hangs and resumes them (SIGSTOP/SIGCONT), drops packets and slows links; every fault is logged.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from .hosts import FaultUnavailable
from .plots import plot_soak
from .report import percentile, write
from .testbed import Testbed

NODES = 5
MODEL, SPEC = "sleep:50", "sleep:50:cap=4"
IN_FLIGHT = 16  # fits in the 16 slots left while one node is down
LOSS_PERCENT = 5.0
SLOW_KBIT = 1000
DELAY_MS = 20


@dataclass
class Fault:
    """One scheduled fault; `at`/`cleared_at` are seconds into the load generator's run once done."""

    kind: str
    node: str
    start: float  # planned, seconds into the run
    hold: float
    at: float | None = None
    cleared_at: float | None = None
    note: str = ""


def schedule(kinds: list[str], duration: float, seed: int, quick: bool) -> list[Fault]:
    """Faults one after another from 5 s in, leaving the last 10 s quiet so every request can finish."""
    rng = random.Random(seed)
    hold_range, gap_range = ((2.0, 4.0), (2.0, 3.0)) if quick else ((3.0, 8.0), (3.0, 7.0))
    faults: list[Fault] = []
    t = 5.0
    while True:
        hold = rng.uniform(*hold_range)
        if t + hold > duration - 10.0:
            return faults
        faults.append(Fault(rng.choice(kinds), f"n{rng.randint(1, NODES)}", round(t, 2), round(hold, 2)))
        t += hold + rng.uniform(*gap_range)


def run(minutes: float = 10.0, quick: bool = False, mode: str = "auto", seed: int = 7) -> dict[str, Any]:
    duration = minutes * 60
    with Testbed(NODES, mode) as bed:
        kinds = ["kill -9", "SIGSTOP"]
        skipped = []
        if bed.lan is not None:
            kinds += ["loss", "slow link"] + (["delay"] if bed.lan.netem else [])
            if not bed.lan.netem:
                skipped.append("delay: this kernel has no netem qdisc (the slow link uses tbf instead)")
        else:
            skipped.append("loss, slow link, delay: need network namespaces (run as root)")
        plan = schedule(kinds, duration, seed, quick)
        print(f"soak: {minutes:g} min, {bed.mode} mode, {len(plan)} faults planned ({', '.join(kinds)})")
        for i in range(1, NODES + 1):
            bed.start_node(i, ["--model", SPEC, "--grace", "2"])
        bed.converge()
        active: list[Fault] = []
        pending = list(plan)
        t0: list[float] = []

        def inject(f: Fault, now: float) -> None:
            node, host = bed.nodes[f.node], bed.lan.hosts[int(f.node[1:])] if bed.lan is not None else None
            try:
                if f.kind == "kill -9":
                    node.kill()
                elif f.kind == "SIGSTOP":
                    node.pause()
                elif f.kind == "loss" and bed.lan and host:
                    bed.lan.loss(host, LOSS_PERCENT)
                    f.note = f"{LOSS_PERCENT:g}% of packets into {f.node}'s host dropped"
                elif f.kind == "slow link" and bed.lan and host:
                    bed.lan.rate(host, SLOW_KBIT)
                    f.note = f"{SLOW_KBIT} kbit/s each way (tbf)"
                elif f.kind == "delay" and bed.lan and host:
                    bed.lan.delay(host, DELAY_MS)
                    f.note = f"{DELAY_MS} ms each way (netem)"
            except FaultUnavailable as exc:
                f.note = f"not injected: {exc}"
            f.at = now

        def clear(f: Fault, now: float) -> None:
            node, host = bed.nodes[f.node], bed.lan.hosts[int(f.node[1:])] if bed.lan is not None else None
            if f.kind == "kill -9":
                bed.restart(f.node)
            elif f.kind == "SIGSTOP":
                node.resume()
            elif f.kind == "loss" and bed.lan and host and not f.note.startswith("not"):
                bed.lan.loss(host, 0)
            elif f.kind == "slow link" and bed.lan and host and not f.note.startswith("not"):
                bed.lan.rate(host, 0)
            elif f.kind == "delay" and bed.lan and host and not f.note.startswith("not"):
                bed.lan.delay(host, 0)
            f.cleared_at = now

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "start":
                t0.append(event["t0"])
            if event["event"] != "tick" or not t0:
                return
            now = time.monotonic() - t0[0]
            for f in [f for f in active if f.at is not None and now >= f.at + f.hold]:
                clear(f, now)
                active.remove(f)
                print(f"\n  {now:6.1f}s cleared {f.kind} on {f.node}")
            while pending and now >= pending[0].start and not active:
                f = pending.pop(0)
                inject(f, now)
                active.append(f)
                print(f"\n  {now:6.1f}s {f.kind} on {f.node} for {f.hold:.1f}s {f.note}")

        summary, samples = bed.run_load(MODEL, IN_FLIGHT, duration, timeout=60.0, on_event=on_event, label="soak")
        now = time.monotonic() - (t0[0] if t0 else summary["t0"])
        for f in active:
            clear(f, now)
        unexpected = [n for n, p in bed.nodes.items() if not p.alive()]
        where = bed.describe()
    done = [f for f in plan if f.at is not None]
    total = summary["ok"] + summary["failed"]
    lat = [(s[1] - s[0]) * 1000 for s in samples if s[2]]
    result = {
        "quick": quick,
        "repetitions": 1,
        "testbed": where,
        "nodes": NODES,
        "model": SPEC,
        "load": {"kind": "closed loop entering at every node", "in_flight": IN_FLIGHT, "seconds": duration},
        "seed": seed,
        "fault_kinds": kinds,
        "skipped_faults": skipped,
        "summary": {
            "requests": total,
            "ok": summary["ok"],
            "failed": summary["failed"],
            "success_rate": summary["ok"] / total if total else None,
            "failures": summary["failures"],
            "retried": summary.get("retried"),
            "faults": len(done),
            "faults_by_kind": {k: sum(f.kind == k for f in done) for k in kinds},
            "p50_ms": percentile(lat, 50) if lat else None,
            "p99_ms": percentile(lat, 99) if lat else None,
            "max_ms": max(lat, default=None),
            "nodes_down_at_end_unplanned": unexpected,
        },
        "faults": [asdict(f) for f in done],
        "timeline": summary["timeline"],
    }
    path = write("soak", result, plot=plot_soak)
    s = result["summary"]
    print(
        f"soak: {s['ok']}/{s['requests']} served ({(s['success_rate'] or 0) * 100:.3f}%), {s['failed']} failed,"
        f" {s['faults']} faults; written to {path}"
    )
    return result
