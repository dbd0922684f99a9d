"""The request path without lanmesh: a pyzmq ROUTER that echoes every frame back, and a DEALER that measures it
like `bench overhead` measures a node (sync, then N in flight), on the same hosts, with the same CURVE keys and the
same request frames. What a developer gets from raw pyzmq is the bar lanmesh's own path is held to.

    python -m bench.rawzmq serve --bind HOST:PORT          # prints "ready" once bound
    python -m bench.rawzmq probe --node HOST:PORT --sync N --pipelined N --window 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import zmq

from mesh import Authenticator, MeshKey, client_security
from protocol import Request, Task, encode

from .report import percentile

RAW_KEY_ENV = "LANMESH_BENCH_RAW_KEY"  # the raw pair's CURVE key (a mesh key) when the nodes use member identities


def _security() -> MeshKey | None:
    if os.environ.get(RAW_KEY_ENV):
        return MeshKey.load(os.environ[RAW_KEY_ENV])
    sec = client_security()
    return sec if isinstance(sec, MeshKey) else None


def serve(bind: str) -> int:
    ctx = zmq.Context()
    key = _security()
    auth = None
    if key is not None:
        auth = Authenticator(ctx, key, lambda _kind, _source: None)  # like a node: ZAP before any bind
        auth.start()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, 20_000)
    router.setsockopt(zmq.RCVHWM, 20_000)
    if key is not None:
        key.configure_server(router)
    router.bind(f"tcp://{bind}")
    print("ready", flush=True)
    try:
        while True:
            router.send_multipart(router.recv_multipart())
    except KeyboardInterrupt:
        return 0
    finally:
        if auth is not None:
            auth.stop()
        ctx.destroy(0)


def probe(node: str, sync_n: int, pipe_n: int, window: int) -> dict[str, Any]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    key = _security()
    if key is not None:
        key.configure_client(sock)
    sock.connect(f"tcp://{node}")
    frame = encode(Request("0123456789ab.1", "echo", Task.COMPLETE, "x", {}, 30_000, 0, 0, "raw-client"))
    try:
        for _ in range(300):  # connect and warm up, as the mesh probe does
            sock.send(frame)
            sock.recv()
        lat = []
        for _ in range(sync_n):
            t0 = time.perf_counter()
            sock.send(frame)
            sock.recv()
            lat.append(time.perf_counter() - t0)
        sent = done = 0
        t0 = time.perf_counter()
        while done < pipe_n:
            while sent < pipe_n and sent - done < window:
                sock.send(frame)
                sent += 1
            sock.recv()
            done += 1
        elapsed = time.perf_counter() - t0
    finally:
        ctx.destroy(0)
    return {
        "sync": {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6, "requests": sync_n},
        "pipelined": {"req_per_s": pipe_n / elapsed, "requests": pipe_n, "in_flight": window},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rawzmq", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="echo every frame back on a ROUTER")
    s.add_argument("--bind", required=True, help="HOST:PORT")
    p = sub.add_parser("probe", help="measure the echo server like the overhead probe measures a node")
    p.add_argument("--node", required=True)
    p.add_argument("--sync", type=int, default=5000)
    p.add_argument("--pipelined", type=int, default=30000)
    p.add_argument("--window", type=int, default=64)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(args.bind)
    print(json.dumps({"event": "summary", **probe(args.node, args.sync, args.pipelined, args.window)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
