"""`scale`: a hundred idle `echo` nodes (--quick: 12), one network namespace each on one bridge, with mDNS.

Measures what the mesh itself costs: the time until every node sees every other after the last one started;
per node packets/s and bytes/s in and out (the switch's port counters, so nothing runs inside the hosts to read
them), CPU and RSS, idle and under a light paced load; how long until every other node sees a kill -9 and a
SIGSTOP; and failed requests while nodes are killed and restarted under that load. Needs root (namespaces).
"""

from __future__ import annotations

import calendar
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

from .hosts import Traffic
from .plots import plot_scale
from .procs import NodeProc
from .report import percentile, write
from .testbed import Testbed, read_events

NODES, QUICK_NODES = 100, 12
START_BATCH = 4  # nodes started at once (a node's start is ~1 s of CPU; 2 cores)
LIGHT_RATE = 50.0  # requests/s of the light load, mesh-wide
CHURN, QUICK_CHURN = 10, 2  # nodes killed and restarted under the light load
GOALS = {
    "idle_packets_in_per_s": 60,
    "idle_cpu_percent": 1.0,
    "see_all_s": 5.0,
    "kill_detected_s": 1.5,
    "sigstop_detected_s": 3.5,
    "churn_failed": 0,
}
_CLK = os.sysconf("SC_CLK_TCK")
_TRANSITION = re.compile(r'ts=(\S+) .*msg="peer (\S+): (\S+) -> (\S+) \(([^)]*)\)"')


def run(quick: bool = False, mode: str = "auto", nodes: int | None = None) -> dict[str, Any]:
    n = nodes or (QUICK_NODES if quick else NODES)
    if mode == "loopback":
        raise RuntimeError("the scale scenario measures each node's network interface: it needs --mode netns (root)")
    with Testbed(n, "netns") as bed:
        result = _measure(bed, n, quick)
        result["testbed"] = bed.describe()
    path = write("scale", result, plot=plot_scale)
    _print(result, path)
    return result


def _measure(bed: Testbed, n: int, quick: bool) -> dict[str, Any]:
    idle_s, load_s = (8.0, 8.0) if quick else (30.0, 30.0)
    print(f"scale: {n} echo nodes, one namespace each")
    t_spawned, t_ready, wall_spawned = _start_all(bed, n)
    print(f"  all {n} started; the last one was started {t_ready - t_spawned:.1f} s before it answered")
    seen = bed.tool("see-all", "--nodes", ",".join(bed.addresses()), "--since", str(t_spawned), "--timeout", "120",
                    timeout=180)  # fmt: skip
    logged = _seen_all_in_logs(bed, wall_spawned) if seen["converged"] else {}
    see_all = {
        # From the nodes' own logs: when each one's view first held every other node alive with its report.
        "after_last_start_s": logged.get("all_s"),
        "median_node_s": logged.get("median_s"),
        "after_last_ready_s": None if logged.get("all_s") is None else logged["all_s"] - (t_ready - t_spawned),
        # The poller (outside the namespaces, asking 8 nodes at a time): an upper bound, late by up to one round.
        "polled_s": seen["seconds"],
        "poll_rounds": seen["rounds"],
        "not_converged": seen["not_yet"],
    }
    print(
        f"  every node saw every other {_s(see_all['after_last_start_s'])} after the last start (nodes' logs;"
        f" the poller confirmed it by {_s(seen['seconds'])})"
    )
    time.sleep(3.0 if quick else 10.0)  # start-up traffic (mDNS announcements, first reports) dies down
    idle = _window(bed, idle_s, "idle")
    light_proc = bed.spawn_tool(*_paced_load(bed, load_s + 4, seed=1))
    time.sleep(2.0)
    light = _window(bed, load_s, f"light load ({LIGHT_RATE:g} req/s)")
    light["load"] = _summary(bed, light_proc)
    names = list(bed.nodes)
    kill = _detect(bed, names[-1], "kill -9", 3.0)
    time.sleep(10.0)  # the restarted node rejoined; detection is measured on a mesh at rest
    sigstop = _detect(bed, names[-2], "SIGSTOP", 5.0)
    churn = _churn(bed, names, QUICK_CHURN if quick else CHURN)
    return {
        "quick": quick,
        "nodes": n,
        "model": "echo",
        "see_all": see_all,
        "idle": idle,
        "light": light,
        "kill -9": kill,
        "SIGSTOP": sigstop,
        "churn": churn,
        "goals": GOALS,
        "summary": _verdicts(see_all, idle, kill, sigstop, churn),
    }


def _start_all(bed: Testbed, n: int) -> tuple[float, float, float]:
    """Start nodes 1..n a few at a time, each batch answering before the next starts (a start costs ~1 s of CPU
    here, so all at once would only queue them); (monotonic time of the last spawn, of the last node answering,
    wall time of the last spawn)."""
    t_spawned = t_ready = wall_spawned = 0.0
    for first in range(1, n + 1, START_BATCH):
        last = min(n, first + START_BATCH - 1)
        wall_spawned = time.time()
        t_spawned = time.monotonic()
        batch = [bed.start_node(i, ["--model", "echo", "--grace", "1"]) for i in range(first, last + 1)]
        for node in batch:
            _wait_serving(node, 120)
        t_ready = time.monotonic()
        print(f"\r  started {min(n, first + START_BATCH - 1)}/{n}", end="", flush=True)
    print()
    return t_spawned, t_ready, wall_spawned


def _seen_all_in_logs(bed: Testbed, since_wall: float) -> dict[str, float | None]:
    """From every node's log (its peer-state lines, in order): when its view first held every other node alive,
    in seconds after `since_wall`; the slowest and the median node. A node reaches `alive` by a peer's own report,
    so this is what the poller checks (alive, with models), without the poller's rounds."""
    everyone = set(bed.nodes)
    when: list[float] = []
    for name, node in bed.nodes.items():
        if node.log_path is None:
            return {"all_s": None, "median_s": None}
        alive: set[str] = set()
        first = None
        for wall, peer, new, _why in _transitions(node.log_path, 0.0):
            if new == "alive":
                alive.add(peer)
            else:
                alive.discard(peer)
            if alive >= everyone - {name}:
                first = wall
                break
        if first is None:
            return {"all_s": None, "median_s": None}
        when.append(max(0.0, first - since_wall))
    return {"all_s": max(when), "median_s": statistics.median(when)}


def _wait_serving(node: NodeProc, timeout: float) -> None:
    """Wait until a node's log says it serves (the harness sits outside the namespaces and cannot ping it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not node.alive():
            raise RuntimeError(f"node {node.name} exited:\n{node.log_tail()}")
        if 'msg="serving ' in node.log_tail(200):
            return
        time.sleep(0.1)
    raise TimeoutError(f"node {node.name} did not start serving within {timeout} s:\n{node.log_tail()}")


def _paced_load(bed: Testbed, seconds: float, seed: int, entries: list[str] | None = None) -> list[str]:
    nodes = ",".join(bed.addresses(entries))
    return ["load", "--nodes", nodes, "--model", "echo", "--rate", str(LIGHT_RATE), "--duration", str(seconds),
            "--in-flight", "200", "--timeout", "30", "--seed", str(seed)]  # fmt: skip


def _summary(bed: Testbed, proc: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for ev in read_events(proc):
        if ev["event"] == "summary":
            summary = ev
    proc.wait(60)
    if not summary:
        raise RuntimeError(f"the load generator gave no summary\n{bed.logs()}")
    keep = ("count", "ok", "failed", "failures", "p50_ms", "p99_ms", "retried")
    return {k: summary.get(k) for k in keep}


# ------------------------------------------------------------ what a node costs


def _proc_sample(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS MiB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK  # utime, stime (fields 14 and 15 of stat)
    with open(f"/proc/{pid}/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cpu, rss_kib / 1024


def _sample(bed: Testbed) -> tuple[float, dict[int, Traffic], dict[str, tuple[float, float]]]:
    assert bed.lan is not None
    procs = {name: _proc_sample(node.pid) for name, node in bed.nodes.items() if node.alive()}
    return time.monotonic(), bed.lan.traffic(), procs


def _window(bed: Testbed, seconds: float, label: str) -> dict[str, Any]:
    """Per node rates over `seconds`: medians, 90th percentiles and maxima across the nodes."""
    t0, net0, proc0 = _sample(bed)
    time.sleep(seconds)
    t1, net1, proc1 = _sample(bed)
    dt = t1 - t0
    per: dict[str, list[float]] = {k: [] for k in ("packets_in", "packets_out", "kb_in", "kb_out", "cpu", "rss")}
    for name in bed.nodes:
        index = int(name[1:])
        if name not in proc0 or name not in proc1 or index not in net0:
            continue
        a, b = net0[index], net1[index]
        per["packets_in"].append((b.rx_packets - a.rx_packets) / dt)
        per["packets_out"].append((b.tx_packets - a.tx_packets) / dt)
        per["kb_in"].append((b.rx_bytes - a.rx_bytes) / dt / 1000)
        per["kb_out"].append((b.tx_bytes - a.tx_bytes) / dt / 1000)
        per["cpu"].append((proc1[name][0] - proc0[name][0]) / dt * 100)
        per["rss"].append(proc1[name][1])
    names = {"packets_in": "packets_in_per_s", "packets_out": "packets_out_per_s", "kb_in": "kb_in_per_s",
             "kb_out": "kb_out_per_s", "cpu": "cpu_percent", "rss": "rss_mib"}  # fmt: skip
    out: dict[str, Any] = {"seconds": dt, "nodes": len(per["cpu"])}
    for key, name in names.items():
        v = per[key]
        out[name] = {"median": statistics.median(v), "p90": percentile(v, 90), "max": max(v)} if v else None
    m = {k: out[names[k]]["median"] for k in ("packets_in", "packets_out", "kb_out", "cpu", "rss")}
    print(f"  {label}: per node {m['packets_in']:.1f} packets/s in, {m['packets_out']:.1f} out, {m['kb_out']:.1f} "
          f"kB/s out, {m['cpu']:.2f}% CPU, {m['rss']:.0f} MiB (medians)")  # fmt: skip
    return out


# ------------------------------------------------------------ faults


def _transitions(log: Path, since_wall: float) -> list[tuple[float, str, str, str]]:
    """(wall time, peer, new state, reason) of every peer-state line a node logged after `since_wall`."""
    out = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        m = _TRANSITION.search(line)
        if m is None:
            continue
        ts, peer, _old, new, why = m.groups()
        stamp, _, ms = ts.rstrip("Z").partition(".")
        wall = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(ms or 0) / 1000
        if wall >= since_wall - 0.001:
            out.append((wall, peer, new, why))
    return out


def _detect(bed: Testbed, victim: str, fault: str, wait: float) -> dict[str, Any]:
    """Fault `victim`; from the survivors' logs, when each first had it not alive, and dead."""
    node = bed.nodes[victim]
    t_wall = time.time()
    if fault == "kill -9":
        node.kill()
    else:
        node.pause()
    time.sleep(wait)
    suspect: list[float] = []
    dead: list[float] = []
    missed = []
    for name, other in bed.nodes.items():
        if name == victim or other.log_path is None:
            continue
        marks = [(t, new) for t, peer, new, _ in _transitions(other.log_path, t_wall) if peer == victim]
        first = next((t for t, new in marks if new in ("suspect", "dead", "left")), None)
        gone = next((t for t, new in marks if new in ("dead", "left")), None)
        if first is None or gone is None:
            missed.append(name)
        if first is not None:
            suspect.append(first - t_wall)
        if gone is not None:
            dead.append(gone - t_wall)
    if fault == "SIGSTOP":
        node.resume()
    else:
        _wait_serving(bed.restart(victim), 120)
    result = {
        "victim": victim,
        "survivors": len(bed.nodes) - 1,
        "not_alive_all_s": max(suspect) if suspect and not missed else None,
        "not_alive_median_s": statistics.median(suspect) if suspect else None,
        "dead_all_s": max(dead) if dead and not missed else None,
        "dead_median_s": statistics.median(dead) if dead else None,
        "missed_by": missed,
    }
    print(f"  {fault} of {victim}: not alive everywhere after {_s(result['not_alive_all_s'])}, dead everywhere "
          f"after {_s(result['dead_all_s'])} (missed by {len(missed)})")  # fmt: skip
    return result


def _churn(bed: Testbed, names: list[str], count: int) -> dict[str, Any]:
    """A paced light load entering at the first 10 nodes while `count` others are killed and restarted."""
    entries, victims = names[:10], names[10 : 10 + count]
    every, down = 1.5, 3.0  # a kill every 1.5 s; each victim is restarted 3 s after its kill
    seconds = every * count + down + 12.0
    proc = bed.spawn_tool(*_paced_load(bed, seconds, seed=2, entries=entries))
    time.sleep(2.0)
    t0 = time.monotonic()
    schedule = sorted([(i * every, "kill", v) for i, v in enumerate(victims)]
                      + [(i * every + down, "restart", v) for i, v in enumerate(victims)])  # fmt: skip
    for at, what, victim in schedule:
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        if what == "kill":
            bed.nodes[victim].kill()
        else:
            bed.restart(victim)
    load = _summary(bed, proc)
    seen = bed.tool("see-all", "--nodes", ",".join(bed.addresses()), "--timeout", "60", timeout=120)
    result = {"killed_and_restarted": victims, "entries": len(entries), "load": load,
              "see_all_after_s": seen["seconds"]}  # fmt: skip
    print(f"  {count} nodes killed and restarted under load: {load['failed']} of {load['count']} requests failed")
    return result


# ------------------------------------------------------------ summary


def _verdicts(see_all: dict[str, Any], idle: dict[str, Any], kill: dict[str, Any], stop: dict[str, Any],
              churn: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    def at_most(value: float | None, goal: float) -> bool | None:
        return None if value is None else value <= goal

    return {
        "idle_packets_in_per_s": idle["packets_in_per_s"]["median"],
        "idle_cpu_percent": idle["cpu_percent"]["median"],
        "idle_rss_mib": idle["rss_mib"]["median"],
        "see_all_s": see_all["after_last_start_s"],
        "kill_detected_s": kill["dead_all_s"],
        "sigstop_detected_s": stop["dead_all_s"],
        "churn_failed": churn["load"]["failed"],
        "met": {
            "idle_packets_in_per_s": at_most(idle["packets_in_per_s"]["median"], GOALS["idle_packets_in_per_s"]),
            "idle_cpu_percent": at_most(idle["cpu_percent"]["median"], GOALS["idle_cpu_percent"]),
            "see_all_s": at_most(see_all["after_last_start_s"], GOALS["see_all_s"]),
            "kill_detected_s": at_most(kill["dead_all_s"], GOALS["kill_detected_s"]),
            "sigstop_detected_s": at_most(stop["dead_all_s"], GOALS["sigstop_detected_s"]),
            "churn_failed": churn["load"]["failed"] == 0,
        },
    }


def _print(result: dict[str, Any], path: Path) -> None:
    s = result["summary"]
    for key, ok in s["met"].items():
        print(f"  {key:<24} {s[key]!s:<24} goal {GOALS[key]:<6} {'met' if ok else 'NOT MET' if ok is False else '?'}")
    print(f"written to {path}")


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"
