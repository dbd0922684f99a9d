"""A load generator and mesh probe that runs as its own process (e.g. inside a host's network namespace).

    python -m bench.loadgen load --nodes 10.213.0.2:7000 --model sleep:100 --count 300 --in-flight 32
    python -m bench.loadgen converge --nodes A,B,C --timeout 10
    python -m bench.loadgen until-state --node A --peer n3 --states suspect,dead --timeout 10

Every command prints JSON lines on stdout: `progress` events while it runs and one `summary` at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from concurrent.futures import Future
from typing import Any

from mesh import Client, LanmeshError

from .procs import ping
from .report import percentile


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def load(nodes: list[str], model: str, count: int, in_flight: int, timeout: float, task: str) -> dict[str, Any]:
    """Keep `in_flight` requests going until `count` have finished; count every failure."""
    ok = 0
    failures: collections.Counter[str] = collections.Counter()
    served_by: collections.Counter[str] = collections.Counter()
    routes: collections.Counter[str] = collections.Counter()
    lat: list[float] = []
    pending: collections.deque[tuple[float, Future[Any]]] = collections.deque()
    sent = done = 0
    step = max(1, count // 20)
    t0 = time.monotonic()
    with Client(nodes, timeout=timeout) as client:
        while done < count:
            while sent < count and len(pending) < in_flight:
                pending.append((time.monotonic(), client.submit(model, task, f"request {sent}")))
                sent += 1
            started, fut = pending.popleft()
            try:
                r = fut.result(timeout=timeout + 5)
                ok += 1
                served_by[r.node] += 1
                routes[r.route.split(":", 1)[0] if "retry-after" not in r.route else "retry-after"] += 1
                lat.append(time.monotonic() - started)
            except (LanmeshError, TimeoutError) as exc:
                failures[f"{type(exc).__name__}: {exc}"[:200]] += 1
            done += 1
            if done % step == 0:
                emit("progress", done=done, count=count, ok=ok, failed=sum(failures.values()))
    summary = {
        "count": count,
        "ok": ok,
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "served_by": dict(served_by),
        "routes": dict(routes),
        "seconds": time.monotonic() - t0,
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
    }
    emit("summary", **summary)
    return summary


def _alive_views(nodes: list[str]) -> dict[str, set[str] | None]:
    views: dict[str, set[str] | None] = {}
    for addr in nodes:
        pong = ping(addr, 0.5, want_status=True)
        if pong is None or pong.status is None:
            views[addr] = None
        else:
            views[addr] = {r["node"] for r in pong.status if r["state"] in ("alive", "self") and r.get("models")}
    return views


def converge(nodes: list[str], timeout: float) -> int:
    """Wait until every node sees every node (itself included) alive with models.

    `seconds` counts from the moment every node first answers a ping, so process start-up is not included.
    """
    start = time.monotonic()
    views: dict[str, set[str] | None] = {}
    t_up: float | None = None  # the clock starts once every node answers at all
    while time.monotonic() - start < timeout:
        views = _alive_views(nodes)
        sets = [v for v in views.values() if v is not None]
        if t_up is None and len(sets) == len(nodes):
            t_up = time.monotonic()
        if len(sets) == len(nodes) and all(len(v) == len(nodes) for v in sets):
            now = time.monotonic()
            emit("summary", converged=True, seconds=now - (t_up or now), since_start=now - start)
            return 0
        time.sleep(0.05)
    emit("summary", converged=False, seconds=timeout, views={k: sorted(v or []) for k, v in views.items()})
    return 1


def until_state(node: str, peer: str, states: set[str], timeout: float) -> int:
    """Wait until `node` reports `peer` in one of `states` (or not at all, if 'gone' is one of them)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pong = ping(node, 0.5, want_status=True)
        if pong is not None and pong.status is not None:
            rows = {r["node"]: r["state"] for r in pong.status}
            state = rows.get(peer, "gone")
            if state in states:
                emit("summary", reached=True, state=state, seconds=time.monotonic() - t0)
                return 0
        time.sleep(0.02)
    emit("summary", reached=False, seconds=timeout)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("load", help="bounded load: count requests, in_flight at a time")
    p.add_argument("--nodes", required=True, help="comma-separated host:port of entry nodes")
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="complete")
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--in-flight", type=int, default=32, dest="in_flight")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    c = sub.add_parser("converge", help="wait until every node sees every other")
    c.add_argument("--nodes", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    u = sub.add_parser("until-state", help="wait until a node reports a peer in a given state")
    u.add_argument("--node", required=True)
    u.add_argument("--peer", required=True)
    u.add_argument("--states", default="suspect,dead", help="comma-separated; 'gone' = no longer listed")
    u.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.cmd == "load":
        s = load(args.nodes.split(","), args.model, args.count, args.in_flight, args.timeout, args.task)
        return 0 if s["failed"] == 0 else 1
    if args.cmd == "converge":
        return converge(args.nodes.split(","), args.timeout)
    return until_state(args.node, args.peer, set(args.states.split(",")), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
