"""Security of a node on loopback: the mesh key, who gets refused and how they hear it, limits, hostile frames."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from bench.procs import ROOT, Cluster, NodeProc
from mesh import INSECURE_ENV, KEY_ENV, BadRequest, Client, MeshKey, Plaintext, Unauthorized
from protocol import VERSION, Error, ErrorCode, LoadReport, PeerAddr, Reply, Request, Task, decode, encode
from tests.conftest import LOOPBACK


def lanmesh(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full = {**(env if env is not None else os.environ), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "nodes.cli", *args], capture_output=True, text=True, timeout=timeout, env=full
    )


def _dealer(address: str, security: Any) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    security.configure_client(sock)
    sock.connect(f"tcp://{address}")
    return sock


def _recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> Any:
    assert sock.poll(int(timeout * 1000)), "the node did not answer"
    return decode(sock.recv())


def _security(node: NodeProc) -> dict[str, Any]:
    return node.status()[0]["security"]  # type: ignore[no-any-return]


def _stats(node: NodeProc) -> dict[str, int]:
    return node.status()[0]["stats"]  # type: ignore[no-any-return]


def _eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


# ----------------------------------------------------------------- starting with and without a key


def test_a_node_without_a_key_refuses_to_start_and_says_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (KEY_ENV, INSECURE_ENV)}
    env["HOME"] = str(tmp_path)  # no ~/.config/lanmesh/mesh.key here
    t0 = time.monotonic()
    out = lanmesh("node", *LOOPBACK, "--model", "echo", "--port", "0", env=env)
    assert out.returncode == 1
    assert "no mesh key" in out.stderr and "lanmesh keygen" in out.stderr and "--insecure" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 15  # refused before loading anything


def test_keygen_writes_a_private_key_the_node_then_uses(tmp_path: Path, cluster: Cluster) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    out = lanmesh("keygen", env=env)
    assert out.returncode == 0, out.stderr
    default = tmp_path / ".config" / "lanmesh" / "mesh.key"
    assert (default.stat().st_mode & 0o777) == 0o600
    fp = MeshKey.load(default).fingerprint
    assert fp in out.stdout
    again = lanmesh("keygen", env=env)
    assert again.returncode == 1 and "--force" in again.stderr
    assert MeshKey.load(default).fingerprint == fp  # untouched
    node = cluster.add("own-key", [*LOOPBACK, "--model", "echo"], key_file=default)
    with Client(node.address, security=MeshKey.load(default), timeout=10) as client:
        assert client.request("echo", "complete", "mine").output == "mine"
    status = lanmesh("status", "--node", node.address, "--key-file", str(default))
    assert status.returncode == 0, status.stderr
    assert f"security: CURVE, mesh key {fp}" in status.stdout


def test_an_insecure_node_warns_loudly_and_status_says_the_mesh_is_open(tmp_path: Path) -> None:
    with Cluster(log_dir=tmp_path, insecure=True) as c:
        node = c.add("open", [*LOOPBACK, "--model", "echo"])
        assert "INSECURE" in node.log_path.read_text()
        out = lanmesh("status", "--node", node.address)  # this test's env: LANMESH_INSECURE=1
        assert out.returncode == 0, out.stderr
        assert "OPEN MESH" in out.stdout
        assert _security(node)["mode"] == "insecure"
        # A client that holds a key cannot talk to it, and is told why.
        with Client(node.address, security=MeshKey.generate(), timeout=10) as client:
            t0 = time.monotonic()
            with pytest.raises(Unauthorized, match="--insecure"):
                client.request("echo", "complete", "x")
            assert time.monotonic() - t0 < 5


# ----------------------------------------------------------------- who gets refused, and how they hear it


def test_a_client_without_the_key_gets_unauthorized_within_seconds(cluster: Cluster) -> None:
    node = cluster.add("locked", [*LOOPBACK, "--model", "echo"])
    with Client(node.address, security=Plaintext(), timeout=30) as client:
        t0 = time.monotonic()
        with pytest.raises(Unauthorized) as info:
            client.request("echo", "complete", "let me in")
        assert time.monotonic() - t0 < 5, "a missing key must not wait for the deadline"
    assert "mesh key" in str(info.value) and "--insecure" in str(info.value)
    # The node counts plaintext peers. A client that closes at once can race its own refusal (its RST may reach the
    # node before the node has read its greeting: no protocol error to count), so count one that stays, as a
    # misconfigured client does: ZeroMQ keeps re-connecting it.
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{node.address}")
    try:
        sock.send(b"let me in")
        try:
            _eventually(lambda: _security(node)["handshake_failed"] >= 1, what="the refusal being counted")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log_tail()}") from None
    finally:
        sock.close(0)
    assert _stats(node).get("requests_in", 0) == 0


def test_a_client_with_another_mesh_key_gets_unauthorized(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.add("locked", [*LOOPBACK, "--model", "echo"])
    other = MeshKey.generate().write(tmp_path / "other.key")
    with Client(node.address, security=MeshKey.load(other), timeout=30) as client:
        with pytest.raises(Unauthorized, match="mesh key"):
            client.request("echo", "complete", "x")
    out = lanmesh("request", "echo", "x", "--node", node.address, "--key-file", str(other), "--timeout", "20")
    assert out.returncode == 1 and "Unauthorized" in out.stderr and "Traceback" not in out.stderr
    assert _stats(node).get("requests_in", 0) == 0


def test_a_peer_knowing_the_public_key_but_not_the_secret_is_refused_by_zap_and_logged(
    cluster: Cluster, keyed: Path
) -> None:
    node = cluster.add("locked", [*LOOPBACK, "--model", "echo"])
    mesh = MeshKey.load(keyed)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = mesh.public  # it learned the public key somehow; the secret stays ours
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.connect(f"tcp://{node.address}")
    try:
        sock.send(encode(Request("sneak", "echo", Task.COMPLETE, "x")), zmq.NOBLOCK)
    except zmq.Again:
        pass  # expected: the handshake never completes, so nothing can even be queued
    assert not sock.poll(1500)
    sock.close(0)
    _eventually(lambda: _security(node)["auth_rejected"] >= 1, what="the ZAP refusal being counted")
    log = node.log_path.read_text()
    assert "auth_rejected" in log and "127.0.0.1" in log and "client key is not the mesh key" in log
    assert _stats(node).get("requests_in", 0) == 0


def test_a_node_with_another_key_cannot_join_through_a_seed(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "echo"])
    other = MeshKey.generate().write(tmp_path / "rogue.key")
    rogue = cluster.add("rogue", [*LOOPBACK, "--model", "echo", "--peer", a.address], key_file=other)
    _eventually(lambda: _security(a)["handshake_failed"] >= 2, what="the rogue's attempts being counted")
    time.sleep(1.5)  # give a would-be join every chance (gossip runs every 250 ms)
    assert [r["node"] for r in a.status()] == ["a"]
    assert [r["node"] for r in rogue.status()] == ["rogue"]
    with Client(a.address, timeout=10) as client:
        assert client.request("echo", "complete", "still mine").node == "a"


# ----------------------------------------------------------------- limits


def test_request_limits_answer_bad_request_and_the_node_keeps_serving(cluster: Cluster) -> None:
    limits = ["--max-prompt-chars", "100", "--max-tokens", "50", "--max-embed-inputs", "4"]
    node = cluster.add("strict", [*LOOPBACK, "--model", "echo", *limits])
    with Client(node.address, timeout=10) as client:
        with pytest.raises(BadRequest, match="101 characters"):
            client.complete("echo", "x" * 101)
        with pytest.raises(BadRequest, match="max_tokens 51"):
            client.complete("echo", "x", max_tokens=51)
        with pytest.raises(BadRequest, match="5 inputs to embed"):
            client.request("echo", "embed", ["a"] * 5)
        with pytest.raises(BadRequest, match="characters"):
            client.chat("echo", [{"role": "user", "content": "y" * 60}] * 2)
        assert client.complete("echo", "x" * 100, max_tokens=50).output == "x" * 100
    assert _stats(node)["limit_refused"] == 4


def test_one_client_flooding_gets_overloaded_and_no_slot_leaks(cluster: Cluster) -> None:
    node = cluster.add("capped", [*LOOPBACK, "--model", "sleep:150:cap=2", "--max-inflight-per-client", "8"])
    flood = _dealer(node.address, MeshKey.load(os.environ[KEY_ENV]))
    polite = _dealer(node.address, MeshKey.load(os.environ[KEY_ENV]))
    try:
        for i in range(30):
            flood.send(encode(Request(f"f{i}", "sleep:150", Task.COMPLETE, f"{i}", deadline_ms=20_000)))
        # Another connection is not held back by the flood's cap.
        polite.send(encode(Request("p", "sleep:150", Task.COMPLETE, "p", deadline_ms=20_000)))
        got = [_recv(flood, 15) for _ in range(30)]
        assert isinstance(_recv(polite, 15), Reply)
    finally:
        flood.close(0)
        polite.close(0)
    served = [m for m in got if isinstance(m, Reply)]
    refused = [m for m in got if isinstance(m, Error) and m.code is ErrorCode.OVERLOADED]
    assert len(served) + len(refused) == 30
    assert 8 <= len(served) < 30 and refused, (len(served), len(refused))
    assert "requests in flight" in refused[0].message
    _eventually(lambda: node.status()[0]["models"]["sleep:150"][:2] == [0, 0], what="the queue draining")
    with Client(node.address, timeout=20) as client:  # every slot came back
        futures = [client.submit("sleep:150", "complete", f"again {i}") for i in range(8)]
        assert sorted(f.result(20).output for f in futures) == sorted(f"again {i}" for i in range(8))


# ----------------------------------------------------------------- hostile frames


def _raw(body: Any) -> bytes:
    return bytes([VERSION]) + msgpack.packb(body, use_bin_type=True)


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_oversized_deep_huge_and_mistyped_frames_are_refused_cleanly(cluster: Cluster) -> None:
    node = cluster.add("target", [*LOOPBACK, "--model", "echo"])
    key = MeshKey.load(os.environ[KEY_ENV])
    sock = _dealer(node.address, key)
    answerable = {
        # Each names its request id, so the node can say what is wrong with it.
        "deep": [1, "deep", "echo", "infer", _nested(40)],
        "many-texts": [1, "many-texts", "echo", "embed", ["t"] * 300],
        "id-type": [1, "id-type", ["echo"], "complete", "x"],
        "deadline-type": [1, "deadline-type", "echo", "complete", "x", {}, "soon"],
        "params-type": [1, "params-type", "echo", "complete", "x", ["max_tokens", 5]],
        "stream-type": [1, "stream-type", "echo", "complete", "x", {}, 1000, 0, 0, "", "yes"],
        "require-type": [1, "require-type", "echo", "complete", "x", {}, 1000, 0, 0, "", False, {"gpu": 1}],
        "hops-range": [1, "hops-range", "echo", "complete", "x", {}, 1000, 0, 99],
        "chat-shape": [1, "chat-shape", "echo", "chat", [{"role": "wizard", "content": "x"}]],
        "not-here": [2, "not-here", "out", "n"],  # a Reply sent to a node's ROUTER
    }
    silent = [
        _raw([1, "huge", "echo", "infer", list(range(200_000))]),  # over max_array_len: refused while parsing
        _raw([1, "wide", "echo", "infer", {str(i): i for i in range(20_000)}]),  # over max_map_len
        bytes([VERSION]) + b"\xc7\x01\x05x",  # a msgpack ext type
        bytes([VERSION]) + b"\xdd\xff\xff\xff\xff",  # claims 4 billion array items, has none
        bytes([VERSION]) + b"\x91" * 100_000 + b"\xc0",  # nesting deeper than msgpack itself allows
        bytes([99]) + msgpack.packb([1, "v", "echo", "complete", "x"]),  # an unknown protocol version
        b"",
        encode(LoadReport("fake", 1, 1, PeerAddr("fake", "127.0.0.1", 1, 2))),  # gossip belongs on PUB/SUB
    ]
    before = _stats(node).get("bad_frames", 0)
    try:
        for frame in silent:
            sock.send(frame)
        sock.send_multipart([b"two", b"frames"])
        for body in answerable.values():
            sock.send(_raw(body))
        answers = {}
        for _ in answerable:
            msg = _recv(sock)
            assert isinstance(msg, Error), msg
            answers[msg.id] = msg
        assert set(answers) == set(answerable)
        assert all(a.code is ErrorCode.BAD_REQUEST for a in answers.values())
        assert "deeper than 32" in answers["deep"].message
        assert "300 inputs" in answers["many-texts"].message
        assert not sock.poll(300), "frames without a readable request id get no answer"
        # An oversized frame is cut off by the socket (MAXMSGSIZE) before Python sees it; the connection
        # is dropped and comes back.
        sock.send(encode(Request("huge-prompt", "echo", Task.COMPLETE, "x" * (9 * 1024 * 1024))))
        assert not sock.poll(500)
    finally:
        sock.close(0)
    assert _stats(node)["bad_frames"] - before >= len(silent) + 1 + len(answerable) - 1
    with Client(node.address, timeout=10) as client:
        assert client.request("echo", "complete", "unharmed").output == "unharmed"
    assert node.alive()


def test_a_replayed_request_id_in_flight_is_refused_not_run_twice(cluster: Cluster) -> None:
    node = cluster.add("target", [*LOOPBACK, "--model", "sleep:300:cap=2"])
    sock = _dealer(node.address, MeshKey.load(os.environ[KEY_ENV]))
    rid = uuid.uuid4().hex
    try:
        sock.send(encode(Request(rid, "sleep:300", Task.COMPLETE, "once")))
        sock.send(encode(Request(rid, "sleep:300", Task.COMPLETE, "twice")))
        first, second = _recv(sock), _recv(sock)
    finally:
        sock.close(0)
    kinds = sorted(type(m).__name__ for m in (first, second))
    assert kinds == ["Error", "Reply"]
    assert node.status()[0]["executor"]["sleep:300"]["batched_requests"] == 1
