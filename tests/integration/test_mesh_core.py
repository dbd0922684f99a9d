"""The mesh core under what broke it before: long forwarded work, cancels, a loop a message could kill, a member
that takes another's name, signals during start-up. Node processes on loopback, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from bench.procs import ROOT, Cluster, NodeProc, free_port_pair, ping
from mesh import Authenticator, Client, MeshKey, Plaintext
from protocol import Cancel, Hello, LoadReport, ModelLoad, PeerAddr, Request, Task, decode, encode
from tests.conftest import LOOPBACK


def _eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll `check` until it holds; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.01)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def _model_load(node: NodeProc, model: str) -> list[int]:
    """[inflight, queued, capacity] of `model` on `node`, as it reports itself."""
    return list(node.status()[0]["models"][model][:3])


def _dealer(address: str, security: Any) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.configure_client(sock)
    sock.connect(f"tcp://{address}")
    return sock


@pytest.mark.timeout(180)
def test_a_forwarded_request_of_40_seconds_is_served_once_with_default_settings(cluster: Cluster) -> None:
    entry = cluster.add("entry", [*LOOPBACK, "--model", "echo"])
    worker = cluster.add("worker", [*LOOPBACK, "--model", "sleep:40000", "--peer", entry.address])
    cluster.wait_converged(timeout=15)
    with Client(entry.address, timeout=120) as client:
        result = client.request("sleep:40000", "complete", "a long answer")
    assert result.node == "worker" and result.output == "a long answer" and result.tries == 1
    assert worker.status()[0]["executor"]["sleep:40000"]["batched_requests"] == 1, "the work ran more than once"
    assert entry.status()[0]["stats"].get("retries", 0) == 0


@pytest.mark.parametrize("sent_on", ["its connection", "a new connection"])
@pytest.mark.parametrize("where", ["on a peer", "on the entry itself"])
def test_a_cancel_frees_the_serving_node_within_half_a_second(
    cluster: Cluster, keyed: Path, where: str, sent_on: str
) -> None:
    """`a new connection`: a client whose connection dropped sends its Cancels again once it has reconnected."""
    entry_models = ["--model", "echo"] if where == "on a peer" else ["--model", "sleep:20000:cap=2"]
    entry = cluster.add("entry", [*LOOPBACK, *entry_models])
    server = entry
    if where == "on a peer":
        server = cluster.add("worker", [*LOOPBACK, "--model", "sleep:20000:cap=2", "--peer", entry.address])
        cluster.wait_converged(timeout=15)
    sock = _dealer(entry.address, MeshKey.load(keyed))
    try:
        rid = f"cancel-{uuid.uuid4().hex[:8]}"
        sock.send(encode(Request(rid, "sleep:20000", Task.COMPLETE, "stop me", deadline_ms=60_000)))
        _eventually(lambda: _model_load(server, "sleep:20000")[0] == 1, what="the request to start")
        if sent_on == "a new connection":
            sock.close(0)
            sock = _dealer(entry.address, MeshKey.load(keyed))
        sock.send(encode(Cancel(rid, "the caller went away")))
        took = _eventually(lambda: _model_load(server, "sleep:20000")[0] == 0, timeout=5, what="the slot to free")
        assert took < 0.5, f"the serving node still ran the cancelled request {took:.2f}s later"
        assert not sock.poll(300), "nobody answers a cancelled request"
    finally:
        sock.close(0)
    stats = entry.status()[0]["stats"]
    assert stats["cancels_in"] == 1
    if where == "on a peer":
        assert stats["cancels_sent"] == 1  # the entry passed the cancel on to the node doing the work


def test_a_cancel_made_while_the_node_hung_stops_its_work_once_it_wakes(cluster: Cluster, keyed: Path) -> None:
    """The caller gives up while the node is frozen (SIGSTOP): its connection drops, the client keeps the Cancel and
    sends it when it has reconnected, and the woken node stops the work instead of running it out."""
    node = cluster.add("frozen", [*LOOPBACK, "--model", "sleep:30000:cap=1"])
    with Client(node.address, timeout=60, security=MeshKey.load(keyed)) as client:
        future = client.submit("sleep:30000", "complete", "stop me later")
        _eventually(lambda: _model_load(node, "sleep:30000")[0] == 1, what="the request to start")
        node.pause()
        try:
            _eventually(lambda: not client.connected, timeout=10, what="the client to see the hung node drop")
            assert future.cancel()
        finally:
            node.resume()
        _eventually(lambda: bool(client.connected), timeout=10, what="the client to reconnect")
        took = _eventually(lambda: _model_load(node, "sleep:30000")[0] == 0, timeout=10, what="the slot to free")
    assert took < 10
    assert node.status()[0]["stats"]["cancels_in"] >= 1


class FakePeer:
    """A stand-in peer: a ROUTER and a PUB; answers the first Hello as itself at its real port, and a Hello on any
    later connection (the DEALER the node opened to it) with a Hello that says it moved to another port."""

    def __init__(self, name: str = "fake") -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.port = free_port_pair()
        self.router.bind(f"tcp://127.0.0.1:{self.port}")
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"tcp://127.0.0.1:{self.port + 1}")
        self.name = name
        self.idents: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        moved = PeerAddr(self.name, "127.0.0.1", self.port + 10, self.port + 11)
        real = PeerAddr(self.name, "127.0.0.1", self.port, self.port + 1)
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            ident, frame = self.router.recv_multipart()
            msg = decode(frame)
            if isinstance(msg, Hello):
                if ident not in self.idents:
                    self.idents.append(ident)
                addr = real if len(self.idents) == 1 else moved
                self.router.send_multipart([ident, encode(Hello(addr, 1))])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.ctx.destroy(0)


@pytest.fixture
def fake_peer() -> Iterator[FakePeer]:
    peer = FakePeer()
    yield peer
    peer.close()


def test_a_hello_that_re_addresses_a_peer_on_its_own_connection_cannot_kill_the_loop(
    tmp_path: Path, fake_peer: FakePeer
) -> None:
    with Cluster(log_dir=tmp_path, insecure=True) as cluster:
        node = cluster.add("a", [*LOOPBACK, "--model", "echo", "--peer", f"127.0.0.1:{fake_peer.port}"])
        # The node learns the fake from the seed's answer, opens a DEALER to it, says hello on it, and is told on
        # that very connection that the fake moved: the peer (and the socket being read) is replaced.
        _eventually(lambda: len(fake_peer.idents) >= 2, what="the node to say hello on its peer link")
        _eventually(
            lambda: any(
                r["node"] == "fake" and r["address"].endswith(str(fake_peer.port + 10)) for r in node.status()
            ),  # fmt: skip
            what="the node to follow the move",
        )
        with Client(node.address, timeout=10, security=Plaintext()) as client:
            assert client.request("echo", "complete", "still serving").output == "still serving"
        stats = node.status()[0]["stats"]
        assert stats.get("handler_errors", 0) == 0
        assert "mesh loop crashed" not in node.log_tail(200)


def test_a_member_cannot_take_a_live_nodes_name(cluster: Cluster, keyed: Path) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "echo"])
    b = cluster.add("b", [*LOOPBACK, "--model", "sleep:5", "--peer", a.address])
    cluster.wait_converged(timeout=15)
    key = MeshKey.load(keyed)
    # The impostor holds the mesh key. It joins as "imp" (so `a` subscribes to its gossip), then publishes reports
    # that say it is "b", with a huge incarnation, from its own address.
    ctx = zmq.Context()
    auth = Authenticator(ctx, key, lambda _kind, _source: None)  # a member answers CURVE handshakes like a node
    auth.start()
    port = free_port_pair()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
        key.configure_server(sock)
    router.bind(f"tcp://127.0.0.1:{port}")
    pub.bind(f"tcp://127.0.0.1:{port + 1}")
    hello = _dealer(a.address, key)
    try:
        hello.send(encode(Hello(PeerAddr("imp", "127.0.0.1", port, port + 1), 1, key.fingerprint)))
        forged = PeerAddr("b", "127.0.0.1", port, port + 1)
        deadline = time.monotonic() + 10
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            report = LoadReport("b", 2**62, seq, forged, {"sleep:5": ModelLoad(0, 0, 64)}, {}, (), False,
                                key.fingerprint)  # fmt: skip
            pub.send(encode(report))
            time.sleep(0.05)  # an impostor's pace: 20 reports a second, for a few seconds
            sec = a.status()[0]["security"]
            if sec.get("identity_conflict", 0) + sec.get("identity_mismatch", 0) >= 3:
                break
        rows = {r["node"]: r for r in a.status()}
        assert rows["b"]["address"] == b.address, "a live node was re-pointed to the impostor"
        assert rows["b"]["state"] == "alive"
        # Its reports arrive on the SUB a made for imp: gossip naming another node there is refused as a mismatch.
        sec = a.status()[0]["security"]
        assert sec["identity_conflict"] + sec["identity_mismatch"] >= 1, a.status()[0]["stats"]
        assert "identity mismatch" in a.log_tail(200) or "identity conflict" in a.log_tail(200)
        with Client(a.address, timeout=10) as client:
            assert client.request("sleep:5", "complete", "x").node == "b"
    finally:
        hello.close(0)
        router.close(0)
        pub.close(0)
        auth.stop()
        ctx.destroy(0)


def _spawn_node(tmp_path: Path, name: str, argv: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LANMESH_INSECURE": "1"}
    env.pop("LANMESH_KEY_FILE", None)
    port = free_port_pair()
    cmd = [sys.executable, "-m", "nodes.cli", "node", "--name", name, "--port", str(port), "--insecure", *argv]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return proc, log


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 3.0])
def test_sigterm_at_any_moment_of_start_up_leaves_gracefully_with_status_0(tmp_path: Path, delay: float) -> None:
    proc, log = _spawn_node(tmp_path, f"early-{delay}", [*LOOPBACK, "--model", "echo"])
    try:
        time.sleep(delay)  # the moment under test: some point of start-up (imports, config, binding, serving)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text
    if "node up" in text:  # it had joined: it left as a member does
        assert "left the mesh" in text


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (Linux: the caught-signals mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)


def test_the_first_code_lanmesh_node_runs_takes_sigterm_before_any_import() -> None:
    """The package `nodes.cli` is imported before `main.py` and its imports (config, protocol, psutil: ~0.1 s): a
    SIGTERM meanwhile killed the node by the signal. Its import now installs the handler, for `lanmesh node` only."""
    probe = (
        "import signal, sys; sys.argv[1:] = sys.argv[1:2]; import nodes.cli; "
        "print(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, 'protocol' in sys.modules, "
        "'nodes.runtime' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for argv, expected in ((["node"], "True False False"), (["status"], "False False False")):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
        assert done.stdout.strip() == expected, (argv, done.stdout, done.stderr)


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2])
def test_sigterm_from_the_moment_a_node_can_take_it_leaves_with_status_0(tmp_path: Path, delay: float) -> None:
    """Right after spawn the interpreter itself starts (~35 ms here), before any line of lanmesh runs: no program
    can catch a signal then, and nothing has been opened. From the first line on, every SIGTERM leaves cleanly."""
    proc, log = _spawn_node(tmp_path, f"first-{delay}", [*LOOPBACK, "--model", "echo"])
    try:
        t0 = time.monotonic()
        while not _catches(proc.pid, signal.SIGTERM):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() - t0 < 20, "the node never installed a SIGTERM handler"
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Traceback" not in text, text
    if "node up" in text:
        assert "left the mesh" in text


def test_a_mesh_loop_stuck_in_a_handler_is_caught_by_the_watchdog() -> None:
    """A loop that stops turning (here: the executor's load view blocks) makes the node leave and exit; the exit
    itself is replaced by a recorder so this test's process lives on."""
    from mesh import MeshNode, MeshSettings
    from nodes.models.backends.synthetic import EchoBackend
    from nodes.runtime.executor import Executor

    stuck, release, fired = threading.Event(), threading.Event(), threading.Event()
    reasons: list[str] = []

    class Blocking(Executor):
        def models(self) -> dict[str, ModelLoad]:
            if stuck.is_set():
                release.wait(30)
            return super().models()

    executor = Blocking([EchoBackend()])
    executor.start()
    settings = MeshSettings("stuck", bind="127.0.0.1", port=0, mdns=False, stall_timeout=0.5)
    node = MeshNode(executor, settings, on_stall=lambda reason: (reasons.append(reason), fired.set()))
    node.start()
    try:
        stuck.set()
        assert fired.wait(10), "a stuck loop went unnoticed"
        assert "has not turned" in reasons[0]
    finally:
        release.set()
        node.stop()
        executor.stop(1.0)


def test_a_mesh_loop_that_raises_makes_the_node_leave_and_exit_like_a_stalled_one() -> None:
    """An exception that escapes the loop itself (not a handler: those are survived) ends the loop thread. That is no
    intended stop: the watchdog must say the mDNS goodbye and exit, or a zombie stays up outside its supervisor."""
    from mesh import MeshNode, MeshSettings
    from nodes.models.backends.synthetic import EchoBackend
    from nodes.runtime.executor import Executor

    broken, fired = threading.Event(), threading.Event()
    events: list[str] = []

    class Announcement:  # stands in for the node's mDNS registration: what its goodbye does
        def stop(self) -> None:
            events.append("mdns goodbye")

    executor = Executor([EchoBackend()])
    executor.start()
    settings = MeshSettings("crashy", bind="127.0.0.1", port=0, mdns=False, stall_timeout=5.0)
    node = MeshNode(executor, settings, on_stall=lambda reason: (events.append(reason), fired.set()))
    node.start()
    node._discovery = Announcement()
    close_later = node.links.close_later

    def raising() -> None:
        if broken.is_set():
            raise RuntimeError("a bug outside any handler")
        close_later()

    node.links.close_later = raising  # type: ignore[method-assign]
    try:
        with Client(f"127.0.0.1:{node.addr.port}", security=Plaintext(), timeout=5) as client:
            assert client.request("echo", "complete", "before").output == "before"
        broken.set()
        node.post("wake", None)  # any event makes the loop turn into the bug
        assert fired.wait(10), "a loop that died was taken for an intended stop: the node stays up as a zombie"
        assert events[0] == "mdns goodbye" and "died" in events[1], events
    finally:
        node.stop()
        executor.stop(1.0)


@pytest.mark.timeout(180)
def test_echo_streams_of_long_prompts_never_stall_the_mesh_loop(cluster: Cluster) -> None:
    """48 streamed echo requests of 262,000 characters each: before, echo ran on the mesh loop and streamed a chunk
    per word (2.5 million chunks in one turn), so the loop stopped turning until the watchdog killed the node."""
    node = cluster.add("echoes", [*LOOPBACK, "--model", "echo"])
    prompt = ("word " * 52_400)[:262_000]
    waits: list[float] = []
    unanswered = 0
    done = threading.Event()

    def probe() -> None:  # what peers and supervisors see meanwhile: does the node answer at once?
        nonlocal unanswered
        while not done.is_set():
            t0 = time.monotonic()
            if ping(node.address, timeout=5.0) is None:
                unanswered += 1
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)

    texts: list[str] = []
    errors: list[BaseException] = []

    def one(client: Client) -> None:
        try:
            texts.append("".join(client.complete("echo", prompt, stream=True)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with Client(node.address, timeout=60) as client:
            streams = [threading.Thread(target=one, args=(client,)) for _ in range(48)]
            for t in streams:
                t.start()
            for t in streams:
                t.join(120)
    finally:
        done.set()
        prober.join(10)
    assert node.alive(), f"the node died:\n{node.log_tail()}"
    assert not errors, errors[:3]
    assert len(texts) == 48 and all(t == prompt for t in texts), "a stream lost or changed text"
    assert unanswered == 0 and max(waits) < 1.0, f"pings waited up to {max(waits):.2f}s ({unanswered} unanswered)"
    assert "has not turned" not in node.log_tail(100)
