"""`lanmesh models ...` and `lanmesh rollout`: what each node has and serves, and changing it without downtime.

Every command talks to nodes with `Admin` messages over the mesh's own (CURVE) sockets: only holders of the mesh
key can list, load, unload, switch or pull models.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

import zmq

from mesh import connect_dealer
from protocol import Admin, Error, Reply, decode, encode, name_problem

DEFAULT_NODE = "127.0.0.1:5555"
LIST_TIMEOUT_S = 10.0  # `lanmesh models`: each node's answer
ACTION_TIMEOUT_S = 900.0  # pull, load, unload, switch: a load or a pull takes minutes


class AdminError(RuntimeError):
    """A node refused or failed an admin command (the message is the node's), or did not answer."""


def admin_call(address: str, action: str, args: dict[str, Any], security: Any, timeout: float) -> dict[str, Any]:
    """Send one Admin to the node at `address` and wait for its answer (a dict), or raise AdminError."""
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_dealer(sock, f"tcp://{address}", security)  # a member identity: the node's key, its certificate first
    rid = f"admin-{os.getpid()}-{time.monotonic_ns()}"
    try:
        sock.send(encode(Admin(rid, action, args)))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000)):
                break
            reply = decode(sock.recv())
            if getattr(reply, "id", None) != rid:
                continue
            if isinstance(reply, Reply) and isinstance(reply.output, dict):
                return reply.output
            if isinstance(reply, Error):
                raise AdminError(f"{reply.node or address}: {reply.message}")
            raise AdminError(f"{address} answered {type(reply).__name__}")
        raise AdminError(f"{address} did not answer `{action}` within {timeout:g}s (is a node running there?)")
    finally:
        sock.close(0)


def _model_name(text: str) -> str:
    """A model name argument, checked by the one rule for names before anything is sent."""
    problem = name_problem(text, "model name")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _security(args: argparse.Namespace) -> Any:
    from mesh import client_security, load_key

    return load_key(args.key_file) if args.key_file else client_security()


def mesh_models(entry: str, security: Any, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every live node's models (one row per node), asked of each node the entry node knows."""
    from mesh import Client

    with Client(entry, timeout=timeout, security=security) as client:
        status = client.status(timeout=timeout)
    rows = []
    for node in status:
        if node["state"] not in ("self", "alive", "leaving"):
            rows.append({"node": node["node"], "address": node["address"], "state": node["state"], "models": []})
            continue
        try:
            out = admin_call(node["address"], "models", {}, security, timeout)
        except AdminError as exc:
            rows.append({"node": node["node"], "address": node["address"], "error": str(exc), "models": []})
            continue
        rows.append({"address": node["address"], "state": node["state"], **out})
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def print_models(rows: list[dict[str, Any]]) -> None:
    head = f"{'NODE':<16} {'MODEL':<14} {'VERSION':<9} {'STATE':<9} {'BACKEND':<28} {'PRECISION':<9} {'SIZE':>9}"
    print(head)
    for row in rows:
        if row.get("error") or not row["models"] and not row.get("pulls"):
            print(f"{row['node']:<16} {'-':<14} {'':<9} {row.get('state', ''):<9} {row.get('error', '')}")
        for m in row["models"]:
            state = m["state"] + ("" if m.get("current", True) else " (old)")
            print(f"{row['node']:<16} {m['name']:<14} {m['version']:<9} {state:<9} {str(m.get('backend', '')):<28}"
                  f" {m.get('precision', '-'):<9} {_size(m['bytes']) if m['bytes'] else '-':>9}")  # fmt: skip
            for f in m["files"]:
                print(f"{'':<16} {'':<14} {'':<9} {'':<9} {f['path']:<38} {_size(f['size']):>9}")
        for p in row.get("pulls", []):
            what = f"{p['state']} {100 * p['progress']:.0f}% of {_size(p['bytes'])} from {', '.join(p['from'])}"
            print(f"{row['node']:<16} {p['name']:<14} {p['version']:<9} {'pulling':<9} {what}")


def _progress_bar(address: str, name: str, security: Any, stop: threading.Event) -> None:
    """While a pull runs on `address`, show its progress on one line of stderr (a terminal only)."""
    while not stop.wait(0.5):
        try:
            out = admin_call(address, "models", {}, security, 2.0)
        except AdminError:
            continue
        for p in out.get("pulls", []):
            if p["name"] == name and p["state"] == "pulling":
                bar = "#" * int(p["progress"] * 30)
                mbit = p["done"] * 8 / 1e6 / max(p["seconds"], 0.1)
                sys.stderr.write(f"\r{name}@{p['version']} [{bar:<30}] {100 * p['progress']:5.1f}% {mbit:6.1f} Mbit/s")
                sys.stderr.flush()
    sys.stderr.write("\n")


# ---------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from mesh import LanmeshError

    from .reach import NodeUnreachable, node_answers

    action = getattr(args, "models_action", None) or "list"
    node = args.node or DEFAULT_NODE
    if action == "list" and args.local:
        from ..models.packaged import models_status

        print(json.dumps(models_status(), indent=2, default=str))
        return 0
    try:
        security = _security(args)
        node_answers(node, security)  # a wrong address fails now, not after --timeout (900 s for pulls)
        timeout = args.timeout or (LIST_TIMEOUT_S if action == "list" else ACTION_TIMEOUT_S)
        out = _act(action, args, node, security, timeout)
    except (AdminError, NodeUnreachable) as exc:
        print(f"lanmesh models {action}: {exc}", file=sys.stderr)
        return 1
    except LanmeshError as exc:
        print(f"lanmesh models {action}: {node}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an unreadable --key-file
        print(f"lanmesh models {action}: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(json.dumps(out, indent=2))
    return 0


def _act(action: str, args: argparse.Namespace, node: str, security: Any, timeout: float) -> dict[str, Any] | None:
    """Run one `lanmesh models` action on `node`; the answer to print as JSON (None: printed already)."""
    if action == "list":
        rows = mesh_models(node, security, timeout)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print_models(rows)
        return None
    if action == "pull":
        stop = threading.Event()
        bar = None
        if sys.stderr.isatty():
            bar = threading.Thread(target=_progress_bar, args=(node, args.name, security, stop), daemon=True)
            bar.start()
        try:
            return admin_call(node, "pull", {"name": args.name, "version": args.version or "", "serve": args.serve},
                              security, timeout)  # fmt: skip
        finally:
            stop.set()
            if bar is not None:
                bar.join(2)
    if action == "load":
        return admin_call(node, "load", {"name": args.name, "spec": args.spec}, security, timeout)
    if action == "unload":
        return admin_call(node, "unload", {"name": args.name, "version": args.version or ""}, security, timeout)
    return admin_call(node, "switch", {"name": args.name, "version": args.version}, security, timeout)


def rollout(entry: str, name: str, spec: str, security: Any, timeout: float, say: Any = print) -> list[dict[str, Any]]:
    """Move every node serving `name` to `spec`, one node at a time: load the new version beside the old, switch,
    drain the old. Every node serves `name` all along (old version until its switch, new after). Returns the steps
    with their timings; raises AdminError and stops at the first failure (the nodes not yet done keep the old)."""
    rows = mesh_models(entry, security, timeout)
    targets = [r for r in rows if any(m["name"] == name and m.get("current", True) for m in r.get("models", []))]
    if not targets:
        raise AdminError(f"no live node serves {name}")
    steps = []
    for row in targets:
        address = row["address"]
        old = next(m["version"] for m in row["models"] if m["name"] == name and m.get("current", True))
        t0 = time.monotonic()
        loaded = admin_call(address, "load", {"name": name, "spec": spec, "current": False}, security, timeout)
        t1 = time.monotonic()
        admin_call(address, "switch", {"name": name, "version": loaded["version"]}, security, timeout)
        t2 = time.monotonic()
        drained = admin_call(address, "unload", {"name": name, "version": old}, security, timeout)
        t3 = time.monotonic()
        step = {"node": row["node"], "old": old, "new": loaded["version"], "load_s": t1 - t0, "switch_s": t2 - t1,
                "drain_s": t3 - t2, "handed_back": drained["handed_back"]}  # fmt: skip
        say(f"{row['node']}: {name} {old} -> {loaded['version']} (load {step['load_s']:.1f}s, switch "
            f"{step['switch_s'] * 1000:.0f}ms, drain {step['drain_s']:.1f}s)")  # fmt: skip
        steps.append(step)
    return steps


def cmd_rollout(args: argparse.Namespace) -> int:
    from mesh import LanmeshError

    from .reach import NodeUnreachable, node_answers

    try:
        security = _security(args)
        node_answers(args.node, security)
        steps = rollout(args.node, args.name, args.spec, security, args.timeout)
    except (AdminError, NodeUnreachable) as exc:
        print(f"lanmesh rollout: {exc}", file=sys.stderr)
        return 1
    except LanmeshError as exc:
        print(f"lanmesh rollout: {args.node}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"lanmesh rollout: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(steps, indent=2))
    return 0


def add_parsers(sub: Any, add_key_file: Any) -> None:
    p = sub.add_parser(
        "models",
        help="what each node has and serves; pull, load, unload, switch models on running nodes",
        description="Without an action: list every live node's models (name, version, backend, precision, files, "
        "state, pulls in progress), asked of the node at --node and every node it knows. With one: do it on the "
        "node at --node. --node, --timeout and --key-file may come before or after the action.",
        epilog="examples:\n"
        "  lanmesh models --node 192.168.1.21:5555\n"
        "  lanmesh models pull smollm2 --node 192.168.1.21:5555 --serve\n"
        "  lanmesh models --node 192.168.1.21:5555 unload smollm2 --version 9d83ed24",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    node_help = f"the node to ask or act on, HOST:PORT (default {DEFAULT_NODE})"
    timeout_help = (
        f"seconds to wait for each answer (default {LIST_TIMEOUT_S:g} for the list, {ACTION_TIMEOUT_S:g} for an "
        "action: loads and pulls take minutes); a node that does not answer at all is given up after 3 s"
    )
    p.add_argument("--node", help=node_help)
    p.add_argument("--timeout", type=float, help=timeout_help)
    p.add_argument("--local", action="store_true", help="only this machine: runtimes, model packages, caches")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_key_file(p)
    actions = p.add_subparsers(dest="models_action", metavar="ACTION")
    pull = actions.add_parser("pull", help="fetch a model from the peers that serve it (never from the internet)")
    pull.add_argument("name", type=_model_name)
    pull.add_argument("--version", help="a version (its 8 hex digits); default: the one most peers serve")
    pull.add_argument("--serve", action="store_true", help="serve it on this node once fetched")
    load = actions.add_parser("load", help="load a model on a running node (beside a version it serves already)")
    load.add_argument("name", type=_model_name)
    load.add_argument("spec", help="a model spec as for `lanmesh node --model`")
    unload = actions.add_parser("unload", help="stop serving a model: nothing new is routed to it, running and "
                                "queued requests finish, then it is closed")  # fmt: skip
    unload.add_argument("name", type=_model_name)
    unload.add_argument("--version", help="which loaded version (default: the current one)")
    switch = actions.add_parser("switch", help="send a model's requests to another loaded version")
    switch.add_argument("name", type=_model_name)
    switch.add_argument("version")
    for q in (pull, load, unload, switch):
        # SUPPRESS: given after the action they count, and when not given there they leave what came before it
        # (an action's own default would overwrite `lanmesh models --node X pull NAME`'s X).
        q.add_argument("--node", default=argparse.SUPPRESS, help=node_help)
        q.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=timeout_help)
        add_key_file(q, default=argparse.SUPPRESS)
    p.set_defaults(func=cmd_models)

    r = sub.add_parser(
        "rollout",
        help="update a model on every node serving it, one node at a time, without downtime",
        description="For each node serving NAME, in turn: load SPEC beside the running version, switch NAME's "
        "requests to it, drain and close the old one. Every node keeps serving NAME throughout.",
    )
    r.add_argument("name", type=_model_name)
    r.add_argument("spec", help="the new model spec, as for `lanmesh node --model`")
    r.add_argument("--node", default=DEFAULT_NODE, help=f"a node of the mesh to start from (default {DEFAULT_NODE})")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each step")
    r.add_argument("--json", action="store_true", help="print the steps and their timings as JSON")
    add_key_file(r)
    r.set_defaults(func=cmd_rollout)
