"""`overhead`: what the mesh costs per request, with the echo model.

Direct: the client talks to the node that serves echo. One hop: the client enters at a node that does not
serve echo, which forwards to one that does. Each sync and with 64 in flight. The client runs on its own
host (network namespaces, when root) or as a separate process on loopback. Ray Serve's no-op deployment is
measured in the same run as an anchor when `ray[serve]` is installed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from mesh import Client

from .plots import plot_overhead
from .procs import free_port_pair
from .report import median, percentile, progress, write
from .testbed import Testbed, summary_of

GOAL_DIRECT_OVER_RAW = 0.4  # lanmesh's req/s with 64 in flight, against raw pyzmq's on the same sockets
GOAL_HOP_OVER_DIRECT = 0.6  # entering at a node that forwards, against entering at the serving node
RAY_NOTE_MISSING = "ray[serve] is not installed (pip install 'lanmesh[ray]'); the Ray Serve anchor was skipped"


def sync_latency(client: Client, n: int) -> dict[str, float]:
    lat: list[float] = []
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
    lat: list[float] = []
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


def measure(address: str, sync_n: int, pipe_n: int, window: int = 64) -> dict[str, Any]:
    """Sync latency then pipelined throughput of echo entering at `address` (the probe's side)."""
    with Client(address, timeout=30) as client:
        for _ in range(300):  # warm up connections and caches
            client.request("echo", "complete", "x")
        return {"sync": sync_latency(client, sync_n), "pipelined": pipelined(client, pipe_n, window)}


def run(
    quick: bool = False, reps: int = 3, mode: str = "auto", ray: bool = True, identities: bool = False
) -> dict[str, Any]:
    sync_n, pipe_n = (300, 2000) if quick else (5000, 30000)
    reps = 1 if quick else reps
    runs: dict[str, list[dict[str, Any]]] = {"raw_pyzmq": [], "direct": [], "one_hop": []}
    with Testbed(2, mode, identities=identities) as bed:
        print(f"overhead: {bed.mode} mode; starting an echo node, an entry node and a raw pyzmq echo server")
        server = bed.start_node(1, ["--model", "echo", "--grace", "2"], name="echo-node")
        entry = bed.start_node(2, ["--model", "sleep:1", "--grace", "2"], name="entry-node")
        raw, raw_address = bed.spawn_on(1, [sys.executable, "-m", "bench.rawzmq", "serve", "--bind", "{bind}"],
                                        port=free_port_pair())  # fmt: skip
        assert raw.stdout is not None
        if raw.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the raw pyzmq echo server did not start: {raw.stderr.read() if raw.stderr else ''}")
        bed.converge()
        for rep in range(reps):
            for path, node_address in (("raw_pyzmq", raw_address), ("direct", server.address),
                                       ("one_hop", entry.address)):  # fmt: skip
                print(f"rep {rep + 1}/{reps}: {path.replace('_', ' ')}")
                counts = ("--sync", str(sync_n), "--pipelined", str(pipe_n))
                if path == "raw_pyzmq":
                    argv = [sys.executable, "-m", "bench.rawzmq", "probe", "--node", node_address, *counts]
                    proc = bed.spawn_client(argv)
                else:
                    proc = bed.spawn_tool("overhead", "--node", node_address, *counts)
                out, err = proc.communicate(timeout=600)
                sys.stderr.write(err[-2000:] if proc.returncode else "")
                runs[path].append(summary_of(out, err, (path, node_address)))
        raw.terminate()
        where = bed.describe()
        if not ray:
            anchor: dict[str, Any] = {"skipped": "--no-ray"}
        elif quick:
            anchor = {"skipped": "not measured in --quick mode (Ray Serve takes ~30 s to start)"}
        elif importlib.util.find_spec("ray") is None:
            anchor = {"skipped": RAY_NOTE_MISSING}
        elif bed.lan is None:
            anchor = {"skipped": "Ray Serve binds every interface; it runs here only inside a network namespace (root)"}
        else:
            print("Ray Serve anchor: a no-op deployment on the client host (this takes a while)")
            anchor = _run_ray(bed)
    summary: dict[str, Any] = {}
    for path, rs in runs.items():
        summary[path] = {
            "sync_p50_us": median([r["sync"]["p50_us"] for r in rs]),
            "sync_p99_us": median([r["sync"]["p99_us"] for r in rs]),
            "pipelined_req_per_s": median([r["pipelined"]["req_per_s"] for r in rs]),
        }
        if path != "raw_pyzmq":
            summary[path]["pipelined_p50_us"] = median([r["pipelined"]["p50_us"] for r in rs])
            summary[path]["pipelined_p99_us"] = median([r["pipelined"]["p99_us"] for r in rs])
    rate = {path: summary[path]["pipelined_req_per_s"] for path in runs}
    summary["ratios"] = {
        "direct_over_raw_pyzmq": rate["direct"] / rate["raw_pyzmq"],
        "one_hop_over_direct": rate["one_hop"] / rate["direct"],
        "goals": {"direct_over_raw_pyzmq": GOAL_DIRECT_OVER_RAW, "one_hop_over_direct": GOAL_HOP_OVER_DIRECT},
    }
    summary["hop_added_sync_p50_us"] = summary["one_hop"]["sync_p50_us"] - summary["direct"]["sync_p50_us"]
    summary["hop_added_sync_p99_us"] = summary["one_hop"]["sync_p99_us"] - summary["direct"]["sync_p99_us"]
    if "handle_pipelined_req_per_s" in anchor:
        mesh_rps, mesh_p50 = summary["one_hop"]["pipelined_req_per_s"], summary["one_hop"]["sync_p50_us"]
        summary["vs_ray"] = {
            "one_hop_req_per_s_over_ray_handle": mesh_rps / anchor["handle_pipelined_req_per_s"],
            "one_hop_req_per_s_over_ray_http": mesh_rps / anchor["http_concurrent_req_per_s"],
            "ray_handle_sync_p50_over_one_hop_sync_p50": anchor["handle_sync_p50_us"] / mesh_p50,
        }
    result = {
        "quick": quick,
        "repetitions": reps,
        "testbed": where,
        "requests": {"sync": sync_n, "pipelined": pipe_n, "in_flight": 64},
        "raw_pyzmq": "a pyzmq ROUTER echoing each frame, on the echo node's host, with the same CURVE key; probed"
        " with the same request frames, sync and 64 in flight (bench/rawzmq.py)",
        "summary": summary,
        "ray_serve": anchor,
        "runs": runs,
    }
    written = write("overhead", result, plot=plot_overhead)
    _print(summary, anchor)
    print(f"written to {written}")
    return result


def _run_ray(bed: Testbed) -> dict[str, Any]:
    """The Ray probe as a process on the client host; a `skipped` note saying why when it fails."""
    proc = bed.spawn_client([sys.executable, "-m", "bench.overhead", "ray"])
    try:
        out, err = proc.communicate(timeout=600)
        return summary_of(out, err, ["overhead ray"])
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"skipped": f"Ray Serve failed to run: {str(exc)[-800:]}"}


def ray_probe(sync_n: int = 300, pipe_n: int = 2000, window: int = 64, http_n: int = 1600) -> dict[str, Any]:
    """Ray Serve's no-op deployment, measured like lanmesh's echo: sync and 64 in flight, via handle and HTTP.

    Runs in this process: call it inside a network namespace (Ray listens on every interface).
    """
    import http.client
    import logging
    import os

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8000})

        class Noop:
            async def __call__(self, *args: Any) -> str:
                return "x"

        # Admission as wide as the window: Ray's default (5 ongoing) would make this a test of its queueing.
        deployment: Any = serve.deployment(max_ongoing_requests=window)(Noop)
        handle = serve.run(deployment.bind(), route_prefix="/noop")
        for _ in range(100):
            handle.remote().result()
        lat = []
        for _ in range(sync_n):
            t0 = time.perf_counter()
            handle.remote().result()
            lat.append(time.perf_counter() - t0)
        pending: collections.deque[tuple[float, Any]] = collections.deque()
        plat: list[float] = []
        sent = 0
        t0 = time.perf_counter()
        while len(plat) < pipe_n:
            while sent < pipe_n and len(pending) < window:
                pending.append((time.perf_counter(), handle.remote()))
                sent += 1
            started, resp = pending.popleft()
            resp.result()
            plat.append(time.perf_counter() - started)
        pipe_s = time.perf_counter() - t0

        def get(conn: http.client.HTTPConnection) -> None:
            conn.request("GET", "/noop")
            body = conn.getresponse().read()
            if body != b"x":
                raise RuntimeError(f"Ray Serve answered {body[:80]!r}")

        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
        for _ in range(50):
            get(conn)
        hlat = []
        for _ in range(sync_n):
            t1 = time.perf_counter()
            get(conn)
            hlat.append(time.perf_counter() - t1)
        conn.close()
        per_thread = http_n // 16
        errors: list[str] = []

        def worker() -> None:
            c = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
            try:
                for _ in range(per_thread):
                    get(c)
            except (OSError, RuntimeError, http.client.HTTPException) as exc:
                errors.append(str(exc))
            finally:
                c.close()

        threads = [threading.Thread(target=worker) for _ in range(16)]
        t2 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        http_s = time.perf_counter() - t2
        if errors:
            raise RuntimeError(f"HTTP requests to Ray Serve failed: {errors[:3]}")
        return {
            "ray_version": ray.__version__,
            "handle_sync_p50_us": percentile(lat, 50) * 1e6,
            "handle_sync_p99_us": percentile(lat, 99) * 1e6,
            "handle_pipelined_req_per_s": pipe_n / pipe_s,
            "handle_pipelined_p50_us": percentile(plat, 50) * 1e6,
            "handle_pipelined_p99_us": percentile(plat, 99) * 1e6,
            "http_sync_p50_us": percentile(hlat, 50) * 1e6,
            "http_sync_p99_us": percentile(hlat, 99) * 1e6,
            "http_concurrent_req_per_s": per_thread * 16 / http_s,
            "http_concurrency": 16,
            "in_flight": window,
            "max_ongoing_requests": window,
        }
    finally:
        serve.shutdown()
        ray.shutdown()


def _print(s: dict[str, Any], anchor: dict[str, Any]) -> None:
    print(f"{'path':<10} {'sync p50':>10} {'sync p99':>10} {'64-in-flight req/s':>20} {'p50':>9} {'p99':>9}")
    for path in ("raw_pyzmq", "direct", "one_hop"):
        r = s[path]
        p50, p99 = r.get("pipelined_p50_us"), r.get("pipelined_p99_us")
        tail = f" {p50:>7.0f}us {p99:>7.0f}us" if p50 is not None and p99 is not None else ""
        print(
            f"{path:<10} {r['sync_p50_us']:>8.0f}us {r['sync_p99_us']:>8.0f}us {r['pipelined_req_per_s']:>20.0f}{tail}"
        )
    ratios = s["ratios"]
    for key, goal in ratios["goals"].items():
        value = ratios[key]
        print(f"{key.replace('_', ' ')}: {value:.2f}x (goal >= {goal}x: {'met' if value >= goal else 'NOT met'})")
    print(
        f"one forwarding hop adds {s['hop_added_sync_p50_us']:.0f} us at p50,"
        f" {s['hop_added_sync_p99_us']:.0f} us at p99"
    )
    if "handle_pipelined_req_per_s" in anchor:
        print(
            f"Ray Serve no-op: handle {anchor['handle_pipelined_req_per_s']:.0f} req/s (sync p50"
            f" {anchor['handle_sync_p50_us']:.0f} us), HTTP {anchor['http_concurrent_req_per_s']:.0f} req/s;"
            f" lanmesh one hop is {s['vs_ray']['one_hop_req_per_s_over_ray_handle']:.1f}x the handle's req/s"
        )
    else:
        print(f"Ray Serve anchor: {anchor.get('skipped')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description="the overhead scenario's probes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ray", help="measure Ray Serve's no-op deployment here (inside a network namespace)")
    args = parser.parse_args(argv)
    if args.cmd == "ray":
        sys.stdout.write(json.dumps({"event": "summary", **ray_probe()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
