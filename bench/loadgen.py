"""A load generator and mesh probe that runs as its own process (e.g. inside a host's network namespace).

    python -m bench.loadgen load --nodes 10.213.0.2:7000 --model sleep:100 --count 300 --in-flight 32
    python -m bench.loadgen load --nodes A,B --model sleep:100 --duration 20 --in-flight 64 --samples s.json
    python -m bench.loadgen trace --nodes A,B,C --model sleep --rate 100 --duration 60 --seed 1 [--jsq 2,2,2]
    python -m bench.loadgen overhead --node A --sync 5000 --pipelined 30000
    python -m bench.loadgen converge --nodes A,B,C --timeout 10
    python -m bench.loadgen until-state --node A --peer n3 --states suspect,dead --timeout 10
    python -m bench.loadgen detect --nodes A,B,C --peer n4 --timeout 10
    python -m bench.loadgen see-all --nodes A,B,C --timeout 60 --since 1234.5

Every command prints JSON lines on stdout: `progress`/`tick` events while it runs and one `summary` at the end.
Times (`t`, `t0`, ...) are time.monotonic(), which network namespaces share, so a harness can line them up
with the faults it injects.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import queue
import random
import sys
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from mesh import Client, client_security, connect_dealer
from protocol import Error, Reject, Reply, Request, Task, decode, encode

from .procs import ping
from .report import percentile


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


@dataclass
class Outcomes:
    """Every finished request of one run: latencies, failures by reason, where served, and per-second ticks."""

    t0: float
    ok: int = 0
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    served_by: collections.Counter[str] = field(default_factory=collections.Counter)
    routes: collections.Counter[str] = field(default_factory=collections.Counter)
    retried: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[tuple[float, float, int, str]] = field(default_factory=list)  # (start, end) - t0, ok, node
    timeline: list[dict[str, Any]] = field(default_factory=list)
    _tick_lat: list[float] = field(default_factory=list)
    _tick_ok: int = 0
    _tick_failed: int = 0
    _next_tick: float = 0.0

    def __post_init__(self) -> None:
        self._next_tick = self.t0 + 1.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def success(self, start: float, end: float, node: str, route: str = "", tries: int = 1) -> None:
        self.ok += 1
        self.served_by[node] += 1
        self.routes["retry-after" if "retry-after" in route else route.split(":", 1)[0]] += 1
        self.retried += tries > 1
        self.latencies.append(end - start)
        self.samples.append((start - self.t0, end - self.t0, 1, node))
        self._tick_ok += 1
        self._tick_lat.append(end - start)

    def failure(self, start: float, end: float, reason: str) -> None:
        self.failures[reason[:200]] += 1
        self.samples.append((start - self.t0, end - self.t0, 0, ""))
        self._tick_failed += 1

    def tick(self, now: float, **extra: Any) -> None:
        """Close every whole second up to `now`: one `tick` event and one timeline row each."""
        while now >= self._next_tick:
            row = {
                "second": round(self._next_tick - self.t0 - 1.0, 3),
                "ok": self._tick_ok,
                "failed": self._tick_failed,
                "p50_ms": percentile(self._tick_lat, 50) * 1000 if self._tick_lat else None,
                "p99_ms": percentile(self._tick_lat, 99) * 1000 if self._tick_lat else None,
            }
            self.timeline.append(row)
            emit("tick", **row, total_ok=self.ok, total_failed=self.failed, **extra)
            self._tick_ok = self._tick_failed = 0
            self._tick_lat = []
            self._next_tick += 1.0

    def summary(self, sent: int, seconds: float) -> dict[str, Any]:
        lat = self.latencies
        return {
            "count": sent,
            "ok": self.ok,
            "failed": self.failed,
            "failures": dict(self.failures),
            "served_by": dict(self.served_by),
            "routes": dict(self.routes),
            "retried": self.retried,
            "seconds": seconds,
            "req_per_s": self.ok / seconds if seconds > 0 else None,
            "p50_ms": percentile(lat, 50) * 1000 if lat else None,
            "p99_ms": percentile(lat, 99) * 1000 if lat else None,
            "mean_ms": sum(lat) / len(lat) * 1000 if lat else None,
            "t0": self.t0,
            "timeline": self.timeline,
        }

    def write_samples(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump({"t0": self.t0, "columns": ["start", "end", "ok", "node"], "rows": self.samples}, f)


def load(
    nodes: list[str],
    model: str,
    count: int | None,
    in_flight: int,
    timeout: float,
    task: str,
    duration: float | None = None,
    samples: str | None = None,
    rate: float | None = None,
    seed: int = 1,
) -> dict[str, Any]:
    """Closed loop: keep `in_flight` requests going until `count` have finished (or for `duration` seconds).
    With `rate`: paced instead, Poisson arrivals at `rate` per second (at most `in_flight` outstanding), through the
    same client, so its fail-over between the entry nodes is part of what is measured.

    Every request ends as a success or a counted failure; none is dropped from the tally.
    """
    if count is None and duration is None:
        raise ValueError("give --count or --duration")
    done: queue.SimpleQueue[tuple[float, float, Future[Any]]] = queue.SimpleQueue()
    t0 = time.monotonic()
    out = Outcomes(t0)
    stop_at = t0 + duration if duration is not None else math.inf
    sent = outstanding = finished = 0
    step = max(1, (count or 1) // 20)
    last_sent = t0
    arrivals = random.Random(seed)
    next_at = t0 + (arrivals.expovariate(rate) if rate else 0.0)
    emit("start", t0=t0)
    with Client(nodes, timeout=timeout) as client:

        def submit(i: int) -> None:
            start = time.monotonic()

            def on_done(f: Future[Any]) -> None:
                done.put((start, time.monotonic(), f))

            client.submit(model, task, f"request {i}").add_done_callback(on_done)

        while True:
            now = time.monotonic()
            while outstanding < in_flight and (count is None or sent < count) and now < stop_at and now >= next_at:
                submit(sent)
                sent += 1
                outstanding += 1
                last_sent = now
                if rate:
                    next_at += arrivals.expovariate(rate)
            if outstanding == 0 and (not rate or now >= stop_at or (count is not None and sent >= count)):
                break
            try:
                wait = 0.25 if not rate else max(0.0, min(0.25, next_at - time.monotonic()))
                start, end, fut = done.get(timeout=wait) if wait > 0 else done.get_nowait()
            except queue.Empty:
                now = time.monotonic()
                out.tick(now, in_flight=outstanding)
                if now > last_sent + timeout + 15:  # the client's deadline should have ended them all by now
                    out.failures["no answer within the deadline (client gave no result)"] += outstanding
                    break
                continue
            outstanding -= 1
            finished += 1
            exc = fut.exception()
            if exc is None:
                r = fut.result()
                out.success(start, end, r.node, r.route, getattr(r, "tries", 1))
            else:
                out.failure(start, end, f"{type(exc).__name__}: {exc}")
            out.tick(end, in_flight=outstanding)
            if count is not None and finished % step == 0:
                emit("progress", done=finished, count=count, ok=out.ok, failed=out.failed)
    seconds = time.monotonic() - t0
    summary = out.summary(sent, seconds)
    if samples:
        out.write_samples(samples)
    emit("summary", **summary)
    return summary


def trace(
    nodes: list[str],
    model: str,
    rate: float,
    duration: float,
    seed: int,
    timeout: float,
    jsq_caps: list[int] | None = None,
    task: str = "complete",
    samples: str | None = None,
) -> dict[str, Any]:
    """Open loop: Poisson arrivals at `rate`/s for `duration` s, each entering at a uniformly drawn node.

    The trace (arrival times and entry nodes) depends only on `seed`, so every routing policy sees the same one.
    With `jsq_caps` this is the ideal central dispatcher instead: join the shortest queue relative to capacity,
    with exact outstanding counts, sent straight to that node with hops=1 so it is served there.
    """
    rng = random.Random(seed)
    arrivals: list[tuple[float, int]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        arrivals.append((t, rng.randrange(len(nodes))))
    tie_rng = random.Random(seed + 1)
    security = client_security()
    ctx = zmq.Context()
    socks = []
    for addr in nodes:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        connect_dealer(s, f"tcp://{addr}", security)  # the key from $LANMESH_KEY_FILE, as any client here
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    outstanding = [0] * len(nodes)
    pending: dict[str, tuple[float, int]] = {}  # request id -> (sent at, node index)
    rejected = 0
    max_lag = 0.0
    time.sleep(0.3)  # let the TCP connections come up, so the first arrivals are not delayed by the handshake
    t0 = time.monotonic()
    out = Outcomes(t0)
    nxt = 0
    end_by = t0 + duration + timeout + 5
    try:
        while nxt < len(arrivals) or pending:
            now = time.monotonic()
            while nxt < len(arrivals) and t0 + arrivals[nxt][0] <= now:
                at, entry = arrivals[nxt]
                max_lag = max(max_lag, now - (t0 + at))
                rid = f"t{nxt}-{uuid.uuid4().hex[:6]}"
                if jsq_caps is None:
                    target, hops = entry, 0
                else:
                    best = min((outstanding[i] + 1) / jsq_caps[i] for i in range(len(nodes)))
                    ties = [i for i in range(len(nodes)) if (outstanding[i] + 1) / jsq_caps[i] == best]
                    target, hops = tie_rng.choice(ties), 1
                req = Request(rid, model, Task(task), f"request {nxt}", deadline_ms=int(timeout * 1000), hops=hops)
                socks[target].send(encode(req))
                outstanding[target] += 1
                pending[rid] = (now, target)
                nxt += 1
            if now > end_by:
                out.failures["no answer within the deadline"] += len(pending)
                break
            wait = (t0 + arrivals[nxt][0] - now) if nxt < len(arrivals) else 0.25
            for sock, _ in poller.poll(max(0, int(wait * 1000))):
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg = decode(frame)
                    rid = getattr(msg, "id", "")
                    if rid not in pending or not isinstance(msg, Reply | Error | Reject):
                        continue
                    sent_at, target = pending.pop(rid)
                    outstanding[target] -= 1
                    end = time.monotonic()
                    if isinstance(msg, Reply):
                        out.success(sent_at, end, msg.node, msg.route)
                    elif isinstance(msg, Reject):
                        rejected += 1
                        out.failure(sent_at, end, f"Reject from {msg.node}: {msg.reason}")
                    else:
                        out.failure(sent_at, end, f"Error {msg.code.name}: {msg.message}")
            out.tick(time.monotonic(), in_flight=len(pending))
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
    summary = out.summary(len(arrivals), time.monotonic() - t0)
    summary.update(
        offered_rate=rate,
        duration=duration,
        seed=seed,
        rejected=rejected,
        max_send_lag_ms=max_lag * 1000,
        dispatch="jsq-oracle" if jsq_caps else "uniform-entry",
    )
    summary["throughput_req_per_s"] = out.ok / duration
    if samples:
        out.write_samples(samples)
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


def see_all(nodes: list[str], timeout: float, since: float, workers: int = 8) -> dict[str, Any]:
    """Poll every node's status (`workers` at a time) until each one sees all the others alive with models.

    Reports, per node, when it first did, in seconds after `since` (a time.monotonic() of the harness, which
    network namespaces share). Polls go round after round, so a view is known to within one round's time.
    """
    from concurrent.futures import ThreadPoolExecutor

    def view(addr: str) -> set[str] | None:
        pong = ping(addr, 2.0, want_status=True)
        if pong is None or pong.status is None:
            return None
        return {r["node"] for r in pong.status if r["state"] in ("alive", "self") and r.get("models")}

    seen: dict[str, float | None] = {a: None for a in nodes}
    largest: dict[str, int] = {a: 0 for a in nodes}
    t_start = time.monotonic()
    rounds = 0
    with ThreadPoolExecutor(workers) as pool:
        while time.monotonic() - t_start < timeout:
            waiting = [a for a in nodes if seen[a] is None]
            if not waiting:
                break
            rounds += 1
            for addr, v in zip(waiting, pool.map(view, waiting), strict=True):
                if v is not None:
                    largest[addr] = max(largest[addr], len(v))
                    if len(v) >= len(nodes):
                        seen[addr] = time.monotonic() - since
    done = [t for t in seen.values() if t is not None]
    summary = {
        "converged": len(done) == len(nodes),
        "seconds": max(done) if len(done) == len(nodes) else None,
        "median_s": sorted(done)[len(done) // 2] if done else None,
        "rounds": rounds,
        "not_yet": {a: largest[a] for a in nodes if seen[a] is None},
    }
    emit("summary", **summary)
    return summary


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


def detect(nodes: list[str], peer: str, timeout: float, interval: float = 0.02) -> dict[str, Any]:
    """Poll every node's view of `peer` until all of them report it dead (or gone); when each first saw it go.

    Emits `ready` once every node has answered once with `peer` alive, so a harness injects the fault after.
    `first_not_alive` is the first poll that showed suspect/dead/left/gone (a crash can skip suspect).
    """
    seen: dict[str, dict[str, float | None]] = {
        a: {"first_not_alive": None, "suspect": None, "dead": None} for a in nodes
    }
    ready = False
    t_start = time.monotonic()
    while time.monotonic() - t_start < timeout:
        all_dead = True
        all_alive = True
        for addr in nodes:
            pong = ping(addr, 0.3, want_status=True)
            now = time.monotonic()
            if pong is None or pong.status is None:
                all_dead = all_alive = False
                continue
            state = {r["node"]: r["state"] for r in pong.status}.get(peer, "gone")
            mark = seen[addr]
            if state != "alive":
                all_alive = False
                mark["first_not_alive"] = mark["first_not_alive"] or now
            if state == "suspect":
                mark["suspect"] = mark["suspect"] or now
            if state in ("dead", "gone", "left"):
                mark["dead"] = mark["dead"] or now
            else:
                all_dead = False
        if not ready and all_alive:
            ready = True
            emit("ready")
        if ready and all_dead:
            break
        time.sleep(interval)
    summary = {"peer": peer, "ready": ready, "seen": seen, "complete": all(v["dead"] for v in seen.values())}
    emit("summary", **summary)
    return summary


def overhead_probe(node: str, sync_n: int, pipe_n: int, window: int) -> dict[str, Any]:
    """The overhead scenario's client side, run here so it sits on its own host."""
    from .overhead import measure

    result = measure(node, sync_n, pipe_n, window)
    emit("summary", **result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("load", help="closed loop: in_flight at a time, for --count requests or --duration seconds")
    p.add_argument("--nodes", required=True, help="comma-separated host:port of entry nodes")
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="complete")
    p.add_argument("--count", type=int, help="stop after this many requests (default 300 without --duration)")
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--in-flight", type=int, default=32, dest="in_flight")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    p.add_argument("--samples", help="write every request's (start, end, ok, node) to this JSON file")
    p.add_argument("--rate", type=float, help="paced: Poisson arrivals per second instead of a closed loop")
    p.add_argument("--seed", type=int, default=1, help="seed of the paced arrivals")
    t = sub.add_parser("trace", help="open loop: a seeded Poisson trace entering at uniformly drawn nodes")
    t.add_argument("--nodes", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--rate", type=float, required=True, help="mean arrivals per second")
    t.add_argument("--duration", type=float, required=True)
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--timeout", type=float, default=30.0)
    t.add_argument("--jsq", help="be the central JSQ oracle instead; comma-separated capacity of each node")
    t.add_argument("--task", default="complete", choices=[x.value for x in Task])
    t.add_argument("--samples", help="write every request's (start, end, ok, node) to this JSON file")
    o = sub.add_parser("overhead", help="sync latency and pipelined throughput of echo through one node")
    o.add_argument("--node", required=True)
    o.add_argument("--sync", type=int, default=5000)
    o.add_argument("--pipelined", type=int, default=30000)
    o.add_argument("--window", type=int, default=64)
    c = sub.add_parser("converge", help="wait until every node sees every other")
    c.add_argument("--nodes", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    u = sub.add_parser("until-state", help="wait until a node reports a peer in a given state")
    u.add_argument("--node", required=True)
    u.add_argument("--peer", required=True)
    u.add_argument("--states", default="suspect,dead", help="comma-separated; 'gone' = no longer listed")
    u.add_argument("--timeout", type=float, default=10.0)
    a = sub.add_parser("see-all", help="when each node first sees every other alive (polling many at a time)")
    a.add_argument("--nodes", required=True)
    a.add_argument("--timeout", type=float, default=60.0)
    a.add_argument("--since", type=float, help="report times after this time.monotonic() (default: now)")
    d = sub.add_parser("detect", help="when each node first reports a peer suspect and dead")
    d.add_argument("--nodes", required=True)
    d.add_argument("--peer", required=True)
    d.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.cmd == "load":
        count = args.count if args.count is not None or args.duration is not None else 300
        nodes = args.nodes.split(",")
        s = load(nodes, args.model, count, args.in_flight, args.timeout, args.task, args.duration, args.samples,
                 args.rate, args.seed)  # fmt: skip
        return 0 if s["failed"] == 0 else 1
    if args.cmd == "trace":
        caps = [int(x) for x in args.jsq.split(",")] if args.jsq else None
        nodes = args.nodes.split(",")
        if caps is not None and len(caps) != len(nodes):
            parser.error("--jsq needs one capacity per node")
        trace(nodes, args.model, args.rate, args.duration, args.seed, args.timeout, caps, args.task, args.samples)
        return 0
    if args.cmd == "overhead":
        overhead_probe(args.node, args.sync, args.pipelined, args.window)
        return 0
    if args.cmd == "converge":
        return converge(args.nodes.split(","), args.timeout)
    if args.cmd == "see-all":
        since = time.monotonic() if args.since is None else args.since
        return 0 if see_all(args.nodes.split(","), args.timeout, since)["converged"] else 1
    if args.cmd == "detect":
        return 0 if detect(args.nodes.split(","), args.peer, args.timeout)["complete"] else 1
    return until_state(args.node, args.peer, set(args.states.split(",")), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
