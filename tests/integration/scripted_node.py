"""A scripted stand-in for a lanmesh node: a real ROUTER on 127.0.0.1 that answers by rule, for client tests.

What a request gets depends on its model name:
  echo            Reply(output=input)
  say             chat: Reply({"role": "assistant", "content": last message}); complete: Reply(prompt);
                  the request's params come back in meta["params"]
  embed:DIM       one vector of DIM floats per input text
  slow:MS         Reply(output=input) after MS milliseconds
  never           no answer at all
  error:NAME      Error with ErrorCode[NAME]
  reject          Reject(queue=7)
  garbage         a Reply frame whose meta is not a map (undecodable, but it carries the request id)
  stream:N[:MS]   words "w0 " .. "w{N-1} " as chunks MS ms apart (default 0), then Reply(full text); a request
                  with a prefix continues after the words in it (and is refused if the prefix is not those words);
                  one asking for max_tokens below N gets that many words and meta finish_reason "length"
  stream-dup:N    as stream:N, but every chunk is sent twice
The node-wide `mode` overrides that: `hold` never answers requests, `reject` rejects them all, `unavailable`
answers UNAVAILABLE. A Ping is always answered; its status is the node's own row, {"node": name, "address":
"127.0.0.1:PORT", "state": "self", "held": n, "requests": n, "cancels": [[id, reason], ...]}, then one row per
`peers` entry (`{"node", "address", "state"}`: what a client learns the mesh from). A `Cancel` is recorded (every
one, in order, as are the ids of the requests received: `ids`) and drops what is still to be sent for it.

Run in a thread (`ScriptedNode`) or as a subprocess that can be killed or stopped (`SpawnedNode`;
`python scripted_node.py --name A --mode hold --port 0` prints the bound port on its first line).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

import protocol
from protocol import Cancel, Chunk, Error, ErrorCode, Ping, Pong, Reject, Reply, Request

REPO_ROOT = Path(__file__).resolve().parents[2]
MODES = ("serve", "hold", "reject", "unavailable")


class ScriptedRouter:
    """The node's socket and its rules; `serve_forever` runs until `stop` is set."""

    def __init__(
        self, name: str, mode: str = "serve", port: int = 0, peers: list[dict[str, str]] | None = None
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.name = name
        self.mode = mode
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.port = int(self.sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.requests = 0
        self.held = 0
        self.ids: list[str] = []  # every request id received, in order
        self.cancels: list[tuple[str, str]] = []  # every Cancel received: (request id, reason)
        self.peers = list(peers or [])
        self._later: list[tuple[float, int, bytes, bytes]] = []
        self._seq = itertools.count()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        try:
            while stop is None or not stop.is_set():
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    _, _, ident, frame = heapq.heappop(self._later)
                    self._send(ident, frame)
                wait_ms = 20 if stop is not None else 1000
                if self._later:
                    wait_ms = min(wait_ms, max(0, int((self._later[0][0] - now) * 1000) + 1))
                if poller.poll(wait_ms):
                    while True:
                        try:
                            ident, frame = self.sock.recv_multipart(zmq.DONTWAIT)
                        except zmq.Again:
                            break
                        self._handle(ident, frame)
        finally:
            self.sock.close(0)
            self.ctx.term()

    def own_row(self) -> dict[str, Any]:
        return {
            "node": self.name, "address": f"127.0.0.1:{self.port}", "state": "self", "held": self.held,
            "requests": self.requests, "cancels": [list(c) for c in self.cancels[-256:]],
        }  # fmt: skip

    def _send(self, ident: bytes, frame: bytes) -> None:
        try:
            self.sock.send_multipart([ident, frame], zmq.DONTWAIT)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client went away; a real node drops the reply too
            if exc.errno != zmq.EHOSTUNREACH:
                raise

    def _at(self, when: float, ident: bytes, msg: protocol.Message) -> None:
        heapq.heappush(self._later, (when, next(self._seq), ident, protocol.encode(msg)))

    def _handle(self, ident: bytes, frame: bytes) -> None:
        msg = protocol.decode(frame)
        if isinstance(msg, Ping):
            status = [self.own_row(), *self.peers]
            self._send(ident, protocol.encode(Pong(msg.id, self.name, status if msg.want_status else None)))
            return
        if isinstance(msg, Cancel):
            self.cancels.append((msg.id, msg.reason))
            self._later = [item for item in self._later if getattr(protocol.decode(item[3]), "id", "") != msg.id]
            heapq.heapify(self._later)
            return
        assert isinstance(msg, Request), msg
        self.requests += 1
        self.ids.append(msg.id)
        reply = self._answer(ident, msg)
        if reply is not None:
            self._send(ident, reply if isinstance(reply, bytes) else protocol.encode(reply))

    def _answer(self, ident: bytes, req: Request) -> protocol.Message | bytes | None:
        if self.mode == "hold":
            self.held += 1
            return None
        if self.mode == "reject":
            return Reject(req.id, self.name, 7, "scripted: queue full")
        if self.mode == "unavailable":
            return Error(req.id, ErrorCode.UNAVAILABLE, "scripted: shutting down", self.name)
        kind, _, arg = req.model.partition(":")
        if kind == "echo":
            return Reply(req.id, req.input, self.name, "local", 0, {"usage": {"total_tokens": 1}})
        if kind == "say":
            said = req.input[-1]["content"] if isinstance(req.input, list) else req.input
            output = {"role": "assistant", "content": said} if isinstance(req.input, list) else said
            return Reply(req.id, output, self.name, "local", 0, {"params": req.params})
        if kind == "embed":
            return Reply(req.id, [[float(len(t))] * int(arg) for t in req.input], self.name, "local")
        if kind == "slow":
            self._at(time.monotonic() + int(arg) / 1000, ident, Reply(req.id, req.input, self.name, "local"))
            return None
        if kind == "never":
            self.held += 1
            return None
        if kind == "error":
            return Error(req.id, ErrorCode[arg], f"scripted {arg}", self.name, 3)
        if kind == "reject":
            return Reject(req.id, self.name, 7, "scripted: queue full")
        if kind == "garbage":
            return bytes([protocol.VERSION]) + msgpack.packb([2, req.id, "x", self.name, "", 0, "not-a-map"])
        if kind in ("stream", "stream-dup"):
            self._stream(ident, req, arg, twice=kind == "stream-dup")
            return None
        return Error(req.id, ErrorCode.UNKNOWN_MODEL, f"scripted node has no model {req.model!r}", self.name)

    def _stream(self, ident: bytes, req: Request, arg: str, *, twice: bool) -> None:
        count_s, _, gap_s = arg.partition(":")
        words = [f"w{i} " for i in range(int(count_s))]
        limit = req.params.get("max_tokens") if isinstance(req.params, dict) else None
        meta: dict[str, Any] = {"usage": {"completion_tokens": 1}}
        if isinstance(limit, int) and limit < len(words):
            words = words[:limit]
            meta = {"usage": {"completion_tokens": limit}, "finish_reason": "length"}
        done = req.prefix.split()
        if [w + " " for w in done] != words[: len(done)]:
            self._send(ident, protocol.encode(Error(req.id, ErrorCode.BAD_REQUEST, "prefix mismatch", self.name)))
            return
        gap = int(gap_s or 0) / 1000
        t = time.monotonic()
        for seq, word in enumerate(words[len(done) :]):
            for _ in range(2 if twice else 1):
                self._at(t, ident, Chunk(req.id, seq, word, self.name, "local"))
            t += gap
        self._at(t, ident, Reply(req.id, "".join(words), self.name, "local", 0, meta))


class ScriptedNode:
    """A scripted node on a thread (for tests that do not kill it)."""

    def __init__(self, name: str = "T", mode: str = "serve", peers: list[dict[str, str]] | None = None) -> None:
        self.router = ScriptedRouter(name, mode, peers=peers)
        self.endpoint = self.router.endpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.router.serve_forever, args=(self._stop,), daemon=True)

    def __enter__(self) -> ScriptedNode:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive(), "scripted node thread did not stop"


class SpawnedNode:
    """A scripted node in its own process, so a test can `kill -9` or SIGSTOP it by PID."""

    def __init__(self, name: str, mode: str = "serve", port: int = 0) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        cmd = [sys.executable, __file__, "--name", name, "--mode", mode, "--port", str(port)]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        self.stopped = False
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.strip().isdigit():
            self.kill()
            raise RuntimeError(f"scripted node {name} did not start (said {line!r})")
        self.port = int(line)
        self.endpoint = f"tcp://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def __enter__(self) -> SpawnedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stopped and self.proc.poll() is None:
            self.resume()
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def node_status(endpoint: str, timeout: float = 2.0) -> dict[str, Any]:
    """Ask one node directly (a bare DEALER, not the client under test) for its scripted counters."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(protocol.encode(Ping("status-probe", "test", True)))
        if not sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"{endpoint} did not answer a status ping within {timeout}s")
        pong = protocol.decode(sock.recv())
        assert isinstance(pong, Pong) and pong.status, pong
        return pong.status[0]
    finally:
        sock.close(0)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` every 10 ms until it holds; fail saying `what` was awaited once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def closed_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range.

    A client retrying a connection to a closed port in the ephemeral range can, now and then, be given
    that very port as its own source port and connect to itself (TCP simultaneous open): the handshake
    then fails as if a node had refused it. Below the range that cannot happen.
    """
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for port in random.sample(range(20_000, min(low, 32_768)), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no closed port found below the ephemeral range")


def free_port() -> int:
    """A port nothing listens on right now (for a node a test starts later at a known address)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind("tcp://127.0.0.1:0")
        return int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    finally:
        sock.close(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="S")
    parser.add_argument("--mode", default="serve", choices=MODES)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    router = ScriptedRouter(args.name, args.mode, args.port)
    print(router.port, flush=True)
    router.serve_forever()


if __name__ == "__main__":
    main()
