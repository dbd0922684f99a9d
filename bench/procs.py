"""Node processes for tests and benchmarks: start `lanmesh node`, wait until it answers, fault it, stop it by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from mesh import MeshSecurity, Plaintext, client_security, connect_dealer, load_key
from protocol import Ping, Pong, decode, encode

ROOT = Path(__file__).resolve().parent.parent


def compile_sources() -> None:
    """Write the bytecode of the project's own modules (an installed wheel has it; an editable install gets it on
    first import unless PYTHONDONTWRITEBYTECODE is set, and then every node a bench starts compiles them all again,
    about a tenth of a second of CPU each). Idempotent: unchanged files are skipped."""
    import compileall

    for package in ("protocol", "mesh", "nodes", "bench"):
        compileall.compile_dir(ROOT / package, quiet=2)


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port P such that P and P+1 are free right now (ROUTER and gossip PUB)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind((host, 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind((host, port + 1))
                except OSError:
                    continue
            return int(port)
    raise RuntimeError("no free port pair found")


def ping(
    address: str, timeout: float = 1.0, want_status: bool = False, security: MeshSecurity | Plaintext | None = None
) -> Pong | None:
    """One Ping over a fresh DEALER; the Pong, or None when nothing answered in time.

    `security` None: the key this machine is set up with ($LANMESH_KEY_FILE, the default file), else plaintext.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        connect_dealer(sock, f"tcp://{address}", security or client_security())
        sock.send(encode(Ping(uuid.uuid4().hex, "probe", want_status)))
        if sock.poll(int(timeout * 1000)):
            msg = decode(sock.recv())
            return msg if isinstance(msg, Pong) else None
        return None
    finally:
        sock.close(0)


class NodeProc:
    """One `lanmesh node` process. `argv` are extra flags (models, seeds, ...).

    `key_file` runs it with that mesh key, `insecure` as an open mesh; neither: the node finds its key itself
    ($LANMESH_KEY_FILE, then the default path) and refuses to start without one.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str] = (),
        host: str = "127.0.0.1",
        port: int | None = None,
        spawn: Callable[[list[str], dict[str, str]], subprocess.Popen[bytes]] | None = None,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        cpus: str = "",
    ) -> None:
        self.name = name
        self.cpus = cpus  # e.g. "0": run pinned to these cores (taskset), as if on a machine with only them
        self.host = host
        self.port = port or free_port_pair(host)
        self.argv = list(argv)
        self._spawn = spawn
        self.log_path = (log_dir or Path("/tmp")) / f"lanmesh-{name}-{os.getpid()}-{self.port}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.key_file = key_file
        self.insecure = insecure
        # How this harness talks to the node (pings, status); None: as any client on this machine would.
        self.security: MeshSecurity | Plaintext | None = (
            Plaintext() if insecure else load_key(key_file) if key_file is not None else None
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        pin = ["taskset", "-c", self.cpus] if self.cpus else []
        return [
            *pin, sys.executable, "-m", "nodes.cli", "node", "--name", self.name, "--port", str(self.port),
            "--advertise", self.host, *self._security_flags(), *self.argv,
        ]  # fmt: skip

    def _security_flags(self) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        return ["--key-file", str(self.key_file)] if self.key_file is not None else []

    def start(self, wait: float = 30.0) -> NodeProc:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.update(self.env)
        cmd = self.command()
        if self._spawn is not None:
            self.proc = self._spawn(cmd, env)
        else:
            log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            log.close()
        if wait:
            self.wait_ready(wait)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if ping(self.address, 0.3, security=self.security) is not None:
                return
        raise TimeoutError(f"node {self.name} did not answer within {timeout}s:\n{self.log_tail()}")

    def status(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        pong = ping(self.address, timeout, want_status=True, security=self.security)
        if pong is None or pong.status is None:
            raise TimeoutError(f"node {self.name} did not answer a status ping")
        return pong.status

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """kill -9: no goodbye, no drain."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: a hung node whose TCP connections stay open."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (graceful leave); kill -9 if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.alive():
            self.resume()
            self.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


class Cluster:
    """Several node processes; stops every one of them (by PID) on exit. `key_file`/`insecure`: see NodeProc."""

    def __init__(
        self, log_dir: Path | None = None, key_file: str | os.PathLike[str] | None = None, insecure: bool = False
    ) -> None:
        self.nodes: list[NodeProc] = []
        self.log_dir = log_dir
        self.key_file = key_file
        self.insecure = insecure

    def add(self, name: str, argv: Sequence[str] = (), wait: float = 30.0, **kw: Any) -> NodeProc:
        kw.setdefault("key_file", self.key_file)
        kw.setdefault("insecure", self.insecure)
        node = NodeProc(name, argv, log_dir=self.log_dir, **kw)
        self.nodes.append(node)
        node.start(wait)
        return node

    def wait_converged(self, timeout: float = 10.0, nodes: Sequence[NodeProc] | None = None) -> float:
        """Wait until every node sees every other as alive with its models; returns seconds taken."""
        group = list(nodes or [n for n in self.nodes if n.alive()])
        names = {n.name for n in group}
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if all(_sees(n, names - {n.name}) for n in group):
                return time.monotonic() - t0
            time.sleep(0.05)
        views = {n.name: [(r["node"], r["state"]) for r in _safe_status(n)] for n in group}
        raise TimeoutError(f"mesh did not converge in {timeout}s: {views}")

    def stop_all(self) -> None:
        for n in self.nodes:
            n.resume()
        for n in self.nodes:
            n.stop(timeout=15.0)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _safe_status(n: NodeProc) -> list[dict[str, Any]]:
    try:
        return n.status(0.5)
    except TimeoutError:
        return []


def _sees(n: NodeProc, others: set[str]) -> bool:
    rows = _safe_status(n)
    alive = {r["node"] for r in rows if r["state"] == "alive" and r.get("models")}
    return others <= alive
