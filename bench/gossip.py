"""`gossip`: the membership protocol the nodes run (`mesh.Gossip`), simulated to 10,000 nodes (`gossip_sim.py`).

Every delivery is late by a LAN's half millisecond or so and lost with probability 1% (each on its own, which
real TCP links would only delay). For each size: messages and bytes per node per second once the mesh is idle;
false suspicions of live nodes per node-hour; and how long until every node knows of a hung node (suspect, then
dead), of a killed one, of one that wakes up again, and of a newcomer that knew one member (and it of all).
"""

from __future__ import annotations

import math
import time
from typing import Any

from mesh import GossipSettings, PeerState

from .gossip_sim import SimMesh, messages_per_node_second
from .plots import plot_gossip
from .report import median, write

SIZES, QUICK_SIZES = (10, 100, 1000, 10_000), (10, 100, 300)
LOSS = 0.01
DELAY_S = 0.0005
TICK_S = 0.05  # a node's housekeeping tick, as the real loop's
NODE_HOURS = 15.0  # of idle time per size, for the false-suspicion rate (at least 20 s of simulated time)
QUICK_NODE_HOURS = 0.3
EVENTS = 3  # hangs, kills per size; medians are reported
JOINS_PER_EVENT = 3  # joins after each (a join's time is a max over pairs, so it varies: 9 of them make the median)
GOALS = {"flat_within": 2.0, "false_suspicions_per_node_hour": 1.0}


def run(quick: bool = False) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    settings = GossipSettings()
    points = []
    for n in sizes:
        t0 = time.monotonic()
        point = _one_size(n, settings, QUICK_NODE_HOURS if quick else NODE_HOURS, 1 if quick else EVENTS)
        point["wall_s"] = time.monotonic() - t0
        points.append(point)
        c = point["convergence_s"]
        print(f"  {n:>6} nodes: {point['messages_per_node_s']:.1f} msg/s and {point['bytes_per_node_s'] / 1000:.2f}"
              f" kB/s per node; false suspicions {point['false_suspicions_per_node_hour']:.3f}/node-hour; hung:"
              f" suspect {_s(c['hung_suspect'])}, dead {_s(c['hung_dead'])}; killed {_s(c['killed_dead'])};"
              f" join {_s(c['join'])} ({point['wall_s']:.0f} s)", flush=True)  # fmt: skip
    rates = [p["messages_per_node_s"] for p in points]
    joins = [p["convergence_s"]["join"] for p in points]
    summary = {
        "sizes": list(sizes),
        "messages_per_node_s": rates,
        "flatness": max(rates) / min(rates),
        "false_suspicions_per_node_hour": max(p["false_suspicions_per_node_hour"] for p in points),
        "hung_dead_s": [p["convergence_s"]["hung_dead"] for p in points],
        "killed_dead_s": [p["convergence_s"]["killed_dead"] for p in points],
        "join_s": joins,
        # convergence over log n: growing no faster than log n keeps this from rising
        "join_over_log_n": _over_log_n(joins, sizes),
        "woke_over_log_n": _over_log_n([p["convergence_s"]["woke_alive"] for p in points], sizes),
    }
    summary["met"] = {
        "flat_within_2x": summary["flatness"] <= GOALS["flat_within"],
        "false_suspicions_below_1_per_node_hour": summary["false_suspicions_per_node_hour"]
        < GOALS["false_suspicions_per_node_hour"],
    }
    # Growing no faster than log n: time over ln n at the largest size is no more than at a smaller one from 100
    # nodes up (below that a join or a wake-up often loses no message and takes only the delays), over a decade at
    # least (the quick sizes' 100 and 300 tell noise, not growth).
    if sizes[-1] >= 1000:
        summary["met"]["join_no_faster_than_log_n"] = _not_rising(summary["join_over_log_n"], sizes)
        summary["met"]["woke_no_faster_than_log_n"] = _not_rising(summary["woke_over_log_n"], sizes)
    result = {
        "quick": quick,
        "network": {"loss": LOSS, "delay_s": DELAY_S, "tick_s": TICK_S, "model": "each delivery lost on its own"},
        "protocol": {
            "interval_s": settings.interval,
            "suspect_after_s": settings.suspect_after,
            "dead_after_s": settings.dead_after,
            "watchers": settings.watchers,
            "sync_every_s": settings.sync_every,
        },
        "goals": GOALS,
        "points": points,
        "summary": summary,
    }
    path = write("gossip", result, plot=plot_gossip)
    print(f"messages per node per second from {sizes[0]} to {sizes[-1]} nodes: within {summary['flatness']:.2f}x;"
          f" worst false-suspicion rate {summary['false_suspicions_per_node_hour']:.3f} per node-hour;"
          f" written to {path}")  # fmt: skip
    return result


def _one_size(n: int, settings: GossipSettings, node_hours: float, events: int) -> dict[str, Any]:
    mesh = SimMesh(settings, loss=LOSS, delay=DELAY_S, tick=TICK_S, seed=n, count_bytes=True)
    mesh.keep_transitions = False
    names = mesh.converged(n)
    mesh.run_for(3.0)
    # Idle: every message counted; every suspicion of a live node is a false one.
    false = {"seen": 0}

    def watch(now: float, observer: str, t: Any) -> None:
        if t.new in (PeerState.SUSPECT, PeerState.DEAD) and t.reason != "forgotten":
            false["seen"] += 1

    accused0 = _accusations(mesh)
    mesh.watch = watch
    mesh.tally.reset()
    seconds = max(20.0, node_hours * 3600 / n)
    mesh.run_for(seconds)
    mesh.watch = None
    tally = mesh.tally
    hours = n * seconds / 3600
    point: dict[str, Any] = {
        "nodes": n,
        "idle_seconds": seconds,
        "node_hours": hours,
        "messages_per_node_s": messages_per_node_second(tally, n, seconds),
        "bytes_per_node_s": sum(tally.bytes.values()) / n / seconds,
        "by_type_per_node_s": {k: v / n / seconds for k, v in sorted(tally.messages.items())},
        "dropped_share": tally.dropped / max(1, sum(tally.messages.values())),
        "false_suspicions": _accusations(mesh) - accused0,
        "false_suspicions_per_node_hour": (_accusations(mesh) - accused0) / hours,
        "suspect_states_seen_of_live_nodes": false["seen"],
    }
    point["convergence_s"] = _convergence(mesh, names, events)
    return point


def _accusations(mesh: SimMesh) -> int:
    """Suspicions published so far, by every node (each one names a node its watcher found quiet)."""
    return sum(node.gossip.counts.get("suspicions_sent", 0) for node in mesh.nodes.values())


def _convergence(mesh: SimMesh, names: list[str], events: int) -> dict[str, float | None]:
    """Medians over `events` faults each: until every other node holds the victim suspect, then dead (a hang);
    alive again (the hung node wakes); dead (a kill -9); and over `JOINS_PER_EVENT` times as many joins, until a
    newcomer that knew one member sees every node alive and every node sees it."""
    hung_s, hung_d, woke, killed, joined = [], [], [], [], []
    step = 0.01
    for k in range(events):
        victim = names[(k * 7919 + 1) % len(names)]
        mesh.hang(victim)
        s = mesh.run_while(lambda v=victim: not mesh.all_see(v, (PeerState.SUSPECT, PeerState.DEAD)), 10, step)
        d = mesh.run_while(lambda v=victim: not mesh.all_see(v, (PeerState.DEAD,)), 10, step)
        hung_s.append(s)
        hung_d.append(None if s is None or d is None else s + d)
        mesh.resume(victim)
        woke.append(mesh.run_while(lambda v=victim: not mesh.all_see(v, (PeerState.ALIVE,)), 10, step))
        victim = names[(k * 104729 + 3) % len(names)]
        mesh.kill(victim)
        killed.append(mesh.run_while(lambda v=victim: not mesh.all_see(v, (PeerState.DEAD,)), 10, step))
        for j in range(JOINS_PER_EVENT):
            newcomer = mesh.join(f"new{k}-{j}", [_live(mesh, names, k * 31 + j * 17 + 5)])
            joined.append(mesh.run_while(lambda c=newcomer: not _joined(mesh, c), 20, step))
            mesh.run_for(1.0)
    return {
        "hung_suspect": _med(hung_s),
        "hung_dead": _med(hung_d),
        "woke_alive": _med(woke),
        "killed_dead": _med(killed),
        "join": _med(joined),
    }


def _live(mesh: SimMesh, names: list[str], start: int) -> str:
    """The first running member from `names[start]` on (a seed: the killed ones stay down)."""
    for i in range(len(names)):
        node = mesh.nodes[names[(start + i) % len(names)]]
        if node.up and not node.hung:
            return node.name
    raise RuntimeError("no member left running")


def _joined(mesh: SimMesh, newcomer: Any) -> bool:
    return mesh.sees_everyone(newcomer) and mesh.all_see(newcomer.name, (PeerState.ALIVE,))


def _over_log_n(times: list[float | None], sizes: tuple[int, ...]) -> list[float | None]:
    return [None if t is None else t / math.log(max(n, 2)) for t, n in zip(times, sizes, strict=True)]


def _not_rising(over_log_n: list[float | None], sizes: tuple[int, ...]) -> bool | None:
    known = [v for v, n in zip(over_log_n, sizes, strict=True) if n >= 100]
    if len(known) < 2 or any(v is None for v in known):
        return None
    return known[-1] <= max(v for v in known[:-1] if v is not None)


def _med(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if len(known) == len(values) and known else None


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"
