"""The operator's terminal: the live `lanmesh status` table, `lanmesh chat` and `lanmesh doctor`.

Only the live table needs rich (the http extra); chat and doctor work on a plain install.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

import psutil

from mesh import Client, LanmeshError
from protocol import VERSION

from .reach import NodeUnreachable, check_answers, tcp_probe
from .request import cut_short_note

# ---------------------------------------------------------------- lanmesh status (live)

_STATE_STYLE = {"self": "bold green", "alive": "green", "suspect": "yellow", "dead": "red", "leaving": "magenta"}


def status_table(rows: list[dict[str, Any]], node: str, problem: str = "") -> Any:
    """A rich Table of `Pong.status` rows: state, models with their load, labels, last heard, how found."""
    from rich.table import Table
    from rich.text import Text

    caption = f"as seen by {node} at {time.strftime('%H:%M:%S')}  ·  Ctrl-C quits"
    security = rows[0].get("security") if rows else None
    if isinstance(security, dict):
        mode = security.get("mode")
        shown = (
            "[bold red]OPEN MESH (--insecure)[/]"
            if mode == "insecure"
            else f"CURVE, mesh key {security.get('fingerprint')}"
        )
        caption = f"{shown}  ·  {caption}"
    table = Table(title="lanmesh", caption=f"[red]{problem}[/red]" if problem else caption, expand=False)
    for name in ("node", "address", "state", "models: running/queued/cap", "load", "labels", "last heard", "via"):
        table.add_column(name, justify="right" if name in ("load", "last heard") else "left")
    for r in rows:
        models = r.get("models") or {}
        busy = sum(v[0] + v[1] for v in models.values())
        cap = sum(v[2] for v in models.values())
        state = str(r.get("state", ""))
        heard = "-" if r.get("source") == "self" else f"{float(r.get('last_heard_s', 0.0)):.1f}s ago"
        table.add_row(
            str(r.get("node", "")),
            str(r.get("address", "")),
            Text(state, style=_STATE_STYLE.get(state, "dim")),
            "\n".join(
                [
                    *(f"{m} {v[0]}/{v[1]}/{v[2]}" for m, v in sorted(models.items())),
                    *(f"({m}: a stage, when split)" for m in sorted(r.get("wants") or {})),
                ]
            )
            or "-",  # fmt: skip
            _load_bar(busy, cap),
            ",".join(f"{k}={v}" for k, v in sorted((r.get("labels") or {}).items())) or "-",
            heard,
            str(r.get("source", "")),
        )
    return table


def _load_bar(busy: int, cap: int, width: int = 10) -> Any:
    from rich.text import Text

    if cap <= 0:
        return Text("-")
    frac = busy / cap
    filled = min(width, round(frac * width))
    style = "green" if frac < 0.75 else "yellow" if frac <= 1.0 else "red"
    return Text("█" * filled + "░" * (width - filled) + f" {frac * 100:4.0f}%", style=style)


def open_client(node: str, timeout: float, key_file: str | None = None) -> Client:
    """A client for `node`; with `key_file`, that mesh key (else the client's own default lookup)."""
    if key_file:
        from mesh import load_key

        return Client(node, timeout=timeout, security=load_key(key_file))
    return Client(node, timeout=timeout)


def live_status(node: str, interval: float, key_file: str | None = None) -> int:
    """Redraw the mesh table every `interval` seconds until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        with open_client(node, 5.0, key_file) as client:
            try:
                check_answers(client, node)
                rows = client.status()
            except NodeUnreachable as exc:
                print(f"lanmesh status: {exc}", file=sys.stderr)
                return 1
            except LanmeshError as exc:
                print(f"lanmesh status: {node}: {exc}", file=sys.stderr)
                return 1
            with Live(status_table(rows, node), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    try:
                        rows = client.status()
                        live.update(status_table(rows, node))
                    except LanmeshError as exc:
                        live.update(status_table(rows, node, problem=f"{node} does not answer: {exc}"))
    except ValueError as exc:  # an unreadable --key-file
        print(f"lanmesh status: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------- lanmesh chat


@dataclass
class ChatSession:
    """One terminal conversation: the history sent with every turn, and where the text goes."""

    client: Client
    model: str
    gen: dict[str, Any]
    out: TextIO
    err: TextIO
    interactive: bool
    history: list[dict[str, str]]

    def turn(self, text: str) -> bool:
        """Send one user message and stream the answer; False when it failed before any text came."""
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        stream = self.client.chat(self.model, self.history, stream=True, **self.gen)
        if self.interactive:
            self.out.write(f"\x1b[1;36m{self.model}\x1b[0m › ")
            self.out.flush()
        try:
            for piece in stream:
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
            self.out.write("\n")
            note = cut_short_note(stream.result.meta, self.gen.get("max_tokens")) if stream.result else None
            if note:
                self.err.write(f"{note}\n")
        except KeyboardInterrupt:
            stream.close()  # sends a Cancel: the node serving the answer stops generating it
            self.out.write(" [interrupted]\n")
        except LanmeshError as exc:
            stream.close()
            if pieces:
                self.out.write("\n")
            self.err.write(f"lanmesh chat: {type(exc).__name__}: {exc}\n")
        finally:
            self.out.flush()
        answer = "".join(pieces)
        if answer:
            self.history.append({"role": "assistant", "content": answer})  # what the user saw, even if cut short
            return True
        self.history.pop()  # nothing came back: the question is not part of the conversation
        return False


def chat_command(args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """`lanmesh chat`: read lines, stream answers, keep the history; /exit or Ctrl-D quits, Ctrl-C stops an answer."""
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    interactive = stdin.isatty() and out.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    gen = {k: getattr(args, k) for k in ("max_tokens", "temperature") if getattr(args, k) is not None}
    failures = 0
    try:
        client = open_client(args.node, args.timeout, getattr(args, "key_file", None))
    except ValueError as exc:
        print(f"lanmesh chat: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            check_answers(client, args.node)
        except NodeUnreachable as exc:
            print(f"lanmesh chat: {exc}", file=sys.stderr)
            return 1
        session = ChatSession(client, args.model, gen, out, sys.stderr, interactive, list(system))
        if interactive:
            out.write(f"Chatting with {args.model} through {args.node}. /exit or Ctrl-D quits, Ctrl-C stops an answer, "
                      "/reset forgets the conversation.\n")  # fmt: skip
        try:
            for text in _lines(stdin, interactive, out):
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    session.history = list(system)
                    out.write("(conversation forgotten)\n")
                    continue
                if not session.turn(text):
                    failures += 1
        except KeyboardInterrupt:  # Ctrl-C while waiting for piped input: stop like a shell pipeline does
            return 130
    return 1 if failures and not interactive else 0


def _lines(stdin: TextIO, interactive: bool, out: TextIO) -> Iterator[str]:
    """Non-empty input lines until EOF; at a terminal with a prompt and line editing, Ctrl-C clearing the line."""
    while True:
        if interactive:
            try:
                import readline  # noqa: F401 - enables line editing and history for input()
            except ImportError:
                pass  # no readline on this platform: plain input() still works
            try:
                line = input("\x1b[1myou\x1b[0m › ")
            except EOFError:
                out.write("\n")
                return
            except KeyboardInterrupt:
                out.write("\n(Ctrl-D or /exit quits)\n")
                continue
        else:
            line = stdin.readline()
            if not line:
                return
        if line.strip():
            yield line.strip()


# ---------------------------------------------------------------- lanmesh doctor

_VIRTUAL = ("docker", "br-", "veth", "virbr", "vboxnet", "vmnet", "cni", "flannel", "cali", "lxc", "lxd", "podman")
_VPN = ("tun", "tap", "wg", "tailscale", "zt", "utun", "ppp", "ipsec", "nordlynx", "proton")


def interface_kind(name: str) -> str:
    """What an interface name suggests: loopback, container/VM bridge, VPN, or LAN."""
    low = name.lower()
    if low == "lo" or low.startswith("lo0") or low.startswith("loopback"):
        return "loopback"
    if low.startswith(_VIRTUAL):
        return "container/VM bridge (peers behind it are not on your LAN)"
    if low.startswith(_VPN):
        return "VPN/tunnel (usually no multicast: use --peer seeds)"
    return "LAN"


def incompatibility(ann: Any, my_fingerprint: str | None) -> str | None:
    """Why a node announced over mDNS can never be a peer of this node (None: nothing in its announcement says so)."""
    if ann.version != VERSION:
        return f"speaks protocol v{ann.version}, this node v{VERSION}: run the same lanmesh version on both"
    if my_fingerprint is not None and ann.fingerprint != my_fingerprint:
        return f"announces another mesh key (fingerprint {ann.fingerprint or 'none'}): it belongs to another mesh"
    return None


def explain_unreachable(probe: str, state: str | None) -> str:
    """Why a compatible node announced over mDNS is not a live peer: the TCP probe's verdict, or what the node saw."""
    if probe != "open":
        return probe
    if state:
        return f"reachable on TCP; this node sees it as {state}"
    return "reachable on TCP but this node has not heard from it yet (its gossip port may be blocked)"


class Report:
    """Sections of plain text, written as they are found."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def section(self, title: str) -> None:
        self.out.write(f"\n== {title}\n")
        self.out.flush()

    def line(self, text: str) -> None:
        self.out.write(f"  {text}\n")
        self.out.flush()


def doctor_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`lanmesh doctor`: what this machine and node see, and why a peer is missing. Bounded in time."""
    report = Report(out or sys.stdout)
    _interfaces(report)
    rows = _node_view(report, args.node, getattr(args, "key_file", None))
    if args.mdns:
        _mdns_view(report, rows, args.mdns_timeout, args.interface)
    else:
        report.section("mDNS")
        report.line("skipped (--no-mdns)")
    return 0 if rows else 1


def _interfaces(report: Report) -> None:
    from ..runtime.config import default_ipv4

    report.section("Interfaces on this machine")
    chosen = default_ipv4()
    stats = psutil.net_if_stats()
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        ipv4 = [a.address for a in addrs if a.family == socket.AF_INET]
        st = stats.get(name)
        up = "up" if st is not None and st.isup else "down"
        flags = getattr(st, "flags", "") or ""
        multicast = "" if not flags else (", multicast" if "multicast" in flags else ", NO multicast")
        mark = "  <- lanmesh advertises this one by default" if chosen in ipv4 else ""
        report.line(f"{name:<12} {', '.join(ipv4) or '(no IPv4)':<18} {up}{multicast}  {interface_kind(name)}{mark}")
    if chosen == "127.0.0.1":
        report.line("no LAN interface is up: other machines cannot reach this one")


def _node_view(report: Report, node: str, key_file: str | None) -> list[dict[str, Any]]:
    report.section(f"Node at {node}")
    try:
        with open_client(node, 3.0, key_file) as client:
            rtt = client.ping(timeout=2.0)
            rows = client.status(timeout=2.0)
    except (LanmeshError, ValueError) as exc:
        report.line(f"not reachable: {exc}")
        report.line("is `lanmesh node` running there? (--node HOST:PORT picks another node)")
        return []
    me, peers = rows[0], rows[1:]
    models = ", ".join(sorted(me.get("models") or {})) or "none"
    report.line(f"{me.get('node')} answers in {rtt * 1000:.1f} ms; serves {models}; advertises {me.get('address')}")
    if str(me.get("address", "")).startswith("127."):
        report.line("it advertises a loopback address: peers on other machines cannot reach it (set --interface)")
    by_source: dict[str, list[str]] = {}
    for p in peers:
        by_source.setdefault(str(p.get("source", "?")), []).append(f"{p.get('node')} ({p.get('state')})")
    report.section("Peers this node knows")
    if not peers:
        report.line("none")
    names = {
        "mdns": "found by mDNS",
        "seed": "from --peer seeds",
        "gossip": "learned from gossip",
        "hello": "contacted this node (it has this node as a --peer seed)",
    }
    for source, nodes in sorted(by_source.items()):
        report.line(f"{names.get(source, source)}: {', '.join(sorted(nodes))}")
    for p in peers:
        if p.get("state") in ("suspect", "dead"):
            heard = float(p.get("last_heard_s", 0.0))
            report.line(f"{p.get('node')} at {p.get('address')} is {p.get('state')}: silent for {heard:.1f}s")
    stats = me.get("stats") or {}
    foreign = stats.get("foreign_gossip", 0) + stats.get("foreign_announcements", 0)
    if foreign:
        report.line(f"{foreign} messages from nodes with another mesh key were ignored")
    if stats.get("seed_unreachable"):
        report.line(f"a --peer seed did not answer ({stats['seed_unreachable']} tries): check its address and port")
    return rows


def _mdns_view(report: Report, rows: list[dict[str, Any]], timeout: float, interface: str | None) -> None:
    from mesh import discovery

    report.section(f"mDNS (listening {timeout:g}s)")
    try:
        found = discovery.browse(timeout, [interface] if interface else None)
    except (OSError, ValueError, RuntimeError) as exc:
        report.line(f"cannot browse mDNS: {type(exc).__name__}: {exc}")
        return
    me = str(rows[0].get("node")) if rows else None
    mine = next((a for a in found if a.addr.node == me), None)
    if not found:
        report.line("no lanmesh node announced itself: multicast may be blocked here (Wi-Fi client isolation, a VPN,")
        report.line("a container network), or the nodes run with --no-mdns. Use --peer HOST:PORT seeds instead.")
        return
    report.line(f"multicast works: {len(found)} node(s) announced themselves")
    if rows and mine is None:
        report.line(f"{me} itself is not announced (started with --no-mdns, or on another interface)")
    known = {str(r.get("node")): str(r.get("state")) for r in rows[1:]}
    others = [a for a in found if a.addr.node != me]
    with ThreadPoolExecutor(max_workers=16) as pool:
        probes = list(pool.map(lambda a: tcp_probe(a.addr.host, a.addr.port), others))
    fingerprint = mine.fingerprint if mine is not None else None
    for ann, probe in zip(others, probes, strict=True):
        where = f"{ann.addr.node} at {ann.addr.host}:{ann.addr.port}"
        state = known.get(ann.addr.node)
        problem = incompatibility(ann, fingerprint)
        if problem is not None:
            report.line(f"{where}: NOT usable: {problem}")
        elif state in ("alive", "leaving"):
            report.line(f"{where}: {state} peer")
        else:
            report.line(f"{where}: NOT a live peer: {explain_unreachable(probe, state)}")
