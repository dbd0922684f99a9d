"""`overhead`: what the mesh costs per request, with the echo model on loopback.

Direct: the client talks to the node that serves echo. One hop: the client enters at a node
that does not serve echo, which forwards to one that does. Each sync and with 64 in flight.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Future
from typing import Any

from mesh import Client

from .procs import Cluster
from .report import median, percentile, progress, write

LOOPBACK = ["--bind", "127.0.0.1", "--no-mdns"]


def sync_latency(client: Client, n: int) -> dict[str, float]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        client.request("echo", "complete", "x")
        lat.append(time.perf_counter() - t0)
        if i % 500 == 0:
            progress(i, n, "sync")
    progress(n, n, "sync")
    return {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "requests": n}


def pipelined(client: Client, n: int, window: int) -> dict[str, float]:
    pending: collections.deque[tuple[float, Future[Any]]] = collections.deque()
    lat = []
    sent = 0
    t0 = time.perf_counter()
    while len(lat) < n:
        while sent < n and len(pending) < window:
            pending.append((time.perf_counter(), client.submit("echo", "complete", "x")))
            sent += 1
        started, fut = pending.popleft()
        fut.result(timeout=30)
        lat.append(time.perf_counter() - started)
        if len(lat) % 2000 == 0:
            progress(len(lat), n, f"{window} in flight")
    elapsed = time.perf_counter() - t0
    progress(n, n, f"{window} in flight")
    return {
        "req_per_s": n / elapsed,
        "p50_us": percentile(lat, 50) * 1e6,
        "p99_us": percentile(lat, 99) * 1e6,
        "requests": n,
        "in_flight": window,
    }


def _measure(address: str, sync_n: int, pipe_n: int) -> dict[str, Any]:
    with Client(address, timeout=30) as client:
        for _ in range(300):  # warm up connections and caches
            client.request("echo", "complete", "x")
        return {"sync": sync_latency(client, sync_n), "pipelined": pipelined(client, pipe_n, 64)}


def run(quick: bool = False, reps: int = 3) -> dict[str, Any]:
    sync_n, pipe_n = (300, 2000) if quick else (5000, 30000)
    reps = 1 if quick else reps
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "one_hop": []}
    with Cluster() as cluster:
        server = cluster.add("echo-node", [*LOOPBACK, "--model", "echo"])
        entry = cluster.add("entry-node", [*LOOPBACK, "--model", "sleep:1", "--peer", server.address])
        cluster.wait_converged(timeout=15)
        for rep in range(reps):
            print(f"rep {rep + 1}/{reps}: direct")
            runs["direct"].append(_measure(server.address, sync_n, pipe_n))
            print(f"rep {rep + 1}/{reps}: one hop")
            runs["one_hop"].append(_measure(entry.address, sync_n, pipe_n))
    summary = {}
    for path, rs in runs.items():
        summary[path] = {
            "sync_p50_us": median([r["sync"]["p50_us"] for r in rs]),
            "sync_p99_us": median([r["sync"]["p99_us"] for r in rs]),
            "pipelined_req_per_s": median([r["pipelined"]["req_per_s"] for r in rs]),
            "pipelined_p50_us": median([r["pipelined"]["p50_us"] for r in rs]),
            "pipelined_p99_us": median([r["pipelined"]["p99_us"] for r in rs]),
        }
    summary["hop_added_sync_p50_us"] = summary["one_hop"]["sync_p50_us"] - summary["direct"]["sync_p50_us"]
    summary["hop_added_sync_p99_us"] = summary["one_hop"]["sync_p99_us"] - summary["direct"]["sync_p99_us"]
    result = {"quick": quick, "repetitions": reps, "summary": summary, "runs": runs}
    path = write("overhead", result)
    _print(summary)
    print(f"written to {path}")
    return result


def _print(s: dict[str, Any]) -> None:
    print(f"{'path':<10} {'sync p50':>10} {'sync p99':>10} {'64-in-flight req/s':>20} {'p50':>9} {'p99':>9}")
    for path in ("direct", "one_hop"):
        r = s[path]
        print(
            f"{path:<10} {r['sync_p50_us']:>8.0f}us {r['sync_p99_us']:>8.0f}us {r['pipelined_req_per_s']:>20.0f}"
            f" {r['pipelined_p50_us']:>7.0f}us {r['pipelined_p99_us']:>7.0f}us"
        )
    print(
        f"one forwarding hop adds {s['hop_added_sync_p50_us']:.0f} us at p50,"
        f" {s['hop_added_sync_p99_us']:.0f} us at p99"
    )
