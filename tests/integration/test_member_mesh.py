"""A mesh of member identities on loopback: every node and client its own key, roles at every door, names bound to
keys, revocation and expiry, and enrolling a machine with `lanmesh invite` / `lanmesh join`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import zmq

from bench.procs import ROOT, Cluster, NodeProc
from mesh import (
    INSECURE_ENV,
    KEY_ENV,
    Client,
    MemberIdentity,
    Role,
    Unauthorized,
    connect_dealer,
    load_key,
)
from nodes.cli.model_commands import AdminError, admin_call
from protocol import (
    Admin,
    Digest,
    Error,
    ErrorCode,
    Hello,
    Member,
    PeerAddr,
    Ping,
    Request,
    Stage,
    Suspicion,
    Task,
    decode,
    encode,
)
from tests.conftest import LOOPBACK
from tests.member_mesh import ROGUE, TestAuthority


@pytest.fixture
def ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestAuthority:
    """A mesh authority; nodes and clients of the test use the identities it enrols (no shared key anywhere)."""
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    return TestAuthority(tmp_path)


@pytest.fixture
def nodes(tmp_path: Path, ca: TestAuthority) -> Iterator[Cluster]:
    with Cluster(log_dir=tmp_path) as c:
        yield c


def start(
    c: Cluster, ca: TestAuthority, name: str, model: str, *, authority: bool = False,
    seeds: list[NodeProc] | None = None, role: Role = Role.NODE, extra: list[str] | None = None,
) -> NodeProc:  # fmt: skip
    path = ca.folder / name / "mesh.key"
    if not path.exists():
        ca.enrol(name, Role.ADMIN if authority else role)  # the machine `lanmesh init` ran on is an admin
    argv = [*LOOPBACK, "--model", model, "--state-dir", str(ca.state(name)), *(extra or [])]
    if authority:
        argv += ["--authority-dir", str(ca.folder / "authority")]
    for seed in seeds or []:
        argv += [f"--peer={ca.identity(seed.name).key_text}@{seed.address}"]  # a key may begin with "-"
    return c.add(name, argv, key_file=path)


def client_of(ca: TestAuthority, name: str, via: NodeProc, role: Role = Role.CLIENT, **kw: Any) -> MemberIdentity:
    """A member enrolled as `role` that knows the node `via` (as `lanmesh join` leaves it)."""
    ca.enrol(name, role, nodes=[ca.known(via.name, via.address)], **kw)
    return ca.identity(name)


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def security_of(node: NodeProc) -> dict[str, Any]:
    return node.status()[0]["security"]  # type: ignore[no-any-return]


def peers_of(node: NodeProc) -> set[str]:
    return {r["node"] for r in node.status()[1:] if r["state"] in ("alive", "suspect")}


def raw(address: str, identity: MemberIdentity) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect_dealer(sock, f"tcp://{address}", identity)
    return sock


def answer(sock: zmq.Socket[bytes], rid: str, timeout: float = 5.0) -> Any:
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        assert sock.poll(int(left * 1000)), f"no answer to {rid}"
        msg = decode(sock.recv())
        if getattr(msg, "id", None) == rid:
            return msg
    raise AssertionError(f"no answer to {rid}")


# ----------------------------------------------------------------- working together


def test_members_with_their_own_keys_route_requests_across_the_mesh(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    b = start(nodes, ca, "b", "sleep:20", seeds=[a])
    nodes.wait_converged(15)
    me = client_of(ca, "laptop", a)
    with Client(a.address, security=me, timeout=15) as client:
        assert client.request("sleep:20", "complete", "hi").node == "b"  # forwarded by a to b
        rows = client.status()
        assert {r["node"] for r in rows} == {"a", "b"} and all("certificate" in r for r in rows)
    # Only a was given: b's key came from a's status, with b's certificate checked against the authority.
    with Client(b.address, security=me, timeout=15, learn=False) as client:
        assert client.request("sleep:20", "complete", "hi").node == "b"
    sec = security_of(a)
    assert sec["mode"] == "identities" and sec["authority"] and sec["member"] == "a"


# ----------------------------------------------------------------- roles at every door


def test_a_client_key_may_ask_but_not_load_forward_or_say_hello(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    me = client_of(ca, "laptop", a)
    sock = raw(a.address, me)
    sock.send(encode(Request("r0", "echo", Task.COMPLETE, "allowed")))
    assert answer(sock, "r0").output == "allowed"
    sock.send(encode(Admin("a1", "load", {"spec": "echo"})))
    sock.send(encode(Admin("a2", "unload", {"name": "echo"})))
    sock.send(encode(Request("r1", "echo", Task.COMPLETE, "x", hops=1)))  # posing as a peer forwarding work
    for rid in ("a1", "a2", "r1"):
        refused = answer(sock, rid)
        assert isinstance(refused, Error) and refused.code == ErrorCode.UNAUTHORIZED, refused
        assert "laptop is a client" in refused.message
    sock.send(encode(Hello(PeerAddr("laptop", "127.0.0.1", 1, 2, me.key_text), 1, me.fingerprint)))
    eventually(lambda: security_of(a)["role_refused"] >= 4, what="the refusals counted")
    assert "laptop" not in {r["node"] for r in a.status()}
    assert admin_call(a.address, "models", {}, me, 5)["models"]  # reading is a client's right
    sock.close(0)


def test_a_client_key_cannot_feed_a_nodes_pipeline_stages(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    me = client_of(ca, "laptop", a)
    sock = raw(a.address, me)
    sock.send(encode(Request("r0", "echo", Task.COMPLETE, "hi")))
    assert answer(sock, "r0").output == "hi"  # its certificate was taken: it is a known client
    # A stage's message as nodes send them (a header, then the tensor it announces), and one without a tensor.
    run = Stage("s1", "echo[0-1]", "run", "a", 0, (1,), (1, 4), "float32", last=True, due=True)
    sock.send_multipart([encode(run), bytes(16)])
    sock.send(encode(Stage("s2", "echo[0-1]", "close", "a")))
    eventually(lambda: security_of(a)["role_refused"] >= 2, what="both stage messages refused")
    assert a.status()[0]["stats"].get("stage_messages_in", 0) == 0
    sock.close(0)


def test_a_key_without_a_certificate_gets_nothing_not_even_gossip(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    a_key = ca.identity("a").key_text.encode()
    ctx = zmq.Context.instance()
    public, secret = zmq.curve_keypair()  # anyone on the LAN can make a key pair; nobody certified this one
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    for opt, value in ((zmq.CURVE_SERVERKEY, a_key), (zmq.CURVE_PUBLICKEY, public), (zmq.CURVE_SECRETKEY, secret)):
        stranger.setsockopt(opt, value)
    stranger.connect(f"tcp://{a.address}")
    stranger.send(encode(Request("r1", "echo", Task.COMPLETE, "x")))
    stranger.send(encode(Admin("a1", "models")))
    stranger.send(encode(Ping("p1", "stranger", True)))
    first = answer(stranger, "r1")
    assert isinstance(first, Error) and first.code == ErrorCode.UNAVAILABLE and "certificate" in first.message
    second = answer(stranger, "a1")
    assert isinstance(second, Error) and second.code == ErrorCode.UNAUTHORIZED
    assert isinstance(answer(stranger, "p1"), Error)  # no status: who is in the mesh is not a stranger's business
    listener = ctx.socket(zmq.SUB)
    listener.setsockopt(zmq.LINGER, 0)
    listener.setsockopt(zmq.SUBSCRIBE, b"")
    for opt, value in ((zmq.CURVE_SERVERKEY, a_key), (zmq.CURVE_PUBLICKEY, public), (zmq.CURVE_SECRETKEY, secret)):
        listener.setsockopt(opt, value)
    listener.connect(f"tcp://127.0.0.1:{a.port + 1}")
    assert not listener.poll(1500), "a stranger heard the gossip"
    assert security_of(a)["unknown_key"] >= 3
    for sock in (stranger, listener):
        sock.close(0)


def test_a_node_key_cannot_change_models_on_other_nodes(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    ca.enrol("n2", Role.NODE, nodes=[ca.known("a", a.address)])
    with pytest.raises(AdminError, match="n2 is a node; Admin unload needs a admin"):
        admin_call(a.address, "unload", {"name": "echo"}, ca.identity("n2"), 5)
    with pytest.raises(AdminError, match="needs a admin"):
        admin_call(a.address, "revoke", {"name": "a"}, ca.identity("n2"), 5)
    admin = client_of(ca, "ops", a, Role.ADMIN)
    assert admin_call(a.address, "models", {}, admin, 5)


def test_a_client_key_posing_as_a_node_never_gets_work_or_is_believed(nodes: Cluster, ca: TestAuthority,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    ca.enrol("rogue", Role.CLIENT)
    from bench.procs import free_port_pair

    port = free_port_pair()
    rogue = subprocess.Popen(
        [sys.executable, "-c", ROGUE, str(ca.folder / "rogue" / "mesh.key"), "127.0.0.1", str(port), "sleep:20", "20"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert rogue.stdout is not None and rogue.stdout.readline().strip() == "ready"
        rogue_key = ca.identity("rogue").key_text
        # The node is pointed at the rogue the way a hint would (a seed; mDNS and digests alike): it connects,
        # hears a client's certificate, and drops it.
        a = start(nodes, ca, "a", "echo", authority=True, extra=[f"--peer={rogue_key}@127.0.0.1:{port}"])
        b = start(nodes, ca, "b", "sleep:20", seeds=[a])
        nodes.wait_converged(15, [a, b])
        eventually(lambda: security_of(a)["name_refused"] >= 1, what="the rogue's claim refused")
        me = client_of(ca, "laptop", a)
        with Client(a.address, security=me, timeout=15) as client:
            served = [client.request("sleep:20", "complete", str(i)).node for i in range(30)]
        assert set(served) == {"b"}
        assert "rogue" not in {r["node"] for r in a.status()}
    finally:
        rogue.kill()
        rogue.wait(10)


# ----------------------------------------------------------------- names bound to keys


def test_a_second_key_claiming_a_nodes_name_is_refused_and_counted(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    b = start(nodes, ca, "b", "sleep:20", seeds=[a])
    nodes.wait_converged(15)
    # A node of the mesh (its own valid certificate, named "c") says it is b, from its own key.
    ca.enrol("c", Role.NODE, nodes=[ca.known("a", a.address)])
    c = ca.identity("c")
    sock = raw(a.address, c)
    for addr in (
        PeerAddr("b", "127.0.0.1", b.port, b.port + 1, c.key_text),  # b's name with c's key
        PeerAddr("b", "127.0.0.1", b.port, b.port + 1, ca.identity("b").key_text),
    ):  # b's key, not c's
        sock.send(encode(Hello(addr, time.time_ns(), c.fingerprint)))
    eventually(lambda: security_of(a)["name_refused"] >= 2, what="both claims refused")
    rows = {r["node"]: r for r in a.status()}
    assert rows["b"]["address"] == b.address and rows["b"]["state"] == "alive"
    assert rows["b"]["key"] == ca.identity("b").key_text
    sock.close(0)


def test_a_node_key_cannot_accuse_or_sync_in_another_nodes_name(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    b = start(nodes, ca, "b", "sleep:20", seeds=[a])
    nodes.wait_converged(15)
    ca.enrol("c", Role.NODE, nodes=[ca.known("a", a.address)])
    c = ca.identity("c")
    sock = raw(a.address, c)
    # Gossip names its sender: a member's own key may say what it saw, never what b saw.
    sock.send(encode(Suspicion("b", 1, 1, "a", True)))
    sock.send(encode(Digest("b", 2, 1, (Member(PeerAddr("b", "127.0.0.1", b.port, b.port + 1), 1, 1, "dead"),))))
    eventually(lambda: security_of(a)["name_refused"] >= 2, what="the suspicion and the digest refused")
    rows = {r["node"]: r for r in a.status()}
    assert rows["b"]["state"] == "alive"
    sock.close(0)


# ----------------------------------------------------------------- revocation and expiry


def test_a_revoked_node_is_dropped_everywhere_within_5s_and_its_work_moves(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    start(nodes, ca, "b", "sleep:400:cap=8", seeds=[a])
    c = start(nodes, ca, "c", "sleep:400:cap=8", seeds=[a])
    nodes.wait_converged(15)
    me = client_of(ca, "laptop", a)
    admin = ca.identity("a")
    with Client(a.address, security=me, timeout=30, learn=False) as client:
        futures: list[Future[Any]] = [client.submit("sleep:400", "complete", str(i)) for i in range(16)]
        time.sleep(0.1)  # in flight on b and c
        t0 = time.monotonic()
        admin_call(a.address, "revoke", {"name": "b"}, admin, 5)
        gone = {n.name: eventually(lambda n=n: "b" not in peers_of(n), 5, f"{n.name} dropping b")
                for n in (a, c)}  # fmt: skip
        results = [f.result(30) for f in futures]
    took = time.monotonic() - t0
    print(f"revocation: b dropped by a in {gone['a']:.2f}s, by c in {gone['c']:.2f}s (all within {took:.2f}s)")
    assert len(results) == 16  # none failed
    assert security_of(c)["revocations"] == 1
    # b itself is refused by every node now: a fresh connection with its key gets nothing.
    ident_b = ca.identity("b")
    probe = zmq.Context.instance().socket(zmq.DEALER)
    probe.setsockopt(zmq.LINGER, 0)
    ident_b.configure_client(probe, server_key=ca.identity("c").key_text)
    probe.connect(f"tcp://{c.address}")
    probe.send(ident_b.certificate_frame())
    probe.send(encode(Request("late", "sleep:400", Task.COMPLETE, "x")))
    assert not probe.poll(1500), "a revoked key got an answer"
    probe.close(0)


def test_a_node_that_was_away_learns_the_revocation_before_it_serves_the_revoked_key(
    nodes: Cluster, ca: TestAuthority
) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    b = start(nodes, ca, "b", "sleep:20", seeds=[a])
    c = start(nodes, ca, "c", "sleep:20", seeds=[a])
    nodes.wait_converged(15)
    c.stop()
    admin_call(a.address, "revoke", {"name": "b"}, ca.identity("a"), 5)
    eventually(lambda: "b" not in peers_of(a), 5, "a dropping b")
    # c comes back knowing nothing of it, and b (still running, as a thief would) is one of its seeds.
    c2 = start(nodes, ca, "c", "sleep:20", seeds=[b, a])
    eventually(lambda: security_of(c2)["revocations"] == 1, 10, "c catching up")
    assert "b" not in peers_of(c2)
    me = client_of(ca, "laptop", c2)
    with Client(c2.address, security=me, timeout=15, learn=False) as client:
        assert {client.request("sleep:20", "complete", str(i)).node for i in range(10)} == {"c"}
    # Restarted again, it knows at once (its state folder), before it hears from anyone.
    c2.stop()
    c3 = start(nodes, ca, "c", "sleep:20", seeds=[b])
    assert security_of(c3)["revocations"] == 1


def test_an_expired_certificate_is_refused_with_a_clear_error(nodes: Cluster, ca: TestAuthority) -> None:
    a = start(nodes, ca, "a", "echo", authority=True)
    me = client_of(ca, "short", a, valid_s=3)
    with Client(a.address, security=me, timeout=5) as client:
        assert client.request("echo", "complete", "still valid").output == "still valid"
        time.sleep(0.5)
    # It was issued valid from a minute before its signing: it expires 3 s after that.
    eventually(lambda: ca.identity("short").cert.problem(time.time()) != "", 10, "the certificate to expire")
    with Client(a.address, security=load_key(ca.folder / "short" / "mesh.key"), timeout=5) as client:
        with pytest.raises(Unauthorized, match="expired"):
            client.request("echo", "complete", "too late")


# ----------------------------------------------------------------- enrolling with the command line


def lanmesh(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, INSECURE_ENV)}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "nodes.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def test_init_invite_and_join_enrol_machines_without_copying_a_secret(tmp_path: Path, nodes: Cluster,
                                                                      ca: TestAuthority) -> None:  # fmt: skip
    first, laptop = tmp_path / "first", tmp_path / "laptop"
    out = lanmesh(first, "init", "--name", "first")
    assert out.returncode == 0, out.stderr
    key = first / ".config" / "lanmesh" / "mesh.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    node = nodes.add("first", [*LOOPBACK, "--model", "echo", "--state-dir", str(first / "state")], key_file=key)
    invite = lanmesh(first, "invite", "--role", "client", "--expires", "10m", "--node", node.address)
    assert invite.returncode == 0, invite.stderr
    code = next(w for w in invite.stdout.split() if w.startswith("lanmesh-invite-1:"))
    joined = lanmesh(laptop, "join", code, "--name", "laptop")
    assert joined.returncode == 0, joined.stderr
    mine = load_key(laptop / ".config" / "lanmesh" / "mesh.key")
    assert isinstance(mine, MemberIdentity) and (mine.name, mine.role) == ("laptop", Role.CLIENT)
    assert mine.secret not in key.read_bytes()  # its own secret, made on its machine
    again = lanmesh(tmp_path / "other", "join", code, "--name", "other")
    assert again.returncode == 1 and "used already" in again.stderr
    asked = lanmesh(laptop, "request", "echo", "hello from the laptop")  # its node: the one that enrolled it
    assert asked.returncode == 0, asked.stderr
    assert "hello from the laptop" in asked.stdout and "served by first" in asked.stderr
    listed = lanmesh(first, "members", "--node", node.address)
    assert listed.returncode == 0 and "laptop" in listed.stdout and "client" in listed.stdout
    revoked = lanmesh(first, "revoke", "laptop", "--node", node.address)
    assert revoked.returncode == 0, revoked.stderr
    after = lanmesh(laptop, "request", "echo", "after revocation")
    assert after.returncode != 0 and "hello" not in after.stdout
