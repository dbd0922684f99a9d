"""A hostile machine on the LAN, and an eavesdropper on the switch (network namespaces; root only).

Hosts 1-3 run a keyed mesh with mDNS, host 0 is the user's machine. Host 4 is the rogue: a real lanmesh node
with another key, plus `python test_rogue.py rogue ...` (this file run as a script), which announces an
impostor over mDNS with *our* fingerprint (it is public, in TXT) and then tries every way in: plaintext,
its own key, and our public key with its own secret (so that ZAP, not the crypto, must refuse it).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script inside a host's namespace

import zmq  # noqa: E402

from bench.hosts import Lan  # noqa: E402
from mesh import INSECURE_ENV, KEY_ENV, MeshKey  # noqa: E402
from protocol import Hello, LoadReport, ModelLoad, PeerAddr, Ping, Reply, Request, Task, decode, encode  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

PORT = 7000
MODEL = "sleep:50:cap=4"
IMPOSTOR = "h9"  # the node the rogue announces with our fingerprint
IMPOSTOR_PORT = 7100


# ----------------------------------------------------------------- the rogue (runs inside host 4)


def rogue_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="test_rogue.py rogue")
    p.add_argument("--ip", required=True, help="this host's address")
    p.add_argument("--targets", required=True, help="comma-separated host:port of the mesh's nodes")
    p.add_argument("--mesh-public", required=True, help="the mesh's public key (Z85): the rogue learned it")
    p.add_argument("--fingerprint", required=True, help="the mesh's fingerprint, as mDNS shows it")
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    from mesh import Discovery

    ctx = zmq.Context()
    own = MeshKey.generate()  # the rogue's own keypair: not the mesh's
    received = {"replies": 0, "gossip": 0, "impostor_in": 0}
    sent = {"sent": 0, "refused_by_socket": 0}

    def curve_server(sock: zmq.Socket[bytes]) -> None:
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = own.public, own.secret

    # The impostor: a ROUTER and PUB for "h9", announced by mDNS with the mesh's own fingerprint.
    router = ctx.socket(zmq.ROUTER)
    curve_server(router)
    router.bind(f"tcp://{args.ip}:{IMPOSTOR_PORT}")
    pub = ctx.socket(zmq.PUB)
    curve_server(pub)
    pub.bind(f"tcp://{args.ip}:{IMPOSTOR_PORT + 1}")
    me = PeerAddr(IMPOSTOR, args.ip, IMPOSTOR_PORT, IMPOSTOR_PORT + 1)
    announce = Discovery(
        me, fingerprint=args.fingerprint, interfaces=[args.ip], on_found=lambda a: None, on_lost=lambda n: None
    )
    announce.start()

    # Every way in: no key, its own key, and the mesh's public key with its own secret.
    def attacker(kind: str, socket_type: int, endpoint: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(socket_type)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == "own-key":
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = own.public, own.public, own.secret
        elif kind == "knows-public":
            sock.curve_serverkey = args.mesh_public.encode()
            sock.curve_publickey, sock.curve_secretkey = own.public, own.secret
        if socket_type == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(endpoint)
        return sock

    dealers, subs = [], []
    for target in args.targets.split(","):
        host, port = target.rsplit(":", 1)
        for kind in ("plaintext", "own-key", "knows-public"):
            dealers.append(attacker(kind, zmq.DEALER, f"tcp://{host}:{port}"))
            subs.append(attacker(kind, zmq.SUB, f"tcp://{host}:{int(port) + 1}"))
    poller = zmq.Poller()
    for sock in (*dealers, *subs, router):
        poller.register(sock, zmq.POLLIN)
    end = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        # Claims of every kind: a Hello (join me), work, a status probe, and gossip posing as a real node.
        frames = [
            encode(Hello(PeerAddr(f"rogue-{n % 3}", args.ip, IMPOSTOR_PORT, IMPOSTOR_PORT + 1), n, args.fingerprint)),
            encode(Request(f"rogue-{n}", MODEL.rsplit(":", 1)[0], Task.COMPLETE, "steal a slot", deadline_ms=5000)),
            encode(Ping(f"rogue-ping-{n}", "rogue", want_status=True)),
        ]
        for dealer in dealers:
            for frame in frames:
                try:
                    dealer.send(frame, zmq.NOBLOCK)
                    sent["sent"] += 1
                except zmq.Again:
                    sent["refused_by_socket"] += 1
        fake = LoadReport(IMPOSTOR, 1, n, me, {"sleep:50": ModelLoad(0, 0, 64)}, {}, (), False, args.fingerprint)
        pub.send(encode(fake))
        for sock, _ in poller.poll(200):
            while sock.poll(0):
                sock.recv_multipart()
                key = "impostor_in" if sock is router else "gossip" if sock in subs else "replies"
                received[key] += 1
    announce.stop()
    print(json.dumps({"event": "summary", **received, **sent}), flush=True)
    for sock in (*dealers, *subs, router, pub):
        sock.close(0)
    ctx.term()
    return 0


def liar_main(argv: list[str]) -> int:
    """A member that holds the key but lies: it gossips as another node, and answers work in that node's name."""
    p = argparse.ArgumentParser(prog="test_rogue.py liar")
    p.add_argument("--ip", required=True)
    p.add_argument("--target", required=True, help="host:port of the node to befriend")
    p.add_argument("--victim", required=True, help="node:host:port of the node to impersonate")
    p.add_argument("--key-file", required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    key = MeshKey.load(args.key_file)
    victim, victim_host, victim_port = args.victim.split(":")
    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for sock in (router, pub):  # a CURVE server with the real key (and no ZAP: it admits whoever comes)
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = key.public, key.secret
    router.bind(f"tcp://{args.ip}:{IMPOSTOR_PORT}")
    pub.bind(f"tcp://{args.ip}:{IMPOSTOR_PORT + 1}")
    dealer = ctx.socket(zmq.DEALER)
    key.configure_client(dealer)
    dealer.connect(f"tcp://{args.target}")
    me = PeerAddr("liar", args.ip, IMPOSTOR_PORT, IMPOSTOR_PORT + 1)
    them = PeerAddr(victim, victim_host, int(victim_port), int(victim_port) + 1)
    inc = time.time_ns()
    served = 0
    end = time.monotonic() + args.seconds
    seq = 0
    while time.monotonic() < end:
        seq += 1
        if seq % 4 == 1:
            dealer.send(encode(Hello(me, inc, key.fingerprint)))
        # Truthful about itself (so work comes its way), lying about the victim: "it is leaving, nothing to serve".
        honest = LoadReport("liar", inc, seq, me, {"sleep:50": ModelLoad(0, 0, 64)}, {}, (), False, key.fingerprint)
        pub.send(encode(honest))
        pub.send(encode(LoadReport(victim, inc * 2, seq, them, {}, {}, (), True, key.fingerprint)))
        deadline = time.monotonic() + 0.25
        while (left := deadline - time.monotonic()) > 0:
            if not router.poll(int(left * 1000) + 1):
                continue
            ident, frame = router.recv_multipart()
            msg = decode(frame)
            if isinstance(msg, Request):
                served += 1
                router.send_multipart([ident, encode(Reply(msg.id, "forged", victim, "", 0))])
        while dealer.poll(0):
            dealer.recv()
    print(json.dumps({"event": "summary", "requests_seen": served}), flush=True)
    for sock in (router, pub, dealer):
        sock.close(0)
    ctx.term()
    return 0


# ----------------------------------------------------------------- the test's side


class KeyedLan:
    """A Lan whose hosts 1..3 run a keyed mesh; host 0 runs clients; host 4 is the rogue's."""

    def __init__(self, lan: Lan, log_dir: Path) -> None:
        self.lan = lan
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def start_node(self, index: int, *extra: str) -> None:
        host = self.lan.hosts[index]
        name = f"h{index}"
        argv = [sys.executable, "-m", "nodes.cli", "node", "--name", name, "--port", str(PORT)]
        argv += ["--advertise", host.ip, "--interface", host.ip, "--model", MODEL, "--grace", "2", *extra]
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        self.procs[name] = self.lan.spawn(host, argv, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        log.close()

    def stop_nodes(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def addr(self, index: int) -> str:
        return f"{self.lan.hosts[index].ip}:{PORT}"

    def on_client(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 90) -> Any:
        """Run `argv` (a python -m module and args) on host 0; `env` changes the environment."""
        prefix = ["env"]
        if env is not None and KEY_ENV not in env:
            prefix += ["-u", KEY_ENV]
        prefix += [f"{k}={v}" for k, v in (env or {}).items()]
        return self.lan.exec(self.lan.hosts[0], [*prefix, sys.executable, *argv], timeout=timeout)

    def converge(self, nodes: list[int], env: dict[str, str] | None = None, timeout: float = 30) -> None:
        addrs = ",".join(self.addr(i) for i in nodes)
        done = self.on_client(["-m", "bench.loadgen", "converge", "--nodes", addrs, "--timeout", str(timeout)], env)
        assert '"converged": true' in done.stdout, f"no convergence: {done.stdout}\n{done.stderr}\n{self.logs()}"

    def status(self, index: int) -> list[dict[str, Any]]:
        done = self.on_client(["-m", "nodes.cli", "status", "--json", "--node", self.addr(index)])
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    def request(self, index: int, prompt: str, env: dict[str, str] | None = None, *flags: str) -> Any:
        argv = ["-m", "nodes.cli", "request", "sleep:50", prompt, "--task", "complete", "--node", self.addr(index)]
        return self.on_client([*argv, "--timeout", "20", *flags], env)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.log_dir.glob("h*.log")))


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def keyed_lan(make_lan: Callable[[int], Lan], tmp_path: Path, keyed: Path) -> Iterator[KeyedLan]:
    m = KeyedLan(make_lan(5), tmp_path)
    yield m
    m.stop_nodes()


def test_a_rogue_with_another_key_gets_nothing_in_and_the_mesh_keeps_serving(
    keyed_lan: KeyedLan, keyed: Path, tmp_path: Path
) -> None:
    m = keyed_lan
    for i in (1, 2, 3):
        m.start_node(i)
    rogue_key = MeshKey.generate().write(tmp_path / "rogue.key")
    m.converge([1, 2, 3])
    mesh = MeshKey.load(keyed)
    rogue_host = m.lan.hosts[4]
    # The rogue's real node, with its own key, seeded with one of ours; and the scripted attacks.
    m.start_node(4, "--key-file", str(rogue_key), "--peer", m.addr(1))
    attack = m.lan.spawn(
        rogue_host,
        [sys.executable, str(Path(__file__)), "rogue", "--ip", rogue_host.ip, "--seconds", "14",
         "--targets", ",".join(m.addr(i) for i in (1, 2, 3)), f"--mesh-public={mesh.public.decode()}",
         f"--fingerprint={mesh.fingerprint}"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    time.sleep(3)  # the attacks and the impostor's announcement are under way
    count = 300
    load = m.on_client(
        ["-m", "bench.loadgen", "load", "--nodes", ",".join(m.addr(i) for i in (1, 2, 3)), "--model", "sleep:50",
         "--count", str(count), "--in-flight", "16", "--timeout", "30"]
    )  # fmt: skip
    summary = json.loads([x for x in load.stdout.splitlines() if '"summary"' in x][-1])
    out, err = attack.communicate(timeout=60)
    assert attack.returncode == 0, err[-2000:]
    rogue = json.loads(out.strip().splitlines()[-1])
    # Nothing the rogue sent got an answer, no gossip reached it, and none of our nodes connected to its impostor.
    assert rogue["sent"] > 0 or rogue["refused_by_socket"] > 0
    assert (rogue["replies"], rogue["gossip"], rogue["impostor_in"]) == (0, 0, 0), rogue
    # The mesh kept serving, and only its own nodes served.
    assert summary["failed"] == 0, summary["failures"]
    assert set(summary["served_by"]) <= {"h1", "h2", "h3"}, summary["served_by"]
    rows = {i: m.status(i) for i in (1, 2, 3)}
    requests_in = sum(r[0]["stats"].get("requests_in", 0) for r in rows.values())
    forwarded = sum(r[0]["stats"].get("forwarded", 0) for r in rows.values())
    # Every request a node accepted came from the load generator (or was forwarded by one of ours).
    assert requests_in == count + forwarded, (requests_in, count, forwarded)
    refused_total = 0
    for i, status in rows.items():
        names = {r["node"]: r for r in status}
        assert "h4" not in names, f"h{i} took the rogue node in"
        assert not any(n.startswith("rogue-") for n in names), f"h{i} believed a rogue Hello"
        impostor = names.get(IMPOSTOR)  # learned from its announcement, but it never proved itself
        assert impostor is None or not impostor["models"], impostor
        sec = status[0]["security"]
        assert sec["mode"] == "curve"
        assert any(f["node"] == "h4" for f in sec["foreign"]), f"h{i} did not list the other mesh: {sec}"
        assert sec["auth_rejected"] > 0 and sec["handshake_failed"] > 0, sec
        refused_total += sec["auth_rejected"] + sec["handshake_failed"]
    log = (m.log_dir / "h1.log").read_text()
    assert "auth_rejected" in log and rogue_host.ip in log, "ZAP refusals must be logged with the address"
    print(f"\nrogue: {rogue}; refused connections counted on the mesh: {refused_total}; load: {summary['ok']} ok")


def test_a_client_without_the_key_or_with_another_is_told_so(keyed_lan: KeyedLan, tmp_path: Path) -> None:
    m = keyed_lan
    m.start_node(1)
    m.converge([1])
    t0 = time.monotonic()
    none = m.request(1, "hello", {INSECURE_ENV: "1"})
    assert none.returncode == 1 and "Unauthorized" in none.stderr and "mesh key" in none.stderr, none.stderr
    assert time.monotonic() - t0 < 10, "an unusable key must be reported at once, not at the deadline"
    other = MeshKey.generate().write(tmp_path / "other.key")
    wrong = m.request(1, "hello", None, "--key-file", str(other))
    assert wrong.returncode == 1 and "Unauthorized" in wrong.stderr, wrong.stderr
    right = m.request(1, "hello")
    assert right.returncode == 0 and right.stdout.strip() == "hello", right.stderr


_CHECKED_LOAD = """
import json, sys
from mesh import Client
with Client(sys.argv[1], timeout=40) as client:
    futures = [client.submit("sleep:50", "complete", f"job {i}") for i in range(int(sys.argv[2]))]
    results = [f.result(60) for f in futures]
print(json.dumps({"outputs": [r.output for r in results], "nodes": [r.node for r in results]}))
"""


def test_a_member_claiming_to_be_another_node_is_not_believed(keyed_lan: KeyedLan, keyed: Path) -> None:
    m = keyed_lan
    for i in (1, 2, 3):
        m.start_node(i, "--try-timeout", "2")
    m.converge([1, 2, 3])
    liar_host, h2 = m.lan.hosts[4], m.lan.hosts[2]
    liar = m.lan.spawn(
        liar_host,
        [sys.executable, str(Path(__file__)), "liar", "--ip", liar_host.ip, "--target", m.addr(1),
         "--victim", f"h2:{h2.ip}:{PORT}", "--key-file", str(keyed), "--seconds", "25"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO),
    )  # fmt: skip
    end = time.monotonic() + 15
    while not any(r["node"] == "liar" and r["models"] for r in m.status(1)):
        assert time.monotonic() < end, f"h1 never heard the liar's own gossip\n{m.logs()}"
        time.sleep(0.3)
    done = m.on_client(["-c", _CHECKED_LOAD, m.addr(1), "60"])
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    out, err = liar.communicate(timeout=60)
    assert liar.returncode == 0, err[-2000:]
    seen = json.loads(out.strip().splitlines()[-1])["requests_seen"]
    # The liar was sent work (it looked idle) but its answers, in h2's name, were never taken.
    assert got["outputs"] == [f"job {i}" for i in range(60)], got
    assert "forged" not in got["outputs"]
    status = {r["node"]: r for r in m.status(1)}
    assert status["h2"]["state"] == "alive" and status["h2"]["models"], "forged gossip made h2 look gone"
    mismatches = status["h1"]["stats"].get("identity_mismatch", 0)
    assert mismatches > 0
    print(f"\nliar: sent {seen} requests, none of its forged answers accepted; {mismatches} identity mismatches")


_CAPTURE = """
import signal, socket, struct, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(3))
sock.bind((sys.argv[2], 0))
# Promiscuous (for this socket's life): a bridge only hands frames between its ports up when it is.
membership = struct.pack("iHH8s", socket.if_nametoindex(sys.argv[2]), 1, 0, b"")  # PACKET_MR_PROMISC
sock.setsockopt(263, 1, membership)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
sock.settimeout(0.2)
running = True
def stop(*_):
    global running
    running = False
signal.signal(signal.SIGTERM, stop)
with open(sys.argv[1], "wb") as out:
    print("capturing", flush=True)
    while running:
        try:
            out.write(sock.recv(65535))
        except socket.timeout:
            pass
"""


def _captured(m: KeyedLan, path: Path, prompt: str, env: dict[str, str] | None) -> bytes:
    """Everything that crossed the switch while host 0 sent `prompt` to each node (and they forwarded it)."""
    cap = subprocess.Popen(
        ["ip", "netns", "exec", m.lan.switch, sys.executable, "-c", _CAPTURE, str(path), "lmbr"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert cap.stdout is not None and cap.stdout.readline().strip() == "capturing"
        for _ in range(3):
            for i in (1, 2, 3):
                done = m.request(i, prompt, env)
                assert done.returncode == 0 and done.stdout.strip() == prompt, done.stderr
    finally:
        cap.send_signal(signal.SIGTERM)
        cap.wait(10)
    return path.read_bytes()


def test_traffic_between_hosts_carries_no_plaintext_prompt(keyed_lan: KeyedLan, tmp_path: Path) -> None:
    m = keyed_lan
    prompt = f"lanmesh-secret-{secrets.token_hex(8)}"
    for i in (1, 2, 3):
        m.start_node(i)
    m.converge([1, 2, 3])
    secure = _captured(m, tmp_path / "curve.bin", prompt, None)
    assert len(secure) > 20_000, "the capture saw too little traffic to mean anything"
    assert prompt.encode() not in secure, "a prompt crossed the network in plaintext with CURVE on"
    # The same capture with an open mesh finds it: the check above can fail.
    m.stop_nodes()
    for i in (1, 2, 3):
        m.start_node(i, "--insecure")
    m.converge([1, 2, 3], {INSECURE_ENV: "1"})
    open_mesh = _captured(m, tmp_path / "insecure.bin", prompt, {INSECURE_ENV: "1"})
    assert prompt.encode() in open_mesh, "the plaintext capture should show the prompt (is the capture working?)"
    print(f"\ncapture: {len(secure)} bytes with CURVE, prompt absent; {len(open_mesh)} bytes open, prompt present")


if __name__ == "__main__":
    if sys.argv[1:2] == ["rogue"]:
        sys.exit(rogue_main(sys.argv[2:]))
    if sys.argv[1:2] == ["liar"]:
        sys.exit(liar_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} rogue --ip IP --targets H:P,... --mesh-public Z85 --fingerprint FP")
