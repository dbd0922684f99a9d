"""Fuzzing a live node's ROUTER: 100,000 random and mutated frames, with valid requests interleaved throughout.

The node must stay up, keep answering valid requests correctly, give back every queue slot and not grow its
memory. The frames come from a seeded mutator over valid frames (set LANMESH_FUZZ_SEED to replay a run,
LANMESH_FUZZ_FRAMES to change the count): byte-level damage, msgpack-level field swaps, lying length headers,
deep nesting, huge containers, multi-part messages.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from bench.procs import Cluster, NodeProc
from mesh import KEY_ENV, MeshKey
from protocol import (
    VERSION,
    Chunk,
    Error,
    ErrorCode,
    Hello,
    Leave,
    LoadReport,
    ModelLoad,
    PeerAddr,
    Ping,
    Reject,
    Reply,
    Request,
    Task,
    decode,
    encode,
)
from tests.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(300)

FRAMES = int(os.environ.get("LANMESH_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("LANMESH_FUZZ_SEED", "20261130"))
PROBE_EVERY = 250  # fuzz frames between two valid requests
RSS_GROWTH_LIMIT = 30 * 1024 * 1024


def _corpus(fingerprint: str) -> list[bytes]:
    """Valid frames of every message type, as a peer or client would send them (Hellos with our fingerprint
    are learned: their mutations probe what a claim can make a node hold)."""
    addr = PeerAddr("peer-1", "127.0.0.1", 7000, 7001)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    msgs: list[Any] = [
        Request("c1", "echo", Task.COMPLETE, "complete me", {"max_tokens": 16, "temperature": 0.5}),
        Request("c2", "echo", Task.CHAT, chat, stream=True, deadline_ms=5000),
        Request("c3", "echo", Task.EMBED, ["one", "two", "three"]),
        Request("c4", "echo", Task.INFER, {"x": [1, 2.5, None, True, "s"], "y": {"z": b"bytes"}}),
        Request("c5", "echo", Task.COMPLETE, "fwd", hops=1, origin="peer-1", prefix="pre"),
        Request("c6", "echo", Task.COMPLETE, "labels", require={"gpu": "true"}, priority=9, deadline_ms=300),
        Request("c7", "no-such-model", Task.COMPLETE, "x"),
        Ping("p1", "fuzzer"),
        Ping("p2", "fuzzer", want_status=True),
        Hello(addr, 12345, "f" * 32),
        Hello(addr, 12345, fingerprint),
        Hello(PeerAddr("peer-2", "127.0.0.1", 7002, 7003), 1, ""),
        LoadReport("peer-1", 1, 2, addr, {"echo": ModelLoad(1, 2, 8)}, {"room": "lab"}, (addr,), False, ""),
        Leave("peer-1", 1),
        Reply("r1", "out", "peer-1", "local", 0, {"usage": {"total_tokens": 3}}),
        Chunk("r1", 0, "piece", "peer-1"),
        Error("r1", ErrorCode.OVERLOADED, "busy", "peer-1", 4),
        Reject("r1", "peer-1", 9, "full"),
    ]
    return [encode(m) for m in msgs]


class Mutator:
    """Seeded frame damage: each call returns one frame (or a multi-part message) to send."""

    def __init__(self, seed: int, fingerprint: str) -> None:
        self.rng = random.Random(seed)
        self.corpus = _corpus(fingerprint)
        self.bodies = [msgpack.unpackb(f[1:], raw=False) for f in self.corpus]
        self.ops: list[Callable[[], bytes | list[bytes]]] = [
            self.flip_bits,
            self.flip_bits,
            self.overwrite_bytes,
            self.insert_bytes,
            self.delete_span,
            self.truncate,
            self.splice,
            self.random_bytes,
            self.swap_field,
            self.swap_field,
            self.swap_field,
            self.drop_or_add_fields,
            self.lying_header,
            self.deep_nesting,
            self.wide_container,
            self.multipart,
        ]

    def __call__(self) -> bytes | list[bytes]:
        return self.rng.choice(self.ops)()

    def _frame(self) -> bytearray:
        return bytearray(self.rng.choice(self.corpus))

    def flip_bits(self) -> bytes:
        f = self._frame()
        for _ in range(self.rng.randint(1, 8)):
            i = self.rng.randrange(len(f))
            f[i] ^= 1 << self.rng.randrange(8)
        return bytes(f)

    def overwrite_bytes(self) -> bytes:
        f = self._frame()
        for _ in range(self.rng.randint(1, 4)):
            f[self.rng.randrange(len(f))] = self.rng.choice([0x00, 0xFF, 0xC1, 0xDC, 0xDD, 0xDE, 0xDF, 0x7F, 0x80])
        return bytes(f)

    def insert_bytes(self) -> bytes:
        f = self._frame()
        i = self.rng.randrange(len(f) + 1)
        return bytes(f[:i] + self.rng.randbytes(self.rng.randint(1, 16)) + f[i:])

    def delete_span(self) -> bytes:
        f = self._frame()
        i = self.rng.randrange(len(f))
        return bytes(f[:i] + f[i + self.rng.randint(1, 8) :])

    def truncate(self) -> bytes:
        f = self._frame()
        return bytes(f[: self.rng.randrange(len(f))])

    def splice(self) -> bytes:
        a, b = self._frame(), self._frame()
        return bytes(a[: self.rng.randrange(len(a))] + b[self.rng.randrange(len(b)) :])

    def random_bytes(self) -> bytes:
        head = bytes([VERSION]) if self.rng.random() < 0.7 else b""
        return head + self.rng.randbytes(self.rng.randint(0, 200))

    def _value(self, depth: int = 0) -> Any:
        r = self.rng.random()
        pick = self.rng.choice
        if depth > 3 or r < 0.55:
            return pick(
                [
                    None, True, False, 0, -1, 2**31, -(2**63), 2**64 - 1, 1.5, float("nan"), float("inf"),
                    "", "echo", "x" * self.rng.randint(0, 300), "\u2603\U0001f680", b"\x00\xff",
                    self.rng.randint(-(2**63), 2**64 - 1),
                ]
            )  # fmt: skip
        if r < 0.8:
            return [self._value(depth + 1) for _ in range(self.rng.randint(0, 6))]
        keys: list[Any] = ["role", "content", "max_tokens", "", "k"]
        return {pick(keys): self._value(depth + 1) for _ in range(self.rng.randint(0, 5))}

    def _pack(self, body: Any) -> bytes:
        version = VERSION if self.rng.random() < 0.95 else self.rng.randrange(256)
        return bytes([version]) + msgpack.packb(body, use_bin_type=True)

    def swap_field(self) -> bytes:
        body = list(self.rng.choice(self.bodies))
        i = self.rng.randrange(len(body))
        body[i] = self._value()
        return self._pack(body)

    def drop_or_add_fields(self) -> bytes:
        body = list(self.rng.choice(self.bodies))
        if self.rng.random() < 0.5:
            body = body[: self.rng.randrange(len(body) + 1)]
        else:
            body += [self._value() for _ in range(self.rng.randint(1, 5))]
        return self._pack(body)

    def lying_header(self) -> bytes:
        """A container or string header that claims far more than follows."""
        kind = self.rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xdc", b"\xde", b"\xda", b"\xc5"])
        big = 4 if kind in (b"\xdd", b"\xdf", b"\xdb", b"\xc6") else 2
        size = self.rng.choice([2 ** (8 * big) - 1, 1 << (8 * big - 1), 100_001, 10_001])
        size = min(size, 2 ** (8 * big) - 1)
        count = struct.pack(">I" if big == 4 else ">H", size)
        inner = kind + count + self.rng.randbytes(self.rng.randint(0, 32))
        return bytes([VERSION]) + b"\x95\x01\xa2id\xa4echo\xa5infer" + inner

    def deep_nesting(self) -> bytes:
        depth = self.rng.choice([33, 64, 500, 5000])
        if self.rng.random() < 0.5:
            return bytes([VERSION]) + b"\x95\x01\xa2dn\xa4echo\xa5infer" + b"\x91" * depth + b"\xc0"
        return bytes([VERSION]) + b"\x95\x01\xa2dn\xa4echo\xa5infer" + b"\x81\xa1k" * depth + b"\xc0"

    def wide_container(self) -> bytes:
        n = self.rng.choice([1000, 50_000, 100_001])
        if self.rng.random() < 0.5:
            return self._pack([1, "wide", "echo", "embed", ["t"] * n])
        return self._pack([1, "wide", "echo", "infer", {str(i): i for i in range(min(n, 12_000))}])

    def multipart(self) -> list[bytes]:
        return [bytes(self._frame()) for _ in range(self.rng.randint(2, 3))]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Probe:
    """Valid requests on a connection of their own; each must come back right, and in time."""

    def __init__(self, address: str, key: MeshKey) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        key.configure_client(self.sock)
        self.sock.connect(f"tcp://{address}")
        self.n = 0
        self.worst = 0.0

    def check(self) -> None:
        self.n += 1
        rid = f"probe-{self.n}"
        kind = self.n % 3
        if kind == 0:
            req = Request(rid, "echo", Task.COMPLETE, f"valid {self.n}", deadline_ms=10_000)
        elif kind == 1:
            req = Request(rid, "echo", Task.CHAT, [{"role": "user", "content": f"valid {self.n}"}], deadline_ms=10_000)
        else:
            req = Request(rid, "echo", Task.COMPLETE, f"valid {self.n}", stream=True, deadline_ms=10_000)
        t0 = time.monotonic()
        self.sock.send(encode(req))
        while True:
            assert self.sock.poll(10_000), f"probe {rid} got no answer while fuzzing"
            msg = decode(self.sock.recv())
            if isinstance(msg, Chunk):
                continue
            assert isinstance(msg, Reply) and msg.id == rid, f"probe {rid} answered with {msg}"
            text = msg.output if isinstance(msg.output, str) else msg.output.get("content")
            assert text == f"valid {self.n}", msg
            break
        self.worst = max(self.worst, time.monotonic() - t0)

    def close(self) -> None:
        self.sock.close(0)


def _drain(sock: zmq.Socket[bytes]) -> int:
    n = 0
    while sock.poll(0):
        sock.recv()
        n += 1
    return n


def test_a_node_survives_100k_fuzzed_frames_and_answers_valid_requests_throughout(
    cluster: Cluster, keyed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node: NodeProc = cluster.add("fuzzed", [*LOOPBACK, "--model", "echo"])
    key = MeshKey.load(os.environ[KEY_ENV])
    probe = Probe(node.address, key)
    fuzz: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    fuzz.setsockopt(zmq.LINGER, 0)
    fuzz.setsockopt(zmq.SNDHWM, 2000)
    fuzz.setsockopt(zmq.SNDTIMEO, 10_000)  # a node that stops reading fails the test instead of hanging it
    key.configure_client(fuzz)
    fuzz.connect(f"tcp://{node.address}")
    mutate = Mutator(SEED, key.fingerprint)
    try:
        for _ in range(200):  # warm up: caches, connections, the allocator's working set
            probe.check()
        rss_before = _rss(node.pid)
        bad_before = node.status()[0]["stats"].get("bad_frames", 0)
        t0 = time.monotonic()
        answers = 0
        for i in range(FRAMES):
            frame = mutate()
            if isinstance(frame, list):
                fuzz.send_multipart(frame)
            else:
                fuzz.send(frame)
            if i % PROBE_EVERY == PROBE_EVERY - 1:
                probe.check()
                answers += _drain(fuzz)
                assert node.alive(), f"the node died after {i + 1} fuzz frames (seed {SEED})\n{node.log_tail()}"
        fuzz_seconds = time.monotonic() - t0
        # A few oversized frames: cut off by the socket (MAXMSGSIZE), the fuzzer's connection is dropped.
        for _ in range(3):
            fuzz.send(bytes([VERSION]) + b"\xc6" + struct.pack(">I", 9 << 20) + bytes(9 << 20))
        probe.check()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            answers += _drain(fuzz)
            status = node.status()
            if status[0]["models"]["echo"][:2] == [0, 0] and not any(r["state"] == "alive" for r in status[1:]):
                break
            time.sleep(0.1)
        for _ in range(50):
            probe.check()
        rss_after = _rss(node.pid)
        status = node.status()
    finally:
        fuzz.close(0)
        probe.close()
    me = status[0]
    assert node.alive()
    assert me["models"]["echo"][:2] == [0, 0], "a queue slot leaked"
    assert len(status) <= 1 + 64, "claims in fuzzed Hellos made the node hold unbounded peers"
    bad = me["stats"].get("bad_frames", 0) - bad_before
    growth = rss_after - rss_before
    with capsys.disabled():
        print(
            f"\nfuzz: {FRAMES} frames (seed {SEED}) in {fuzz_seconds:.1f}s, {probe.n} valid probes "
            f"(worst {probe.worst * 1000:.0f} ms), {bad} counted bad, {answers} answers to the fuzzer, "
            f"{len(status) - 1} peers held; node RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB "
            f"({growth / 2**20:+.1f} MiB); crashes: 0"
        )
    assert bad > FRAMES // 2, "most fuzz frames should be refused"
    assert growth < RSS_GROWTH_LIMIT, f"node RSS grew by {growth / 2**20:.1f} MiB over {FRAMES} fuzz frames"
