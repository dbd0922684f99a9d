"""The `lanmesh` command: run a node, send a request, look at the mesh."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from typing import Any

from ..runtime.config import DEFAULT_PORT, NodeConfig, parse_labels
from . import early_signals, enrol, note_early_signal, request, service_unit
from .progress import ProgressLine, StageLog


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # only for --version: ~0.1 s of every start

    try:
        return version("lanmesh")
    except PackageNotFoundError:
        return "0+unknown"


class _PrintVersion(argparse.Action):
    """`--version`, looked up only when asked for."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        print(f"lanmesh {_version()}")
        parser.exit()


# ---------------------------------------------------------------- lanmesh node


def _add_node_parser(sub: Any) -> None:
    p = sub.add_parser(
        "node",
        help="run a node: serve models and join the mesh",
        description=(
            "Run a lanmesh node. It loads its models, finds peers by mDNS (and --peer seeds), gossips its load "
            "and serves requests arriving at its ROUTER port, forwarding them to the best peer when that is "
            "better. SIGINT/SIGTERM leave the mesh gracefully: in-flight work finishes within --grace seconds. "
            "Every option can also come from a LANMESH_<OPTION> env var (e.g. LANMESH_PORT=6000) or a TOML "
            "file (--config); flags win over env, env over the file."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (keys as the long options, e.g. port = 6000)")
    p.add_argument("--name", help="node id (default: hostname plus a random suffix)")
    p.add_argument("--port", type=int, help=f"ROUTER port for requests (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--pub-port", type=int, dest="pub_port", help="gossip PUB port (default: port + 1)")
    p.add_argument("--bind", help="address to bind (default 0.0.0.0)")
    p.add_argument("--advertise", help="address peers should use to reach this node (default: the interface's IPv4)")
    p.add_argument(
        "--interface", help="network interface (name or IPv4) for mDNS and advertising, e.g. eth0; avoids docker0/VPNs"
    )
    p.add_argument(
        "--peer",
        action="append",
        dest="peers",
        metavar="HOST:PORT",
        help="static seed peer, repeatable; for networks where multicast is blocked (KEY@HOST:PORT also names the "
        "node's key: write it as --peer=KEY@HOST:PORT, since a key may begin with '-')",
    )
    p.add_argument("--no-mdns", action="store_false", dest="mdns", default=None, help="do not use mDNS")
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="SPEC",
        help=(
            "model to serve, repeatable: smollm2, minilm, echo, sleep:MS[:cap=N], or name=N,path=FILE[,task=embed]"
            "[,engine=onnx|transformers][,precision=int4|int8|fp32]. Default: smollm2 and minilm. In "
            "LANMESH_MODELS separate specs with ';' (name=a,path=/a.gguf;minilm)"
        ),
    )
    p.add_argument(
        "--layers",
        metavar="A-B|auto",
        help="serve only layers A to B (from 0) of the chat model: one stage of a model several nodes serve together "
        "(shown as NAME[A-B]); auto: take the stage the automatic split gives this node. Without it, a chat model "
        "too big for this node's memory joins the automatic split",
    )
    p.add_argument(
        "--precision",
        choices=["int4", "int8", "fp16", "fp32"],
        help=(
            "weights of chat models built for the onnxruntime engine (int4; fp16 needs a GPU); "
            "a model spec's precision=... overrides it"
        ),
    )
    p.add_argument("--label", action="append", dest="label_list", metavar="KEY=VALUE", help="node label, repeatable")
    p.add_argument("--max-queue", type=int, dest="max_queue", help="queued requests per model before REJECT (256)")
    p.add_argument("--batch-wait-ms", type=float, dest="batch_wait_ms", help="how long a batch waits to fill (5)")
    p.add_argument("--gossip-interval", type=float, dest="gossip_interval", help="seconds between load reports (0.25)")
    p.add_argument("--suspect-after", type=float, dest="suspect_after", help="silence before a peer is suspect (1.0)")
    p.add_argument("--dead-after", type=float, dest="dead_after", help="silence before a peer is dead (3.0)")
    p.add_argument(
        "--try-timeout",
        type=float,
        dest="try_timeout",
        help="re-send a forwarded request elsewhere after this many seconds without an answer, cancelling it where "
        "it ran (0, the default: never; a request then runs as long as its deadline, moved only if its node fails)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        dest="stall_timeout",
        help="exit (status 70, after an mDNS goodbye) when the mesh loop stops turning this long, so a supervisor "
        "restarts the node (10; 0 = off)",
    )
    p.add_argument("--grace", type=float, help="seconds to finish in-flight work when stopping (10)")
    p.add_argument(
        "--key-file",
        dest="key_file",
        metavar="FILE",
        help="mesh key from `lanmesh keygen` (default: $LANMESH_KEY_FILE, then ~/.config/lanmesh/mesh.key)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="run an OPEN mesh without a key: no encryption, anyone on the LAN may join and read traffic",
    )
    p.add_argument(
        "--authority-dir",
        dest="authority_dir",
        metavar="DIR",
        help="the mesh authority this node holds (default: `authority` beside the key file, when there)",
    )
    p.add_argument(
        "--state-dir",
        dest="state_dir",
        metavar="DIR",
        help="what this node keeps across restarts: the revocation list, the HTTP API's keys "
        "($STATE_DIRECTORY, else ~/.local/state/lanmesh)",
    )
    for flag, what in (
        ("--max-prompt-chars", "characters of input per request (262144)"),
        ("--max-tokens", "highest max_tokens a request may ask for (4096)"),
        ("--max-embed-inputs", "texts per embed request (256)"),
        ("--max-inflight-per-client", "requests one client connection may have in flight here (1024)"),
        ("--max-inflight-per-peer", "requests one peer may have forwarded here at once (2048)"),
        ("--max-frame-bytes", "largest message accepted, bytes (8388608)"),
    ):
        p.add_argument(flag, type=int, dest=flag[2:].replace("-", "_"), help=what)
    p.add_argument(
        "--routing",
        choices=["cache-aware", "p2c", "round-robin", "random", "least-loaded"],
        help="routing policy (cache-aware, the default: a chat goes to the node that holds the most of its earlier "
        "messages unless that node is out of balance with the others, else p2c = power of two choices; the others "
        "are baselines for benchmarks)",
    )
    p.add_argument(
        "--max-memory",
        dest="max_memory",
        help="refuse to start when the models would take this process past this: a size with a unit, e.g. 8G or "
        "512M (K, M, G, T: powers of 1024; at least 64M). The cgroup's memory limit, such as systemd's MemoryMax=, "
        "is always respected",
    )
    p.add_argument(
        "--kv-cache",
        type=int,
        dest="kv_cache",
        metavar="MIB",
        help="key/value cache of each chat model, in MiB: what its running requests may hold at most together "
        "(default 1024, cut to fit the memory limit; a model spec's kv_cache=MIB sets one model's)",
    )
    p.add_argument(
        "--prefix-cache",
        type=int,
        dest="prefix_cache",
        metavar="MIB",
        help="MiB of each chat model's key/value cache kept for its prefix cache: earlier prompts and answers, so "
        "a conversation's next turn reads only what is new (default half of --kv-cache; 0 = none; a model spec's "
        "prefix_cache=MIB sets one model's)",
    )
    p.add_argument("--cache-dir", dest="cache_dir", help="where converted models are cached (~/.cache/lanmesh)")
    p.add_argument(
        "--transfer-rate",
        type=float,
        dest="transfer_rate",
        metavar="MBIT",
        help="send model files to peers at most this fast, in Mbit/s, so serving goes on meanwhile (400; 0 = no cap)",
    )
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", dest="log_format", choices=["text", "json"])
    p.add_argument(
        "--http-host", dest="http_host", help="address of the HTTP API and /metrics (127.0.0.1); others need a key"
    )
    p.add_argument("--http-port", type=int, dest="http_port", help="port of the OpenAI-compatible API (8000; 0 = off)")
    p.add_argument(
        "--api-key", dest="api_key", help="key HTTP clients send as 'Authorization: Bearer KEY' (prefer the env/file)"
    )
    p.add_argument("--api-key-file", dest="api_key_file", metavar="FILE", help="file whose first line is the API key")
    p.set_defaults(func=_cmd_node)


def _cmd_node(args: argparse.Namespace) -> int:
    import faulthandler
    import os

    from ..runtime import logs
    from ..runtime.node import Node, StartupInterrupted
    from ..runtime.systemd import ServiceNotifier

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "config", "label_list", "command")}
    if args.label_list:
        flags["labels"] = parse_labels(",".join(args.label_list))
    try:
        cfg = NodeConfig.load(flags, toml=args.config)
    except ValueError as exc:
        print(f"lanmesh node: {exc}", file=sys.stderr)
        return 2
    if cfg.cache_dir:
        os.environ["LANMESH_CACHE_DIR"] = cfg.cache_dir
    # This process's own mesh clients (the HTTP gateway) must speak the way the node does.
    if cfg.insecure:
        os.environ["LANMESH_INSECURE"] = "1"
    elif cfg.key_file:
        os.environ["LANMESH_KEY_FILE"] = cfg.key_file
    notifier = ServiceNotifier.from_environment()  # run by systemd (Type=notify): tell it how the node is doing
    if notifier.watchdog_s is not None:
        faulthandler.enable()  # systemd's watchdog sends SIGABRT: every thread's stack goes to the journal first
    node = Node(cfg, notifier=notifier)
    node.install_signal_handlers()  # from here on a signal leaves gracefully, model loading included
    if early_signals:  # one came while this process was still starting up
        node.request_stop()
    progress = ProgressLine(sys.stderr) if sys.stderr.isatty() else None  # log lines print above its line
    logs.setup(node.node_id, cfg.log_level, cfg.log_format, stream=progress)
    try:
        _start_showing_progress(node, progress)
    except StartupInterrupted:
        node.shutdown()  # whatever had started leaves the mesh (Leave, mDNS goodbye) and stops
        return 0
    except (ValueError, OSError, MemoryError, ImportError, RuntimeError) as exc:  # RuntimeError: mDNS, the mesh loop
        print(f"lanmesh node: cannot start: {exc}", file=sys.stderr)
        node.shutdown()
        notifier.status(f"cannot start: {exc}")  # what `systemctl status` shows
        return 1
    return node.run_until_signal()


def _start_showing_progress(node: Any, line: ProgressLine | None) -> None:
    """Start the node with its progress on `line` at a terminal, else as log lines; the line is gone afterwards."""
    try:
        node.start(progress=line if line is not None else StageLog())
    finally:
        if line is not None:
            line.close()


# ---------------------------------------------------------------- lanmesh status


def _add_status_parser(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="list the nodes a node sees: models, load, state, last heard",
        description="Ask a node for its view of the mesh and print it as a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--node", default=argparse.SUPPRESS,
                   help=f"node address host:port (default: 127.0.0.1:{DEFAULT_PORT}, or a client's node)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the raw rows as JSON")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--once", action="store_true", help="at a terminal: print the table once instead of a live one")
    _add_key_file(p)
    p.set_defaults(func=_cmd_status)


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `Pong.status` rows."""
    head = ["NODE", "ADDRESS", "STATE", "MODELS (inflight/queued/cap)", "LABELS", "HEARD", "VIA"]
    table = [head]
    for r in rows:
        models = " ".join([*(f"{m}:{v[0]}/{v[1]}/{v[2]}" for m, v in sorted(r.get("models", {}).items())),
                           *(f"({m}:wanted)" for m in sorted(r.get("wants") or {}))]) or "-"  # fmt: skip
        labels = ",".join(f"{k}={v}" for k, v in sorted(r.get("labels", {}).items())) or "-"
        heard = "-" if r.get("source") == "self" else f"{r.get('last_heard_s', 0):.1f}s ago"
        table.append([r["node"], r["address"], r["state"], models, labels, heard, r.get("source", "")])
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table)
    security = rows[0].get("security") if rows else None
    return text + "\n" + format_security(security) if isinstance(security, dict) else text


def format_security(sec: dict[str, Any]) -> str:
    """One line (two with foreign nodes) on how the answering node's mesh is protected."""
    if sec.get("mode") == "insecure":
        line = "security: OPEN MESH (--insecure): no encryption, no authentication; anyone on the LAN can join"
    elif sec.get("mode") == "identities":
        line = (f"security: CURVE, every member its own key; mesh {sec.get('fingerprint', '?')}, this node "
                f"{sec.get('member', '?')} ({sec.get('role', '?')}), revocation list {sec.get('revocations', 0)}"
                + (", holds the authority" if sec.get("authority") else ""))  # fmt: skip
    else:
        line = f"security: CURVE, mesh key {sec.get('fingerprint', '?')}"
    counters = ("auth_rejected", "handshake_failed", "identity_mismatch", "role_refused", "name_refused",
                "unknown_key", "revoked_refused")  # fmt: skip
    refused = {k: sec.get(k, 0) for k in counters}
    if any(refused.values()):
        line += "; refused: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in refused.items() if v)
    foreign = sec.get("foreign") or []
    if foreign:
        seen = ", ".join(f"{f['node']} at {f['host']}:{f['port']}" for f in foreign[:5])
        line += f"\nother meshes seen (ignored): {seen}" + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    return line


def _cmd_status(args: argparse.Namespace) -> int:
    from mesh import Client, LanmeshError

    if sys.stdout.isatty() and not args.json and not args.once and importlib.util.find_spec("rich") is not None:
        from .console import live_status

        return live_status(args.node, args.watch or 1.0, getattr(args, "key_file", None))
    from .reach import NodeUnreachable, check_answers

    try:
        with Client(args.node, timeout=5.0, security=_client_key(args)) as client:
            check_answers(client, args.node)
            while True:
                rows = client.status()
                if args.json:
                    print(json.dumps(rows, indent=2))
                else:
                    if args.watch:
                        sys.stdout.write("\x1b[2J\x1b[H")
                    print(format_status(rows))
                if not args.watch:
                    return 0
                time.sleep(args.watch)
    except NodeUnreachable as exc:
        print(f"lanmesh status: {exc}", file=sys.stderr)
        return 1
    except LanmeshError as exc:
        print(f"lanmesh status: cannot reach {args.node}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"lanmesh status: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------- lanmesh keygen and client keys


def _add_key_file(p: argparse.ArgumentParser, default: Any = None) -> None:
    p.add_argument(
        "--key-file",
        dest="key_file",
        metavar="FILE",
        default=default,
        help="mesh key (default: $LANMESH_KEY_FILE, then ~/.config/lanmesh/mesh.key; none: plaintext)",
    )


def _client_key(args: argparse.Namespace) -> Any:
    """The `security=` for a Client: the --key-file given, else None (the client looks in the env and default)."""
    from mesh import load_key

    return load_key(args.key_file) if args.key_file else None


def _add_keygen_parser(sub: Any) -> None:
    p = sub.add_parser(
        "keygen",
        help="create one key shared by the whole mesh (simpler; `lanmesh init` gives every machine its own)",
        description=(
            "Write a new mesh key file (mode 0600). Every node and client of one mesh uses the same file: "
            "connections are encrypted with it (CURVE), and nodes refuse anyone who does not hold it. Whoever holds "
            "it is everything at once (node, client, operator); `lanmesh init` and `lanmesh invite` instead give "
            "every machine its own key and role, revocable one by one."
        ),
    )
    p.add_argument("path", nargs="?", help="where to write it (default: ~/.config/lanmesh/mesh.key)")
    p.add_argument("--force", action="store_true", help="replace an existing key file (every node then needs it)")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from mesh import CurveUnavailable, MeshKey, default_key_path

    path = args.path or default_key_path()
    try:
        written = MeshKey.generate().write(path, force=args.force)
    except (FileExistsError, CurveUnavailable) as exc:
        print(f"lanmesh keygen: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lanmesh keygen: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    key = MeshKey.load(written)
    print(f"wrote mesh key {key.fingerprint} to {written} (mode 0600)")
    print("copy this file to every machine of the mesh, e.g. to ~/.config/lanmesh/mesh.key, and keep it secret")
    return 0


# ---------------------------------------------------------------- lanmesh chat / doctor


def _add_chat_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal, streaming its answers",
        description="Interactive chat through a node. /exit or Ctrl-D quits, Ctrl-C stops an answer, /reset forgets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--node", default=argparse.SUPPRESS,
                   help=f"node address host:port (default: 127.0.0.1:{DEFAULT_PORT}, or a client's node)")  # fmt: skip
    p.add_argument("--model", default="smollm2", help="chat model")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, dest="max_tokens")
    p.add_argument("--temperature", type=float)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds an answer may take")
    _add_key_file(p)
    p.set_defaults(func=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    from .console import chat_command

    return chat_command(args)


def _add_doctor_parser(sub: Any) -> None:
    p = sub.add_parser(
        "doctor",
        help="explain what this machine and a node see, and why a peer is missing",
        description=(
            "Interfaces, the node's peers and how each was found, mDNS announcements, and for every node announced "
            "but not connected the reason: version, mesh key, closed port, no route. Takes a few seconds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--node", default=f"127.0.0.1:{DEFAULT_PORT}", help="node address host:port")
    p.add_argument("--mdns-timeout", type=float, default=2.0, dest="mdns_timeout", help="seconds to listen to mDNS")
    p.add_argument("--no-mdns", action="store_false", dest="mdns", help="skip the mDNS check")
    p.add_argument("--interface", help="interface (name or IPv4) to listen for mDNS on (default: all)")
    _add_key_file(p)
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .console import doctor_command

    return doctor_command(args)


# ---------------------------------------------------------------- lanmesh models / bench


def _add_models_parser(sub: Any) -> None:
    from .model_commands import add_parsers

    add_parsers(sub, _add_key_file)


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="run a benchmark scenario (same as python -m bench)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    # The harness is a program of its own (it drives nodes, not the other way round): run it, do not import it.
    return subprocess.run([sys.executable, "-m", "bench", *args.rest], check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lanmesh",
        description=(
            "lanmesh turns the machines on a LAN into one private AI service. Run `lanmesh node` on every "
            "machine; send requests to any of them."
        ),
        epilog=(
            "start here:\n"
            "  lanmesh init                        start a mesh on the first machine (its authority, its own key)\n"
            "  lanmesh invite                      a one-time code for one more machine: `lanmesh join CODE` there\n"
            "  lanmesh keygen                      or instead: one key shared by the whole mesh (copy it everywhere)\n"
            "  lanmesh node                        serve the default models (smollm2, minilm) and join the mesh\n"
            "  lanmesh request smollm2 'Hello!'    ask any node; it routes the request in the mesh\n"
            "  lanmesh status                      every node, its models and load\n"
            "`lanmesh COMMAND --help` explains each command; http://127.0.0.1:8000/ is a node's web console."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_PrintVersion, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_node_parser(sub)
    request.add_parser(sub, _add_key_file)
    _add_status_parser(sub)
    _add_chat_parser(sub)
    _add_doctor_parser(sub)
    _add_keygen_parser(sub)
    enrol.add_parsers(sub)
    enrol.add_apikey_parser(sub)
    _add_models_parser(sub)
    service_unit.add_parser(sub)
    _add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "node":
        # Installed already when this package was imported; again for a main() called after that import.
        signal.signal(signal.SIGTERM, note_early_signal)
        signal.signal(signal.SIGINT, note_early_signal)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in ("status", "chat", "request") and not getattr(args, "node", None):
        args.node = enrol.default_node(None, getattr(args, "key_file", None))  # a client's machine runs no node
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C where a command does not handle it itself: quiet, as a shell expects
        return request.EXIT_INTERRUPTED
    except BrokenPipeError:  # `lanmesh status | head -1`: the reader has gone, and so has the point of writing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a pipeline's writer


if __name__ == "__main__":
    sys.exit(main())
