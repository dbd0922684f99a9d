"""Who may speak for a node, across hosts: a member holding the mesh key cannot take a live node's name, whether the
node advertises an IP or a DNS name (resolved once, its gossip checked against that address)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_mesh_hosts import MeshLan

from bench.hosts import Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

# Joins as "imp" (so the victim subscribes to its gossip), then publishes reports that say they come from the node
# named in argv, at that node's own address, with a huge incarnation: a restart that would move the node's work.
IMPOSTOR = """
import sys, time, zmq
from mesh import MeshKey
from mesh import Authenticator, client_security
from protocol import Hello, LoadReport, PeerAddr, encode
me, victim, name, host = sys.argv[1:5]
port, pub_port = int(sys.argv[5]), int(sys.argv[6])
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
hello.send(encode(Hello(PeerAddr("imp", me, 7100, 7101), 1, key.fingerprint)))
print("ready", flush=True)
forged = PeerAddr(name, host, port, pub_port)
for seq in range(1, 200):
    pub.send(encode(LoadReport(name, 2**62, seq, forged, {}, {}, (), False, key.fingerprint)))
    time.sleep(0.05)
"""
# On the client host: what the victim says after the attack (its status, and who serves a request entering it).
CHECK = """
import json, sys
from mesh import Client
with Client(sys.argv[1], timeout=15) as client:
    status = client.status()
    served = client.request(sys.argv[2], "complete", "x").node
print(json.dumps({"status": status, "served": served}))
"""


@pytest.fixture
def lan_with_names(make_lan: Callable[[int], Lan]) -> Iterator[Lan]:
    """4 hosts; every namespace resolves `nodeb.lan` to host 2 (ip netns exec reads /etc/netns/NAME/hosts)."""
    lan = make_lan(4)
    made = []
    for host in lan.hosts:
        folder = Path("/etc/netns") / host.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(f"127.0.0.1 localhost\n{lan.hosts[2].ip} nodeb.lan\n")
        made.append(folder)
    yield lan
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("advertised", ["ip", "dns name"])
def test_a_member_cannot_speak_for_a_live_node_from_another_host(
    lan_with_names: Lan, tmp_path: Path, keyed: Path, advertised: str
) -> None:
    m = MeshLan(lan_with_names, tmp_path)
    try:
        a = m.start_node(1, model="echo")
        # mDNS announces IPv4 addresses only: a node known by a DNS name is found through a seed.
        b_extra = ["--advertise", "nodeb.lan", "--no-mdns", "--peer", a.address] if advertised == "dns name" else []
        b = m.start_node(2, extra=b_extra)
        m.converge()
        h3 = lan_with_names.hosts[3]
        b_host = "nodeb.lan" if advertised == "dns name" else lan_with_names.hosts[2].ip
        impostor = lan_with_names.spawn(
            h3, [sys.executable, "-c", IMPOSTOR, h3.ip, a.address, "h2", b_host, str(b.port), str(b.port + 1)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(Path(__file__).resolve().parents[2]),
        )  # fmt: skip
        assert impostor.stdout is not None and impostor.stdout.readline().strip() == "ready"
        states = "unverified,alive,suspect,dead"  # it never reports itself, so it stays unverified
        s = m.tool("until-state", "--node", a.address, "--peer", "imp", "--states", states)
        assert s["reached"], "the victim never heard of the impostor"
        m.tool("until-state", "--node", a.address, "--peer", "imp", "--states", "gone", "--timeout", "10")
        # The impostor never spoke as itself, so the victim dropped it after dead_after; its forged reports came
        # in meanwhile. What the victim believes now:
        done = lan_with_names.exec(lan_with_names.hosts[0], [sys.executable, "-c", CHECK, a.address, "sleep:100"])
        assert done.returncode == 0, done.stderr[-2000:]
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        me, rows = seen["status"][0], {r["node"]: r for r in seen["status"]}
        refused = me["security"]["identity_mismatch"] + me["security"]["identity_conflict"]
        assert refused >= 3, f"the forged reports never reached the victim: {me['stats']}"
        assert rows["h2"]["state"] == "alive" and rows["h2"]["models"], "the forged 'restart' was believed"
        assert seen["served"] == "h2"
        assert "restarted" not in a.log_tail(200)
    finally:
        for node in m.nodes.values():
            node.stop(timeout=10)
