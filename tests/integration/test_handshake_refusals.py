"""`handshake_failed` counts refusals, not clients that leave early: a connection that closes mid-handshake is
normal on a LAN (short-lived clients, port scans, health probes), a plaintext or wrong-key peer is not."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from bench.procs import Cluster, NodeProc
from mesh import Client
from tests.conftest import LOOPBACK

# A ZMTP 3.0 greeting offering the NULL mechanism (no key): a CURVE node refuses it as a protocol error.
PLAINTEXT_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)


def _security(node: NodeProc) -> dict[str, Any]:
    return node.status()[0]["security"]  # type: ignore[no-any-return]


def _connect(node: NodeProc) -> socket.socket:
    host, port = node.address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def test_clients_closing_mid_handshake_are_not_refusals_but_a_plaintext_peer_is(cluster: Cluster, keyed: Path) -> None:
    node = cluster.add("counted", [*LOOPBACK, "--model", "echo"])
    for i in range(300):  # bounded: 300 connections, each closed at once or after half a greeting
        with _connect(node) as sock:
            if i % 2:
                sock.sendall(PLAINTEXT_GREETING[:10])
    for _ in range(20):  # real clients with the key that come and go
        with Client(node.address, timeout=10) as client:
            client.ping()
    with _connect(node) as sock:
        sock.sendall(PLAINTEXT_GREETING)
        sock.settimeout(5)
        try:
            while sock.recv(4096):  # the node answers its own greeting, then closes on the mismatch
                pass
        except ConnectionResetError:
            pass
    # One monitor socket carries all of these in order: once the plaintext peer is counted, so is everything before.
    end = time.monotonic() + 10
    while _security(node)["handshake_failed"] < 1:
        assert time.monotonic() < end, "the plaintext peer was never counted"
        time.sleep(0.05)
    assert _security(node)["handshake_failed"] == 1
    log = node.log_path.read_text()
    assert "handshake_failed: plaintext or wrong-key peer" in log
    assert "unknown peer (libzmq does not say)" in log  # and not a made-up address
