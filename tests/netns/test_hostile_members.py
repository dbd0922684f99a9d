"""Members and neighbours that lie, across hosts (network namespaces; root only): a key holder gossiping a model
name that is a path, a process on a node's own machine forging that node's incarnation, hellos pointing a node at
itself, at loopback, at nothing or at a multicast group. Each is refused and counted; the mesh keeps serving.

The attackers are small scripts (below) run inside a host's namespace with the mesh key, as a member gone bad would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_mesh_hosts import MeshLan

from bench.hosts import Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]

# A key holder on its own host: it says hello to the victim (so the victim subscribes to its gossip), gossips a model
# whose name is a path, and serves that model's files to whoever pulls it.
NAMER = """
import os, sys, tempfile, time, zmq
from pathlib import Path
from mesh import Authenticator, client_security
from nodes.models.catalog import Catalog, ModelEntry, make_manifest
from nodes.models.transfer import ChunkServer, RateLimit
from protocol import Hello, LoadReport, ModelLoad, PeerAddr, decode, encode
me, victim, bad, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
folder = Path(tempfile.mkdtemp(prefix="namer-"))
(folder / "model.onnx").write_bytes(os.urandom(3000))
(folder / "config.json").write_text("{}")
version = make_manifest(bad, "onnx-embed", folder, {})["version"]
catalog = Catalog()
catalog.add(ModelEntry(bad, version, "onnx-embed", str(folder), folder, state="ready"))
server = ChunkServer(catalog, "namer", RateLimit(None))
key = client_security()
ctx = zmq.Context()
auth = Authenticator(ctx, key, lambda kind, source: None)
auth.start()
router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
for s in (router, pub):
    key.configure_server(s)
router.bind(f"tcp://{me}:7100")
pub.bind(f"tcp://{me}:7101")
hello = ctx.socket(zmq.DEALER)
key.configure_client(hello)
hello.connect(f"tcp://{victim}")
addr = PeerAddr("namer", me, 7100, 7101)
inc = time.time_ns()
print("ready", flush=True)
end, seq = time.monotonic() + seconds, 0
while time.monotonic() < end:
    seq += 1
    if seq % 4 == 1:
        hello.send(encode(Hello(addr, inc, key.fingerprint)))
    models = {bad: ModelLoad(0, 0, 1, 0.0, version), "fine": ModelLoad(0, 0, 1, 0.0, "ab" * 32)}
    pub.send(encode(LoadReport("namer", inc, seq, addr, models, {}, (), False, key.fingerprint)))
    while router.poll(250):
        ident, frame = router.recv_multipart()
        try:
            router.send_multipart([ident, encode(server.serve(decode(frame)))])
        except Exception as exc:  # a Fetch this (newer) decoder refuses: nothing to serve
            print("refused", exc, flush=True)
"""

# A process on a node's own machine, holding the key: it says hello as "imp" (so the peers subscribe to its gossip),
# then for a few seconds publishes that node's load report with the largest incarnation there is. It arrives from
# the node's own address, so the identity rule cannot tell it from the node.
FORGER = """
import sys, time, zmq
from mesh import Authenticator, client_security
from protocol import Hello, LoadReport, PeerAddr, encode
me, targets, node = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
port, seconds = int(sys.argv[4]), float(sys.argv[5])
key = client_security()
ctx = zmq.Context()
auth = Authenticator(ctx, key, lambda kind, source: None)
auth.start()
router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
for s in (router, pub):
    key.configure_server(s)
router.bind(f"tcp://{me}:7100")
pub.bind(f"tcp://{me}:7101")
dealers = []
for target in targets:
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    key.configure_client(d)
    d.connect(f"tcp://{target}")
    dealers.append(d)
print("ready", flush=True)
real = PeerAddr(node, me, port, port + 1)
end, seq = time.monotonic() + seconds, 0
while time.monotonic() < end:
    seq += 1
    if seq % 5 == 1:
        for d in dealers:
            d.send(encode(Hello(PeerAddr("imp", me, 7100, 7101), 1, key.fingerprint)))
    pub.send(encode(LoadReport(node, 2**63 - 2, seq, real, {}, {}, (), False, key.fingerprint)))
    time.sleep(0.05)
print("done", seq, flush=True)
"""
SERVED_BY = """
import sys, time
from mesh import Client
end = time.monotonic() + float(sys.argv[3])
with Client(sys.argv[1], timeout=5) as client:
    while True:
        try:
            node = client.request(sys.argv[2], "complete", "x").node
        except Exception as exc:
            node = f"error: {exc}"
        if node == sys.argv[4] or time.monotonic() > end:
            break
        time.sleep(0.2)
print(node)
"""

# A member that tells a node about "peers" at addresses that are the node itself, loopback, nobody, or a group:
# in hellos, and in the digest of its own (accepted) gossip.
ALIASER = """
import sys, time, zmq
from mesh import Authenticator, client_security
from protocol import Hello, LoadReport, PeerAddr, encode
me, victim, victim_ip, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
key = client_security()
ctx = zmq.Context()
auth = Authenticator(ctx, key, lambda kind, source: None)
auth.start()
router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
for s in (router, pub):
    key.configure_server(s)
router.bind(f"tcp://{me}:7100")
pub.bind(f"tcp://{me}:7101")
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
key.configure_client(dealer)
dealer.connect(f"tcp://{victim}")
own = PeerAddr("aliaser", me, 7100, 7101)
hosts = {"lo": "127.0.0.1", "any": "0.0.0.0", "mc": "224.0.0.251", "bc": "255.255.255.255", "self": victim_ip,
         "localhost": "localhost"}
aliases = [PeerAddr(f"alias-{k}", h, 7000, 7001) for k, h in hosts.items()]
digest = (PeerAddr("digest-self", victim_ip, 7000, 7001), PeerAddr("digest-lo", "127.0.0.1", 7000, 7001))
inc = time.time_ns()
print("ready", flush=True)
end, seq = time.monotonic() + seconds, 0
while time.monotonic() < end:
    seq += 1
    if seq % 4 == 1:
        for addr in (own, *aliases):
            dealer.send(encode(Hello(addr, inc, key.fingerprint)))
    pub.send(encode(LoadReport("aliaser", inc, seq, own, {}, {}, digest, False, key.fingerprint)))
    while router.poll(250):
        router.recv_multipart()
"""

# Operator's side, on the client host: `lanmesh models pull NAME --node VICTIM` as a user types it, then the same
# request as a raw Admin (what a script or an older CLI could send), and the victim's status.
RAW_PULL = """
import json, sys, zmq
from mesh import client_security
from protocol import Admin, decode, encode
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
client_security().configure_client(sock)
sock.connect(f"tcp://{sys.argv[1]}")
sock.send(encode(Admin("raw-pull", "pull", {"name": sys.argv[2]})))
assert sock.poll(30_000), "no answer"
answer = decode(sock.recv())
print(json.dumps({"type": type(answer).__name__, "code": getattr(answer, "code", None),
                  "message": getattr(answer, "message", ""), "output": getattr(answer, "output", None)}))
"""
STATUS = """
import json, sys
from mesh import Client
with Client(sys.argv[1], timeout=15) as client:
    print(json.dumps(client.status()))
"""


@pytest.fixture
def mesh_lan(make_lan: Any, tmp_path: Path, keyed: Path) -> Iterator[MeshLan]:
    m = MeshLan(make_lan(4), tmp_path)
    yield m
    for node in m.nodes.values():
        node.stop(timeout=10)


def _on_client(lan: Lan, argv: list[str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return lan.exec(lan.hosts[0], [sys.executable, *argv], timeout=timeout)


def _status(lan: Lan, address: str) -> list[dict[str, Any]]:
    done = _on_client(lan, ["-c", STATUS, address])
    assert done.returncode == 0, done.stderr[-2000:]
    rows: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def _attacker(lan: Lan, host: int, script: str, *args: str) -> subprocess.Popen[str]:
    proc = lan.spawn(lan.hosts[host], [sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, cwd=str(REPO), env={"PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
    return proc


def test_a_model_name_that_is_a_path_is_refused_where_it_enters_and_never_pulled(
    mesh_lan: MeshLan, tmp_path: Path
) -> None:
    """A key holder gossips `../../../escaped` and serves its files; an operator pulls it onto the victim. Before,
    the pull published the rogue's files outside the victim's cache and exited 0."""
    m, lan = mesh_lan, mesh_lan.lan
    victim = m.start_node(1, model="echo", extra=["--cache-dir", str(tmp_path / "cache")])
    m.converge()
    bad = "../../../escaped"
    namer = _attacker(lan, 2, NAMER, lan.hosts[2].ip, victim.address, bad, "40")
    try:
        # Its hello makes it a peer; its reports, refused, never make it a member ("unverified" until one passes).
        s = m.tool("until-state", "--node", victim.address, "--peer", "namer", "--states", "alive,unverified")
        assert s["reached"], f"the victim never heard of the member\n{m.logs()}"
        cli = _on_client(lan, ["-m", "nodes.cli", "models", "pull", bad, "--node", victim.address, "--timeout", "30"])
        assert cli.returncode != 0, f"the CLI pulled a model named {bad!r}: {cli.stdout}"
        assert "not a valid name" in cli.stderr, cli.stderr
        raw = _on_client(lan, ["-c", RAW_PULL, victim.address, bad])
        assert raw.returncode == 0, raw.stderr[-2000:]
        answer = json.loads(raw.stdout.strip().splitlines()[-1])
        assert answer["type"] == "Error" and "not a valid name" in answer["message"], answer
        rows = {r["node"]: r for r in _status(lan, victim.address)}
        assert bad not in rows.get("namer", {}).get("models", {}), "the victim believed a model named as a path"
        assert rows.get("namer", {}).get("state") != "alive", "the victim took a member whose every report was refused"
        assert rows[victim.name]["stats"].get("bad_frames", 0) > 0, "the refused gossip was not counted"
    finally:
        namer.kill()
        namer.wait(10)
    escaped = [str(p) for p in tmp_path.rglob("escaped*")]
    assert not escaped, f"files published outside the cache: {escaped}"


def test_a_forged_incarnation_from_a_nodes_own_machine_cannot_keep_it_out_of_routing(mesh_lan: MeshLan) -> None:
    """Before, 3 s of forged reports with incarnation 2^63-2 made every real report of h2 stale for good: h2 went
    dead on every peer and stayed out of routing even after restarting cleanly."""
    m, lan = mesh_lan, mesh_lan.lan
    h1 = m.start_node(1, model="echo")
    h2 = m.start_node(2, model="sleep:100")
    h3 = m.start_node(3, model="echo")
    m.converge()
    forger = _attacker(lan, 2, FORGER, lan.hosts[2].ip, f"{h1.address},{h3.address}", "h2", str(h2.port), "3")
    assert forger.wait(30) == 0, forger.stderr.read() if forger.stderr else ""
    for peer in (h1, h3):
        # The forged reports carried no models: believed, they left h2 with nothing to route to it, for good.
        served = _on_client(lan, ["-c", SERVED_BY, peer.address, "sleep:100", "5", "h2"])
        assert served.stdout.strip() == "h2", f"{peer.name} no longer routes to h2: {served.stdout}\n{m.logs()}"
        rows = {r["node"]: r for r in _status(lan, peer.address)}
        assert rows["h2"]["state"] == "alive" and "sleep:100" in rows["h2"]["models"], rows["h2"]
        me = rows[peer.name]
        # Its reports arrive on the SUB each peer made for "imp": naming h2 there, they are refused as a mismatch
        # before their incarnation is looked at (one SUB for every peer once let them reach the incarnation bound).
        refused = me["security"]["incarnation_refused"] + me["security"]["identity_mismatch"]
        assert refused > 0, f"{peer.name} did not count the refusals: {me['stats']}"
    tail = h1.log_tail(200)
    assert "ahead of this node's clock" in tail or "identity mismatch" in tail
    # h2 restarts cleanly: its new incarnation is taken, and requests entering h1 go to it again.
    h2.stop(timeout=15)
    m.start_node(2, model="sleep:100")
    served = _on_client(lan, ["-c", SERVED_BY, h1.address, "sleep:100", "20", "h2"])
    assert served.stdout.strip() == "h2", f"{served.stdout}{served.stderr[-1500:]}\n{m.logs()}"


def test_hellos_and_digests_pointing_a_node_at_itself_loopback_nobody_or_a_group_are_refused(mesh_lan: MeshLan) -> None:
    """Before, the node connected to each of these and listed the aliases of itself as flapping peers."""
    m, lan = mesh_lan, mesh_lan.lan
    h1 = m.start_node(1, model="echo")
    m.start_node(3, model="sleep:100")
    m.converge()
    aliaser = _attacker(lan, 2, ALIASER, lan.hosts[2].ip, h1.address, lan.hosts[1].ip, "12")
    try:
        s = m.tool("until-state", "--node", h1.address, "--peer", "aliaser", "--states", "alive")
        assert s["reached"], f"h1 never heard the member's own gossip\n{m.logs()}"
        looks, end = 0, time.monotonic() + 10
        while True:  # looks while the claims keep coming (before, each was re-learned after being dropped)
            rows = {r["node"]: r for r in _status(lan, h1.address)}
            aliases = sorted(n for n in rows if n.startswith(("alias-", "digest-")))
            assert not aliases, f"h1 took these for peers: {[(n, rows[n]['address']) for n in aliases]}"
            # The aliaser answers no probes (a script, not a member): between its reports a watcher may suspect it,
            # and its next report refutes that. What matters: h1 keeps it, and h3, as peers.
            assert rows["h3"]["state"] == "alive" and rows["aliaser"]["state"] in ("alive", "suspect")
            looks += 1
            refused = rows["h1"]["security"]["bad_peer_address"]
            if looks >= 3 and refused >= 8:  # six hellos and two digest entries, each refused and counted
                break
            assert time.monotonic() < end, f"the refusals were not all counted: {rows['h1']['stats']}"
            time.sleep(0.5)
        served = _on_client(lan, ["-c", SERVED_BY, h1.address, "sleep:100", "10", "h3"])
        assert served.stdout.strip() == "h3", served.stdout + served.stderr[-1500:]
    finally:
        aliaser.kill()
        aliaser.wait(10)
