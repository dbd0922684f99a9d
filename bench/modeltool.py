"""`python -m bench.modeltool`: model operations from the client host, for the `transfer` and `rollout` scenarios.

Prints JSON-lines events on stdout like `bench.loadgen`: `progress` while a pull runs (every 0.1 s, from the
pulling node's own account), `step` for each node a rollout moves, and one `summary` at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import zmq

from mesh import client_security, connect_dealer
from nodes.cli.model_commands import AdminError, admin_call, mesh_models, rollout
from protocol import Data, Fetch, decode, encode

from .loadgen import emit


def pull(node: str, name: str, version: str, timeout: float) -> dict[str, Any]:
    """Ask `node` to pull `name@version`; report its progress until it is done; the pull's final row."""
    security = client_security()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["reply"] = admin_call(node, "pull", {"name": name, "version": version}, security, timeout)
        except AdminError as exc:
            outcome["error"] = str(exc)

    worker = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    worker.start()
    row: dict[str, Any] = {}
    while worker.is_alive() and time.monotonic() - t0 < timeout:
        worker.join(0.1)
        try:
            rows = admin_call(node, "models", {}, security, 2.0)["pulls"]
        except AdminError:
            continue
        mine = [r for r in rows if r["name"] == name and r["version"] == version[:8]]
        if mine:
            row = mine[0]
            emit("progress", done=row["done"], bytes=row["bytes"], progress=row["progress"], state=row["state"])
    worker.join(5)
    try:
        rows = admin_call(node, "models", {}, security, 5.0)["pulls"]
        row = next((r for r in rows if r["name"] == name and r["version"] == version[:8]), row)
    except AdminError:
        pass
    summary = {**row, "wall_s": time.monotonic() - t0, **outcome}
    emit("summary", **summary)
    return summary


def manifest(node: str, name: str, version: str) -> dict[str, Any]:
    """Ask `node` for the manifest of `name@version` (it hashes its files on the first ask)."""
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_dealer(sock, f"tcp://{node}", client_security())
    try:
        sock.send(encode(Fetch("manifest", name, version)))
        if not sock.poll(60_000):
            raise SystemExit(f"{node} gave no manifest of {name}@{version} within 60 s")
        reply = decode(sock.recv())
    finally:
        sock.close(0)
    if not isinstance(reply, Data):
        raise SystemExit(f"{node} refused the manifest of {name}@{version}: {reply}")
    files = json.loads(reply.data)["files"]
    summary = {"files": [{"path": f["path"], "size": f["size"], "chunks": len(f["chunks"])} for f in files]}
    emit("summary", **summary)
    return summary


def do_rollout(node: str, name: str, spec: str, timeout: float) -> dict[str, Any]:
    security = client_security()
    t0 = time.monotonic()
    try:
        steps = rollout(node, name, spec, security, timeout, say=lambda text: emit("say", text=text))
    except AdminError as exc:
        summary = {"error": str(exc), "seconds": time.monotonic() - t0}
        emit("summary", **summary)
        return summary
    for step in steps:
        emit("step", **step)
    after = [
        {"node": row["node"], "models": [(m["name"], m["version"], m["state"]) for m in row["models"]]}
        for row in mesh_models(node, security, 10.0)
    ]
    summary = {"steps": steps, "seconds": time.monotonic() - t0, "after": after}
    emit("summary", **summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.modeltool", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pull", help="a node pulls a model from its peers; progress events until done")
    m = sub.add_parser("manifest", help="ask a node for a model's manifest")
    for q in (p, m):
        q.add_argument("--node", required=True, help="host:port of the node")
        q.add_argument("--name", required=True)
        q.add_argument("--version", required=True)
    p.add_argument("--timeout", type=float, default=600.0)
    r = sub.add_parser("rollout", help="lanmesh rollout, with each step's timings as events")
    r.add_argument("--node", required=True, help="a node of the mesh (host:port)")
    r.add_argument("--name", required=True)
    r.add_argument("--spec", required=True)
    r.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.cmd == "pull":
        out = pull(args.node, args.name, args.version, args.timeout)
        return 0 if out.get("state") == "done" and "error" not in out else 1
    if args.cmd == "manifest":
        manifest(args.node, args.name, args.version)
        return 0
    out = do_rollout(args.node, args.name, args.spec, args.timeout)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
