"""Where a scenario's nodes run: one network namespace per host on a private bridge (root), else loopback processes.

Host 0 is the client's machine: the load generator and every probe run there, so the harness itself never
sends a packet; nodes run on hosts 1..N. Without root the nodes bind 127.0.0.1 (no mDNS, static seeds).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import zmq

from mesh import INSECURE_ENV, KEY_ENV, Authority, KnownNode, MemberIdentity, MeshKey, Role, load_key

from .hosts import Lan, netns_unavailable_reason, sweep_stale
from .procs import ROOT, NodeProc, compile_sources
from .report import progress

MODES = ("auto", "netns", "loopback")
NETNS_PORT = 7000
LOOPBACK = ["--bind", "127.0.0.1", "--no-mdns"]
# Benchmarks talk ZeroMQ: no HTTP gateway (on loopback several nodes would fight over its port).
NODE_ENV = {"LANMESH_HTTP_PORT": "0", "HF_HUB_OFFLINE": "1"}


def choose_mode(requested: str) -> tuple[str, str | None]:
    """('netns' | 'loopback', why not netns). `auto` takes netns whenever this machine can build one."""
    if requested not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "loopback":
        return "loopback", "loopback asked for (--mode loopback)"
    reason = netns_unavailable_reason()
    if requested == "netns" and reason is not None:
        raise RuntimeError(f"--mode netns: {reason}")
    return ("netns", None) if reason is None else ("loopback", reason)


class Testbed:
    """`with Testbed(n, mode) as bed:` room for n nodes on hosts 1..n; tools run on host 0.

    Everything started here is stopped by PID on exit (also on Ctrl-C and errors) and the Lan torn down.
    """

    def __init__(self, n_nodes: int, mode: str = "auto", log_dir: Path | None = None, identities: bool = False) -> None:
        self.mode, self.why_not_netns = choose_mode(mode)
        compile_sources()  # nodes start as from an installed package, not compiling the project at each start
        self.n_nodes = n_nodes
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lanmesh-bench-"))
        self.nodes: dict[str, NodeProc] = {}
        self._argv: dict[str, list[str]] = {}
        self._index: dict[str, int] = {}
        self._starts: dict[str, int] = {}  # incarnations per node, so each start logs to a file of its own
        self._cpus: dict[str, str] = {}
        self._tools: list[subprocess.Popen[Any]] = []
        self.lan: Lan | None = None
        self.env = dict(NODE_ENV)  # for nodes and tools alike
        self.security = _mesh_key(self.log_dir, self.env)
        # Member identities: every node and the tools' user its own key from one authority (`lanmesh init` and
        # `lanmesh join` would leave the same files), instead of the one mesh key.
        self.authority = Authority.create(self.log_dir / "authority") if identities else None
        if identities:
            self.security = "CURVE, member identities (an authority, a key per node and one for the client)"
        if self.mode == "netns":
            sweep_stale()
            self.lan = Lan(n_nodes + 1)

    # ------------------------------------------------------------ nodes

    def describe(self) -> dict[str, Any]:
        """What the result JSON records about where the nodes ran."""
        if self.lan is not None:
            return {
                "security": self.security,
                "mode": "netns",
                "detail": f"{self.n_nodes} node hosts + 1 client host, one network namespace each, on a bridge",
                "netem": self.lan.netem,
            }
        return {
            "security": self.security,
            "mode": "loopback",
            "detail": "node processes on 127.0.0.1 (no mDNS, static seeds); the load generator a local process",
            "why_not_netns": self.why_not_netns,
        }

    def start_node(self, index: int, argv: Sequence[str], name: str | None = None, cpus: str = "") -> NodeProc:
        """Start a node on host `index` (1..n) without waiting; `converge()` waits for all of them. `cpus` pins it
        to those cores (taskset), as if its machine had only them."""
        if not 1 <= index <= self.n_nodes:
            raise ValueError(f"node hosts are 1..{self.n_nodes}, got {index}")
        name = name or f"n{index}"
        self._argv[name] = list(argv)
        self._index[name] = index
        self._cpus[name] = cpus
        node = self._make(name, index, port=None)
        node.start(wait=0)
        self.nodes[name] = node
        return node

    def restart(self, name: str) -> NodeProc:
        """Start a node again (same host, port and flags) after it was killed or stopped."""
        old = self.nodes[name]
        if old.alive():
            raise RuntimeError(f"node {name} is still running")
        node = self._make(name, self._index[name], port=old.port)
        node.start(wait=0)
        self.nodes[name] = node
        return node

    def _make(self, name: str, index: int, port: int | None) -> NodeProc:
        argv = list(self._argv[name])
        self._starts[name] = self._starts.get(name, 0) + 1
        log_path = self.log_dir / (f"{name}.log" if self._starts[name] == 1 else f"{name}-{self._starts[name]}.log")
        key = self._enrol(name, Role.NODE) if self.authority is not None else None
        if self.lan is None:
            # Static seeds: every other node, so a restarted node finds the mesh again whoever else is down.
            seeds = [x for n, other in self.nodes.items() if n != name for x in (f"--peer={self._seed(n, other)}",)]
            node = NodeProc(name, [*LOOPBACK, *argv, *seeds], port=port, log_dir=self.log_dir, env=self.env,
                            cpus=self._cpus.get(name, ""), key_file=key)  # fmt: skip
        else:
            lan, host = self.lan, self.lan.hosts[index]

            def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
                with open(log_path, "ab") as log:
                    err = subprocess.STDOUT
                    return lan.spawn(host, cmd, env=env, stdout=log, stderr=err, cwd=str(ROOT), text=False)

            node = NodeProc(name, argv, host=host.ip, port=NETNS_PORT, spawn=spawn, env=self.env,
                            cpus=self._cpus.get(name, ""), key_file=key)  # fmt: skip
        node.log_path = log_path
        return node

    def _enrol(self, name: str, role: Role, nodes: list[KnownNode] | None = None) -> Path:
        """A member identity for `name` (a node, or the tools' user), written where its key file goes."""
        assert self.authority is not None
        public, secret = zmq.curve_keypair()
        cert = self.authority.issue(name, zmq.utils.z85.decode(public), role, replace=True)
        path = self.log_dir / "members" / name / "mesh.key"
        MemberIdentity.make(cert.encode(), public, secret, self.authority.key.public, nodes or []).write(
            path, force=True
        )
        return path

    def _seed(self, name: str, node: NodeProc) -> str:
        if self.authority is None:
            return node.address
        key = load_key(self.log_dir / "members" / name / "mesh.key")
        assert isinstance(key, MemberIdentity)
        return f"{key.key_text}@{node.address}"

    def _user(self) -> None:
        """The tools' identity: a client knowing every node started (the load generator, probes, converge)."""
        if self.authority is None:
            return
        known = []
        for name, node in self.nodes.items():
            key = load_key(self.log_dir / "members" / name / "mesh.key")
            assert isinstance(key, MemberIdentity)
            known.append(KnownNode(name, node.address, key.key_text))
        self.env[KEY_ENV] = str(self._enrol("bench-user", Role.CLIENT, known))

    def addresses(self, names: Sequence[str] | None = None) -> list[str]:
        return [self.nodes[n].address for n in (names or list(self.nodes))]

    def converge(self, names: Sequence[str] | None = None, timeout: float = 60.0) -> float:
        """Wait until the given nodes (default all) answer and see each other alive; seconds since all answered."""
        self._user()
        s = self.tool("converge", "--nodes", ",".join(self.addresses(names)), "--timeout", str(timeout),
                      timeout=timeout + 30)  # fmt: skip
        if not s.get("converged"):
            dead = [n for n, p in self.nodes.items() if not p.alive()]
            views = s.get("views")
            raise RuntimeError(f"nodes did not converge in {timeout}s (exited: {dead}): {views}\n{self.logs()}")
        return float(s["seconds"])

    def logs(self, lines: int = 12) -> str:
        return "\n".join(f"--- {n}\n{p.log_tail(lines)}" for n, p in self.nodes.items())

    def spawn_on(self, index: int, argv: list[str], port: int) -> tuple[subprocess.Popen[str], str]:
        """Start `argv` (told to listen on HOST:PORT by `{bind}` in it) on node host `index`; its address."""
        host = "127.0.0.1" if self.lan is None else self.lan.hosts[index].ip
        bind = f"{host}:{port}"
        argv = [a.replace("{bind}", bind) for a in argv]
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if self.lan is not None:
            proc: subprocess.Popen[str] = self.lan.spawn(
                self.lan.hosts[index], argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT)
            )
        else:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
        self._tools.append(proc)
        return proc, bind

    # ------------------------------------------------------------ tools on host 0

    def spawn_client(self, argv: list[str], stdout: int | IO[Any] | None = subprocess.PIPE) -> subprocess.Popen[str]:
        """Start `argv` on the client host (host 0), or as a local process on loopback."""
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if self.lan is not None:
            proc: subprocess.Popen[str] = self.lan.spawn(
                self.lan.hosts[0], argv, env=env, stdout=stdout, stderr=subprocess.PIPE, cwd=str(ROOT)
            )
        else:
            proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT, text=True)
        self._tools.append(proc)
        return proc

    def spawn_tool(self, *args: str, stdout: int | IO[Any] | None = subprocess.PIPE) -> subprocess.Popen[str]:
        """Start `python -m bench.loadgen ARGS` on the client host; stdout is its JSON-lines event stream."""
        return self.spawn_client([sys.executable, "-m", "bench.loadgen", *args], stdout=stdout)

    def run_client(self, argv: list[str], timeout: float = 120.0) -> dict[str, Any]:
        """Run `argv` (a tool printing JSON-lines events) on the client host to completion; its `summary` event."""
        proc = self.spawn_client(argv)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop_tool(proc)
            raise RuntimeError(f"`{' '.join(argv)}` ran past {timeout}s") from None
        return summary_of(out, err, argv)

    def tool(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a loadgen command on the client host to completion; its `summary` event."""
        proc = self.spawn_tool(*args)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop_tool(proc)
            raise RuntimeError(f"`loadgen {' '.join(args)}` ran past {timeout}s") from None
        return summary_of(out, err, args)

    def run_load(
        self,
        model: str,
        in_flight: int,
        duration: float,
        entry: Sequence[str] | None = None,
        timeout: float = 60.0,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        label: str = "load",
        task: str = "complete",
        rate: float | None = None,
    ) -> tuple[dict[str, Any], list[list[Any]]]:
        """A closed-loop load from the client host for `duration` s, entering at `entry` (default every node);
        with `rate`, an open loop instead: Poisson arrivals at `rate` per second (`in_flight` is then unused).

        `on_event` sees every event as it arrives (ticks each second), e.g. to inject a fault at a given time.
        Returns the load generator's summary and its samples: [start, end, ok, node] in seconds from its `t0`.
        """
        samples_path = self.log_dir / f"samples-{time.monotonic_ns()}.json"
        nodes = ",".join(self.addresses(entry))
        if rate is None:
            args = ["load", "--nodes", nodes, "--model", model, "--in-flight", str(in_flight)]
        else:
            args = ["trace", "--nodes", nodes, "--model", model, "--rate", str(rate)]
        args += ["--duration", str(duration), "--timeout", str(timeout), "--samples", str(samples_path), "--task", task]
        proc = self.spawn_tool(*args)
        summary: dict[str, Any] | None = None
        for event in read_events(proc):
            if event["event"] == "tick":
                elapsed = min(duration, event["second"] + 1)
                tally = f"{event['total_ok']} ok, {event['total_failed']} failed"
                progress(int(elapsed), int(duration), f"{label}: {tally}")
            elif event["event"] == "summary":
                summary = event
            if on_event is not None:
                on_event(event)
        err = proc.stderr.read() if proc.stderr is not None else ""
        proc.wait(30)
        if summary is None:
            raise RuntimeError(f"the load generator died:\n{err[-3000:]}\n{self.logs()}")
        progress(int(duration), int(duration), f"{label}: {summary['ok']} ok, {summary['failed']} failed")
        rows = json.loads(samples_path.read_text())["rows"]
        samples_path.unlink()
        return summary, rows

    def _stop_tool(self, proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop every node (SIGCONT, SIGTERM, then kill -9 after a grace) and tool, then tear the Lan down."""
        for proc in self._tools:
            self._stop_tool(proc)
        live = [n for n in self.nodes.values() if n.alive()]
        for n in live:
            n.resume()
            n.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for n in live:
            assert n.proc is not None
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
        if self.lan is not None:
            self.lan.teardown()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _mesh_key(folder: Path, env: dict[str, str]) -> str:
    """A fresh mesh key for this run's nodes and tools (CURVE on, as a user runs it); what the result records."""
    path = MeshKey.generate().write(folder / "mesh.key", force=True)
    env[KEY_ENV] = str(path)
    env["LANMESH_BENCH_RAW_KEY"] = str(path)  # bench.rawzmq's pair keeps it when the nodes use member identities
    env[INSECURE_ENV] = ""  # an inherited LANMESH_INSECURE=1 (the test suite's default) would turn CURVE off
    return "CURVE (a mesh key made for the run)"


def summary_of(stdout: str, stderr: str, args: Sequence[str] = ()) -> dict[str, Any]:
    """The last `summary` event in a loadgen's output; raises with its stderr when there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "summary":
                return dict(event)
    raise RuntimeError(f"`loadgen {' '.join(args)}` gave no summary:\n{stdout[-1500:]}\n{stderr[-3000:]}")


def read_events(proc: subprocess.Popen[str]) -> Any:
    """Yield a running loadgen's events (dicts) as they are printed."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)
