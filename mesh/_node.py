"""The mesh loop of one node: its sockets, gossip, routing, forwarding and failover.

One thread owns every socket and runs a plain `zmq.Poller` loop (zmq.asyncio
costs about 2x per request). Policy lives elsewhere (`_routing`, `_failure`);
this module only carries out what they decide.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import (
    DEFAULT_LIMITS,
    Chunk,
    DecodeError,
    Error,
    ErrorCode,
    Hello,
    Leave,
    Limits,
    LoadReport,
    ModelLoad,
    PeerAddr,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    decode,
    encode,
)

from ._failure import FORGOTTEN, FailureDetector, PeerState, Transition
from ._peers import Peer, PeerTable
from ._routing import POLICIES
from ._security import Authenticator, MeshKey, Plaintext, RejectionLog, RequestLimits, same_host, valid_peer_host

log = logging.getLogger("lanmesh.mesh")

_RETRYABLE = frozenset({ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL})
_NOBODY: frozenset[str] = frozenset()
_PEER_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
_TICK = 0.05  # seconds between housekeeping passes (detector, deadlines, retries)
_MAX_UNVERIFIED_PEERS = 64  # peers learned from claims (Hello, mDNS, digests) whose own gossip has not arrived yet


def _readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message is waiting (cheaper than a recv that raises zmq.Again)."""
    return bool(cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN)


def _bound_port(sock: zmq.Socket[Any]) -> int:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


class LocalServer(Protocol):
    """What the mesh needs of the models on this node (the node's executor)."""

    labels: dict[str, str]

    def serves(self, model: str) -> bool: ...
    def models(self) -> dict[str, ModelLoad]: ...
    def load(self, model: str) -> tuple[int, int]: ...
    def queue_length(self, model: str) -> int: ...
    def stats(self) -> dict[str, dict[str, int]]: ...
    def submit(
        self, request: Request, deadline: float, on_chunk: Callable[..., None], on_done: Callable[..., None]
    ) -> bool: ...


class RequestObserver(Protocol):
    """Told about every request this node answers (metrics). Called on the mesh loop: keep it cheap.

    `where`: `local` (this node was the entry and served it), `forwarded` (the entry sent it to a peer),
    `peer` (served here for another entry node). `outcome`: `ok` or the error code's name in lower case.
    """

    def completed(self, model: str, outcome: str, where: str, seconds: float) -> None: ...
    def first_chunk(self, model: str, seconds: float) -> None: ...


@dataclass(slots=True)
class Pending:
    """A request this node took from a client and is getting served somewhere."""

    client: bytes
    request: Request
    deadline: float
    target: str = ""
    route: str = ""
    tries: int = 0
    outstanding: set[str] = field(default_factory=set)  # peers counted in the policy for it
    excluded: set[str] = field(default_factory=set)
    try_started: float = 0.0
    retry_at: float = 0.0  # > 0: waiting out a backoff before the next draw
    rounds: int = 0
    seq: int = 0  # next chunk number towards the client
    streamed: list[str] = field(default_factory=list)
    refused: bool = False  # some node said it was too busy
    started: float = 0.0  # monotonic, when the request arrived here


@dataclass
class MeshSettings:
    """The mesh-layer part of a node's configuration (filled from `NodeConfig`)."""

    node_id: str
    bind: str = "0.0.0.0"
    port: int = 5555
    pub_port: int = 0  # 0: port + 1
    advertise: str = "127.0.0.1"
    seeds: Sequence[str] = ()
    mdns: bool = True
    interfaces: list[str] | None = None
    gossip_interval: float = 0.25
    suspect_after: float = 1.0
    dead_after: float = 3.0
    forget_after: float = 300.0
    try_timeout: float = 30.0
    max_tries: int = 4
    fingerprint: str = ""
    limits: Limits = DEFAULT_LIMITS
    hwm: int = 20_000
    routing: str = "p2c"  # or a baseline for benchmarks: round-robin, random, least-loaded
    key: MeshKey | None = None  # None: an open mesh (plaintext, anyone may join); see _security.py
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    max_inflight_per_client: int = 1024  # requests one client connection may have here at once
    max_inflight_per_peer: int = 2048  # requests one peer may have forwarded here at once


class MeshNode:
    """Runs the mesh loop for one node in a thread of its own."""

    def __init__(self, server: LocalServer, settings: MeshSettings, rng: random.Random | None = None) -> None:
        self.server = server
        self.s = settings
        self.node_id = settings.node_id
        self.incarnation = time.time_ns()
        self.ctx = zmq.Context()
        self.detector = FailureDetector(settings.suspect_after, settings.dead_after, settings.forget_after)
        policy_class = POLICIES[settings.routing]
        self.policy = policy_class(
            self.node_id,
            server.load,
            stale_after=3 * settings.gossip_interval,
            rng=rng,
            local_rate=getattr(server, "rate", None),
        )
        self.peers = PeerTable()
        self.pending: dict[str, Pending] = {}
        # request id -> (reply-to, route, first chunk seq, arrival time, where), for work running here
        self.local: dict[str, tuple[bytes, str, int, float, str]] = {}
        self.observer: RequestObserver | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self.addr = PeerAddr(self.node_id, settings.advertise, settings.port, settings.pub_port or settings.port + 1)
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_push: zmq.Socket[Any] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._running = False
        self._leaving = False
        self._seq = 0
        self._seeds: dict[tuple[str, int], zmq.Socket[Any]] = {}
        self._seed_next_hello = 0.0
        self._sub_endpoints: set[str] = set()
        self._discovery: Any = None
        self._loop_ident = 0
        self._poller = zmq.Poller()
        self._monitors: dict[zmq.Socket[Any], Peer] = {}
        self._security: MeshKey | Plaintext = settings.key or Plaintext()
        self._auth: Authenticator | None = None
        self._admitted: dict[bytes, set[str]] = {}  # sender identity -> ids it may still have in flight here
        self._next_admission_sweep = 0.0
        # Announcements and gossip of other meshes, for `lanmesh status`/`doctor`: (node, host) -> what was seen.
        self.foreign: dict[tuple[str, str], dict[str, Any]] = {}
        self._mismatch_log = RejectionLog()

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Bind, start the loop thread, and start mDNS; raises if binding fails."""
        self._thread = threading.Thread(target=self._main, name=f"mesh-{self.node_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("mesh loop did not start in time")
        if self._start_error is not None:
            raise self._start_error
        if self.s.mdns:
            self._start_discovery()

    def _start_discovery(self) -> None:
        from ._discovery import Discovery

        self._discovery = Discovery(
            self.addr,
            fingerprint=self.s.fingerprint,
            interfaces=self.s.interfaces,
            on_found=lambda ann: self.post("found", ann),
            on_lost=lambda node: self.post("lost", node),
        )
        self._discovery.start()

    def begin_leave(self) -> None:
        """Graceful leave, step 1: unregister, gossip 'leaving', take no new local work."""
        if self._discovery is not None:
            try:
                self._discovery.stop()
            except Exception:  # leaving must go on even if mDNS is unhappy
                log.exception("mDNS unregister failed")
            self._discovery = None
        self.post("leave", None)

    def wait_settled(self, timeout: float) -> bool:
        """Wait until no request this node took is still being served elsewhere."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.pending and not self.local:
                return True
            time.sleep(0.02)
        return not self.pending and not self.local

    def stop(self) -> None:
        """Close everything; anything still running here is handed back as UNAVAILABLE."""
        if self._discovery is not None:
            self._discovery.stop()
            self._discovery = None
        if self._thread is not None and self._thread.is_alive():
            self.post("stop", None)
            self._thread.join(5.0)
        if self._auth is not None:
            self._auth.stop()  # it closes its own sockets; destroy() must not close them under its feet
        self.ctx.destroy(linger=0)

    def post(self, kind: str, payload: Any) -> None:
        """Hand an event to the loop from any thread."""
        self._inbox.append((kind, payload))
        if threading.get_ident() == self._loop_ident:
            return
        with self._wake_lock:
            if self._wake_push is not None:
                try:
                    self._wake_push.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the loop is already flooded with wake-ups or closed; the inbox holds the event

    # ------------------------------------------------------------ the loop

    def _bind(self) -> None:
        s = self.s
        if s.key is not None:
            # Before any bind: without a ZAP handler CURVE would admit any key (the sockets also fail closed).
            self._auth = Authenticator(self.ctx, s.key, self._on_refused_connection)
            self._auth.start()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, s.limits.max_frame_bytes)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, s.hwm)
        self.router.setsockopt(zmq.RCVHWM, s.hwm)
        self._security.configure_server(self.router)
        if self._auth is not None:
            self._auth.watch(self.router, f"router:{s.port}")
        self.router.bind(f"tcp://{s.bind}:{s.port}")
        port = _bound_port(self.router)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 1000)
        self.pub.setsockopt(zmq.MAXMSGSIZE, 1024)  # a PUB only ever receives subscriptions
        self._security.configure_server(self.pub)
        if self._auth is not None:
            self._auth.watch(self.pub, "pub")
        pub_port = s.pub_port or (port + 1 if s.port else 0)
        self.pub.bind(f"tcp://{s.bind}:{pub_port}" if pub_port else f"tcp://{s.bind}:*")
        pub_port = _bound_port(self.pub)
        self.addr = PeerAddr(self.node_id, s.advertise, port, pub_port)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.MAXMSGSIZE, s.limits.max_frame_bytes)
        self.sub.setsockopt(zmq.RCVHWM, 1000)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._security.configure_client(self.sub)
        self.wake_pull = self.ctx.socket(zmq.PULL)
        wake = f"inproc://wake-{id(self)}"
        self.wake_pull.bind(wake)
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 1)  # one pending wake-up is enough
        push.setsockopt(zmq.LINGER, 0)
        push.connect(wake)
        self._wake_push = push
        for sock in (self.router, self.sub, self.wake_pull):
            self._poller.register(sock, zmq.POLLIN)

    def _main(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            self._bind()
        except zmq.ZMQError as exc:
            self._start_error = OSError(f"cannot bind {self.s.bind}:{self.s.port}: {exc}")
            self._ready.set()
            return
        self._running = True
        for seed in self.s.seeds:
            self._add_seed(seed)
        self._ready.set()
        log.info("node up", extra={"addr": f"{self.addr.host}:{self.addr.port}", "pub": self.addr.pub_port})
        next_gossip = 0.0
        next_tick = 0.0
        try:
            while self._running:
                now = time.monotonic()
                timeout = max(0.0, min(next_gossip, next_tick) - now)
                events = self._poller.poll(math.ceil(timeout * 1000))
                for sock, _ in events:
                    if sock is self.router:
                        self._drain_router()
                    elif sock is self.sub:
                        self._drain_sub()
                    elif sock is self.wake_pull:
                        self._drain_wake()
                    elif sock in self._monitors:
                        self._drain_monitor(sock)
                    else:
                        self._drain_dealer(sock)
                if self._inbox:
                    self._drain_inbox()
                now = time.monotonic()
                if now >= next_gossip:
                    self._gossip()
                    next_gossip = now + self.s.gossip_interval
                if now >= next_tick:
                    self._housekeeping(now)
                    next_tick = now + _TICK
        except Exception:
            log.exception("mesh loop crashed")
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for rid, (client, *_rest) in list(self.local.items()):
            self._send_client(
                client, Error(rid, ErrorCode.UNAVAILABLE, "node stopped; request handed back", self.node_id)
            )
        for rid, p in list(self.pending.items()):
            self._send_client(p.client, Error(rid, ErrorCode.UNAVAILABLE, "entry node stopped", self.node_id))
        self.local.clear()
        self.pending.clear()
        with self._wake_lock:
            self._wake_push = None
        self._stopped.set()

    def _drain_wake(self) -> None:
        while _readable(self.wake_pull):
            self.wake_pull.recv(zmq.NOBLOCK)

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            kind, payload = inbox.popleft()
            if kind == "done":
                self._local_done(*payload)
            elif kind == "chunk":
                self._local_chunk(*payload)
            elif kind == "found":
                self._on_announcement(payload)
            elif kind == "lost":
                log.info("mDNS says %s is gone", payload)
            elif kind == "leave":
                self._leave()
            elif kind == "stop":
                self._running = False

    # ------------------------------------------------------------ requests in

    def _drain_router(self) -> None:
        router = self.router
        for _ in range(256):  # bounded so gossip and replies keep their rhythm under load
            if not _readable(router):
                return
            frames = router.recv_multipart(zmq.NOBLOCK)
            if len(frames) != 2:
                self.stats["bad_frames"] += 1
                continue
            ident, frame = frames
            try:
                msg = decode(frame, self.s.limits)
            except DecodeError as exc:
                self.stats["bad_frames"] += 1
                if exc.request_id is not None:
                    self._send_client(ident, Error(exc.request_id, ErrorCode.BAD_REQUEST, str(exc), self.node_id))
                else:
                    log.debug("dropped undecodable frame: %s", exc)
                continue
            if isinstance(msg, Request):
                self._on_request(ident, msg)
            elif isinstance(msg, Ping):
                self._on_ping(ident, msg)
            elif isinstance(msg, Hello):
                self._on_hello(ident, msg)
            else:
                self.stats["bad_frames"] += 1
                if hasattr(msg, "id"):
                    err = f"{type(msg).__name__} is not accepted here"
                    self._send_client(ident, Error(msg.id, ErrorCode.BAD_REQUEST, err, self.node_id))

    def _on_request(self, ident: bytes, req: Request) -> None:
        self.stats["requests_in"] += 1
        now = time.monotonic()
        deadline = now + req.deadline_ms / 1000
        if req.id in self.pending or req.id in self.local:
            self._send_client(ident, Error(req.id, ErrorCode.BAD_REQUEST, "request id already in flight", self.node_id))
            return
        refusal = self._admit(ident, req)
        if refusal is not None:
            self._send_client(ident, refusal)
            return
        if req.hops >= 1:
            # Forwarded to us: serve here or say no. Never forward again (hop limit 1).
            if self._leaving or not self._submit_local(ident, req, deadline, "forwarded", 0, now, "peer"):
                self.stats["rejects_sent"] += 1
                why = "leaving" if self._leaving else "queue full"
                self._send_client(ident, Reject(req.id, self.node_id, self.server.queue_length(req.model), why))
            return
        # The common case first: the policy picks this node and it has room. No bookkeeping needed.
        candidates, _known = self._candidates(req, _NOBODY)
        choice = self.policy.choose(req.model, candidates) if candidates else None
        if choice is not None and choice.node == self.node_id:
            if self._submit_local(ident, req, deadline, choice.reason, 0, now, "local"):
                self.stats["served_local"] += 1
                return
        p = Pending(client=ident, request=req, deadline=deadline, started=now)
        self.pending[req.id] = p
        if choice is not None:
            if choice.node != self.node_id and self._forward(p, choice.node, choice.reason):
                return
            p.excluded.add(choice.node)
            p.refused = p.refused or choice.node == self.node_id
        self._dispatch(p, "")

    def _candidates(self, req: Request, excluded: set[str] | frozenset[str]) -> tuple[list[str], bool]:
        """Eligible node ids for `req`, and whether any node at all serves the model."""
        out: list[str] = []
        known = False
        if self.server.serves(req.model):
            known = True
            if not self._leaving and self.node_id not in excluded and self._labels_match(req.require):
                out.append(self.node_id)
        for peer in self.peers:
            if req.model not in peer.models:
                continue
            known = True
            if peer.node in excluded or peer.leaving:
                continue
            if self.detector.state(peer.node) is not PeerState.ALIVE:
                continue
            if peer.serves(req.model, req.require):
                out.append(peer.node)
        return out, known

    def _labels_match(self, require: dict[str, str]) -> bool:
        labels = self.server.labels
        return all(labels.get(k) == v for k, v in require.items())

    def _dispatch(self, p: Pending, why: str) -> None:
        """Pick a node for `p` and send it there; answer the client when nothing can serve it."""
        req = p.request
        now = time.monotonic()
        if now >= p.deadline:
            self._finish_pending(
                p,
                Error(
                    req.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before a node could serve it", self.node_id
                ),
            )
            return
        while True:
            candidates, known = self._candidates(req, p.excluded)
            if not candidates:
                if not known:
                    msg = f"no node in the mesh serves model {req.model!r}"
                    if req.require:
                        msg += f" with labels {req.require}"
                    self._finish_pending(p, Error(req.id, ErrorCode.UNKNOWN_MODEL, msg, self.node_id))
                    return
                if p.rounds < 3:
                    # Everyone said no, failed, or is suspect: short backoff, then try them all again.
                    p.rounds += 1
                    p.excluded.clear()
                    p.retry_at = now + 0.005 * (4**p.rounds)
                    p.target = ""
                    return
                code = ErrorCode.OVERLOADED if p.refused else ErrorCode.UNAVAILABLE
                msg = "every node serving this model is busy" if p.refused else "no live node serves this model now"
                q = min((self.policy.estimate(n, req.model) for n in self._all_servers(req.model)), default=0)
                self._finish_pending(p, Error(req.id, code, msg, self.node_id, int(q)))
                return
            choice = self.policy.choose(req.model, candidates)
            route = f"{why}{choice.reason}" if why else choice.reason
            if choice.node == self.node_id:
                local_req = replace(req, prefix=req.prefix + "".join(p.streamed)) if p.streamed else req
                if self._submit_local(p.client, local_req, p.deadline, route, p.seq, p.started, "local"):
                    self.pending.pop(req.id, None)
                    for node in p.outstanding:
                        self.policy.completed(node, req.model)
                    self.stats["served_local"] += 1
                    return
                p.excluded.add(self.node_id)
                p.refused = True
                continue
            if self._forward(p, choice.node, route):
                return
            p.excluded.add(choice.node)

    def _all_servers(self, model: str) -> list[str]:
        nodes = [peer.node for peer in self.peers if model in peer.models]
        if self.server.serves(model):
            nodes.append(self.node_id)
        return nodes

    def _forward(self, p: Pending, node: str, route: str) -> bool:
        peer = self.peers.get(node)
        if peer is None:
            return False
        now = time.monotonic()
        left_ms = int((p.deadline - now) * 1000)
        if left_ms <= 0:
            return False
        fwd = replace(p.request, hops=p.request.hops + 1, deadline_ms=left_ms, origin=p.request.origin or self.node_id)
        if p.streamed:
            fwd = replace(fwd, prefix=p.request.prefix + "".join(p.streamed))
        try:
            peer.dealer.send(encode(fwd), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.stats["forward_unreachable"] += 1
            return False
        p.target, p.route, p.try_started = node, route, now
        p.tries += 1
        p.retry_at = 0.0
        p.outstanding.add(node)
        self.policy.dispatched(node, p.request.model)
        self.stats["forwarded"] += 1
        if p.tries > 1:
            self.stats["retries"] += 1
        return True

    def _finish_pending(self, p: Pending, msg: Reply | Error) -> None:
        self.pending.pop(p.request.id, None)
        for node in p.outstanding:
            self.policy.completed(node, p.request.model)
        p.outstanding.clear()
        outcome = "ok"
        if isinstance(msg, Error):
            outcome = msg.code.name.lower()
            self.stats[f"errors_{outcome}"] += 1
        if self.observer is not None:
            self.observer.completed(p.request.model, outcome, "forwarded", time.monotonic() - p.started)
        self._send_client(p.client, msg)

    def _send_client(self, ident: bytes, msg: Any) -> None:
        try:
            self.router.send_multipart([ident, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            # The client went away (or is not reading): it will retry elsewhere.
            self.stats["undeliverable"] += 1

    # ------------------------------------------------------------ local service

    def _submit_local(
        self, ident: bytes, req: Request, deadline: float, route: str, seq0: int, started: float, where: str
    ) -> bool:
        rid = req.id
        self.local[rid] = (ident, route, seq0, started, where)
        ok = self.server.submit(req, deadline, self._on_local_chunk, self._on_local_done)
        if not ok:
            self.local.pop(rid, None)
        return ok

    def _on_local_chunk(self, job: Any, seq: int, data: Any) -> None:
        if threading.get_ident() == self._loop_ident:
            self._local_chunk(job.request, seq, data)
        else:
            self.post("chunk", (job.request, seq, data))

    def _on_local_done(self, job: Any, output: Any, meta: Any, code: ErrorCode | None, message: str) -> None:
        if threading.get_ident() == self._loop_ident:
            self._local_done(job.request, output, meta, code, message)
        else:
            self.post("done", (job.request, output, meta, code, message))

    def _local_chunk(self, req: Request, seq: int, data: Any) -> None:
        entry = self.local.get(req.id)
        if entry is not None:
            ident, route, seq0, started, _where = entry
            if seq0 + seq == 0 and self.observer is not None:
                self.observer.first_chunk(req.model, time.monotonic() - started)
            self._send_client(ident, Chunk(req.id, seq0 + seq, data, self.node_id, route))

    def _local_done(self, req: Request, output: Any, meta: Any, code: ErrorCode | None, message: str) -> None:
        entry = self.local.pop(req.id, None)
        if entry is None:
            return
        ident, route, _seq0, started, where = entry
        queue = self.server.queue_length(req.model)
        if self.observer is not None:
            outcome = "ok" if code is None else code.name.lower()
            self.observer.completed(req.model, outcome, where, time.monotonic() - started)
        if code is None:
            self._send_client(ident, Reply(req.id, output, self.node_id, route, queue, meta or {}))
        else:
            self.stats[f"errors_{code.name.lower()}"] += 1
            self._send_client(ident, Error(req.id, code, message, self.node_id, queue))

    # ------------------------------------------------------------ replies from peers

    def _drain_dealer(self, sock: zmq.Socket[Any]) -> None:
        if sock.closed:
            return  # its peer was dropped (re-addressed, forgotten) earlier in this same poll round
        peer = self.peers.by_socket(sock)
        for _ in range(256):
            if not _readable(sock):
                return
            frame = sock.recv(zmq.NOBLOCK)
            try:
                msg = decode(frame, self.s.limits)
            except DecodeError as exc:
                self.stats["bad_frames"] += 1
                log.debug("bad frame from a peer: %s", exc)
                continue
            if peer is None:
                self._on_seed_message(sock, msg)
                continue
            peer.last_heard = time.monotonic()
            self._heard(peer.node)
            self._on_peer_message(peer, msg)

    def _drain_monitor(self, sock: zmq.Socket[Any]) -> None:
        peer = self._monitors.get(sock)
        while _readable(sock):
            event = recv_monitor_message(sock, zmq.NOBLOCK)["event"]
            if peer is None:
                continue
            if event == zmq.EVENT_DISCONNECTED:
                peer.disconnected = True
                for t in self.detector.connection_lost(peer.node, "connection closed"):
                    self._on_transition(t)
            elif event == zmq.EVENT_CONNECT_RETRIED and peer.disconnected:
                for t in self.detector.unreachable(peer.node, "reconnect refused"):
                    self._on_transition(t)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                peer.disconnected = False

    def _on_peer_message(self, peer: Peer, msg: Any) -> None:
        if not self._speaks_for(peer, msg):
            return
        if isinstance(msg, Hello):
            self._learn(msg.addr, "hello", msg.incarnation, msg.fingerprint)
            return
        if isinstance(msg, Pong):
            return
        p = self.pending.get(msg.id) if hasattr(msg, "id") else None
        if p is None or peer.node not in p.outstanding:
            self.stats["duplicate_replies"] += 1
            return
        model = p.request.model
        if isinstance(msg, Chunk):
            if peer.node != p.target:
                self.stats["duplicate_replies"] += 1
                return
            if isinstance(msg.data, str):
                p.streamed.append(msg.data)
            if p.seq == 0 and self.observer is not None:
                self.observer.first_chunk(model, time.monotonic() - p.started)
            self._send_client(p.client, Chunk(msg.id, p.seq, msg.data, msg.node, p.route))
            p.seq += 1
            return
        if isinstance(msg, Reply):
            self._finish_pending(p, replace(msg, route=p.route))
            self.policy.observe_queue(peer.node, model, msg.queue)
            return
        if isinstance(msg, Reject):
            self.stats["rejects_received"] += 1
            p.refused = True
            self._abandon_try(p, peer.node, msg.queue)
            p.excluded.add(peer.node)
            self._dispatch(p, f"retry-after:reject({peer.node}):")
            return
        if isinstance(msg, Error):
            if msg.code in _RETRYABLE and p.tries < self.s.max_tries:
                p.refused = p.refused or msg.code is ErrorCode.OVERLOADED
                self._abandon_try(p, peer.node, msg.queue)
                p.excluded.add(peer.node)
                self._dispatch(p, f"retry-after:{msg.code.name.lower()}({peer.node}):")
            else:
                self._finish_pending(p, msg)
                self.policy.observe_queue(peer.node, model, msg.queue)
            return
        self.stats["bad_frames"] += 1

    def _abandon_try(self, p: Pending, node: str, queue: int | None = None) -> None:
        if node in p.outstanding:
            p.outstanding.discard(node)
            self.policy.completed(node, p.request.model)
        if queue is not None:
            self.policy.observe_queue(node, p.request.model, queue)
        if p.target == node:
            p.target = ""

    def _fail_over(self, node: str, why: str) -> None:
        """Re-send everything in flight on `node` to other nodes (inference is idempotent)."""
        for p in list(self.pending.values()):
            if p.target == node:
                self._abandon_try(p, node)
                p.excluded.add(node)
                self._dispatch(p, f"retry-after:{why}:")

    # ------------------------------------------------------------ gossip & membership

    def _gossip(self) -> None:
        self._seq += 1
        digest = tuple(
            peer.addr for peer in self.peers if self.detector.state(peer.node) is PeerState.ALIVE and not peer.leaving
        )
        report = LoadReport(
            node=self.node_id,
            incarnation=self.incarnation,
            seq=self._seq,
            addr=self.addr,
            models={} if self._leaving else self.server.models(),
            labels=dict(self.server.labels),
            peers=digest,
            leaving=self._leaving,
            fingerprint=self.s.fingerprint,
        )
        try:
            self.pub.send(encode(report), zmq.NOBLOCK)
        except zmq.Again:
            self.stats["gossip_dropped"] += 1

    def _drain_sub(self) -> None:
        for _ in range(256):
            if not _readable(self.sub):
                return
            frame = self.sub.recv(zmq.NOBLOCK, copy=False)
            try:
                msg = decode(frame.bytes, self.s.limits)
            except DecodeError as exc:
                self.stats["bad_frames"] += 1
                log.debug("bad gossip frame: %s", exc)
                continue
            if isinstance(msg, (LoadReport, Leave)) and not self._gossip_from_claimed_host(msg, frame):
                continue
            if isinstance(msg, LoadReport):
                self._on_report(msg)
            elif isinstance(msg, Leave):
                self._on_leave(msg)
            else:
                self.stats["bad_frames"] += 1

    def _on_report(self, r: LoadReport) -> None:
        if r.node == self.node_id:
            return
        if self.s.fingerprint and r.fingerprint != self.s.fingerprint:
            self.stats["foreign_gossip"] += 1
            return
        peer = self.peers.get(r.node)
        if peer is not None and (r.incarnation, r.seq) <= (peer.incarnation, peer.seq):
            self.stats["stale_gossip"] += 1
            return  # an older incarnation's late gossip, or a repeat
        if peer is None or peer.addr != r.addr:
            peer = self._learn(r.addr, "gossip", r.incarnation, r.fingerprint)
            if peer is None:
                return
        t = self.detector.heard(r.node, r.incarnation, r.seq)
        if t is not None:
            self._on_transition(t)
        now = time.monotonic()
        peer.last_heard = peer.last_report = now
        peer.incarnation, peer.seq = r.incarnation, r.seq
        peer.models = dict(r.models)
        peer.labels = dict(r.labels)
        peer.leaving = r.leaving
        for model, load in r.models.items():
            self.policy.observe_gossip(r.node, model, load.inflight + load.queued, load.capacity, load.rate)
        for addr in r.peers:
            if addr.node != self.node_id and self.peers.get(addr.node) is None:
                self._learn(addr, "gossip")

    def _on_leave(self, msg: Leave) -> None:
        peer = self.peers.get(msg.node)
        if peer is None:
            return
        peer.leaving = True
        t = self.detector.left(msg.node, msg.incarnation)
        if t is not None:
            self._on_transition(t)
        log.info("peer %s is leaving", msg.node)

    def _heard(self, node: str) -> None:
        t = self.detector.heard(node)
        if t is not None:
            self._on_transition(t)

    def _on_transition(self, t: Transition) -> None:
        if t.reason == FORGOTTEN:
            peer = self.peers.get(t.node)
            if peer is not None:
                log.info("forgetting peer %s", t.node)
                self._drop_peer(peer)
            return
        log.info("peer %s: %s -> %s (%s)", t.node, t.old.value if t.old else "-", t.new.value, t.reason)
        self.stats[f"peer_{t.new.value}"] += 1
        if t.new in (PeerState.SUSPECT, PeerState.DEAD):
            self._fail_over(t.node, f"peer-{t.new.value}")
        elif t.reason == "restarted":
            self._fail_over(t.node, "peer-restarted")

    def _learn(self, addr: PeerAddr, source: str, incarnation: int = 0, fingerprint: str = "") -> Peer | None:
        """Add (or re-address) a peer: connect a DEALER and the SUB, and say hello."""
        if addr.node == self.node_id:
            return None
        if not valid_peer_host(addr.host):
            self.stats["bad_peer_address"] += 1
            line = self._mismatch_log.note("bad peer address", source, f"{addr.node} claims host {addr.host[:64]!r}")
            if line is not None:
                log.warning("%s", line)
            return None
        if self.s.fingerprint and fingerprint and fingerprint != self.s.fingerprint:
            self.stats["foreign_announcements"] += 1
            self._note_foreign(addr, fingerprint, source)
            return None
        old = self.peers.get(addr.node)
        if old is not None:
            if old.addr == addr:
                return old
            if source != "gossip" and old.last_report and self.detector.state(old.node) is PeerState.ALIVE:
                # A live peer moves only by its own gossip, which is checked against its connection's address;
                # a Hello, seed answer or announcement naming it elsewhere is a mistake or an impostor.
                self.stats["conflicting_claims"] += 1
                return old
            self._drop_peer(old)
        elif sum(1 for p in self.peers if not p.last_report) >= _MAX_UNVERIFIED_PEERS:
            # Claims cost a socket each until the peer's own gossip proves it real: bound what they can make us hold.
            self.stats["learn_refused"] += 1
            return None
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.SNDHWM, self.s.hwm)
        dealer.setsockopt(zmq.RCVHWM, self.s.hwm)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        # Transport events tell a crashed process (connection closed, reconnect refused) in ~0.1 s;
        # hangs and partitions close nothing and are left to the silence timers.
        monitor = dealer.get_monitor_socket(_PEER_EVENTS)
        self._security.configure_client(dealer)
        dealer.connect(f"tcp://{addr.host}:{addr.port}")
        peer = Peer(addr=addr, dealer=dealer, source=source, incarnation=incarnation, fingerprint=fingerprint)
        peer.monitor = monitor
        self._monitors[monitor] = peer
        self._poller.register(monitor, zmq.POLLIN)
        peer.last_heard = time.monotonic()
        self.peers.add(peer)
        # Known now; silence from here on makes it suspect, then dead, then forgotten.
        t = self.detector.heard(addr.node)
        if t is not None and t.reason != "new":
            self._on_transition(t)
        self._poller.register(dealer, zmq.POLLIN)
        endpoint = f"tcp://{addr.host}:{addr.pub_port}"
        if endpoint not in self._sub_endpoints:
            self.sub.connect(endpoint)
            self._sub_endpoints.add(endpoint)
        self._hello(dealer)
        log.info("learned peer %s at %s:%d via %s", addr.node, addr.host, addr.port, source)
        return peer

    def _drop_peer(self, peer: Peer) -> None:
        self._fail_over(peer.node, "peer-gone")
        self.peers.remove(peer.node)
        self.policy.forget(peer.node)
        self._poller.unregister(peer.dealer)
        if peer.monitor is not None:
            self._poller.unregister(peer.monitor)
            self._monitors.pop(peer.monitor, None)
            peer.dealer.disable_monitor()
            peer.monitor.close(0)
        peer.dealer.close(0)
        endpoint = f"tcp://{peer.addr.host}:{peer.addr.pub_port}"
        if endpoint in self._sub_endpoints and not any(
            f"tcp://{p.addr.host}:{p.addr.pub_port}" == endpoint for p in self.peers
        ):
            self.sub.disconnect(endpoint)
            self._sub_endpoints.discard(endpoint)

    def _hello(self, dealer: zmq.Socket[Any]) -> None:
        try:
            # Queued (not IMMEDIATE-dropped) only once connected; the seed timer re-sends.
            dealer.send(encode(Hello(self.addr, self.incarnation, self.s.fingerprint)), zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: gossip (theirs, once they know us) or the next hello will do

    def _on_hello(self, ident: bytes, msg: Hello) -> None:
        self._learn(msg.addr, "hello", msg.incarnation, msg.fingerprint)
        # Tell the newcomer who we are, so a seed contact learns our id and gossip port.
        self._send_client(ident, Hello(self.addr, self.incarnation, self.s.fingerprint))

    def _on_announcement(self, ann: Any) -> None:
        if ann.fingerprint != self.s.fingerprint:
            # mDNS is anyone on the LAN: another mesh, an open (--insecure) node, or an impostor. Never connect.
            self.stats["foreign_announcements"] += 1
            self._note_foreign(ann.addr, ann.fingerprint, "mdns")
            return
        self._learn(ann.addr, "mdns", 0, ann.fingerprint)

    def _add_seed(self, seed: str) -> None:
        host, _, port = seed.rpartition(":")
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        dealer.setsockopt(zmq.SNDHWM, 100)  # only Hellos go out here, one a second
        dealer.setsockopt(zmq.RCVHWM, 100)
        self._security.configure_client(dealer)
        try:
            dealer.connect(f"tcp://{host}:{int(port)}")
        except zmq.ZMQError as exc:
            log.error("seed %s is not a usable address (%s); ignoring it", seed, exc)
            dealer.close(0)
            return
        self._seeds[(host, int(port))] = dealer
        self._poller.register(dealer, zmq.POLLIN)

    def _on_seed_message(self, sock: zmq.Socket[Any], msg: Any) -> None:
        if isinstance(msg, Hello):
            self._learn(msg.addr, "seed", msg.incarnation, msg.fingerprint)

    def _hello_seeds(self, now: float) -> None:
        if now < self._seed_next_hello:
            return
        self._seed_next_hello = now + 1.0
        known = {(p.addr.host, p.addr.port) for p in self.peers if self.detector.state(p.node) is PeerState.ALIVE}
        hello = encode(Hello(self.addr, self.incarnation, self.s.fingerprint))
        for peer in self.peers:
            if not peer.last_report:  # learned but never heard: maybe it does not know us yet
                self._hello(peer.dealer)
        for key, dealer in self._seeds.items():
            if key in known:
                continue
            try:
                dealer.send(hello, zmq.NOBLOCK)
            except zmq.Again:
                self.stats["seed_unreachable"] += 1

    # ------------------------------------------------------------ housekeeping

    def _housekeeping(self, now: float) -> None:
        for t in self.detector.tick():
            self._on_transition(t)
        for peer in self.peers:
            state = self.detector.state(peer.node)
            if state is None:
                log.info("forgetting peer %s", peer.node)
                self._drop_peer(peer)
            elif state is PeerState.DEAD and not peer.last_report:
                # Claimed (Hello, mDNS, digest) but never heard from: free its sockets now, not in forget_after.
                log.info("dropping %s at %s:%d: never heard from it", peer.node, peer.addr.host, peer.addr.port)
                self._drop_peer(peer)
            elif state is PeerState.SUSPECT:
                try:
                    peer.dealer.send(encode(Ping(f"ping-{self._seq}", self.node_id)), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # not connected: silence will make it dead
            elif state is PeerState.LEFT and now - peer.last_heard > self.s.suspect_after:
                self._fail_over(peer.node, "peer-left")
        for p in list(self.pending.values()):
            if now >= p.deadline:
                self._finish_pending(
                    p,
                    Error(
                        p.request.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while being served", self.node_id
                    ),
                )
            elif p.retry_at and now >= p.retry_at:
                p.retry_at = 0.0
                self._dispatch(p, "retry-after:busy:")
            elif p.target and now - p.try_started > self.s.try_timeout:
                self.stats["try_timeouts"] += 1
                node = p.target
                self._abandon_try(p, node)
                p.excluded.add(node)
                self._dispatch(p, "retry-after:timeout:")
        self._hello_seeds(now)
        if now >= self._next_admission_sweep:
            self._sweep_admissions()
            self._next_admission_sweep = now + 5.0

    def _leave(self) -> None:
        self._leaving = True
        for _ in range(2):
            try:
                self.pub.send(encode(Leave(self.node_id, self.incarnation)), zmq.NOBLOCK)
            except zmq.Again:
                self.stats["gossip_dropped"] += 1
        self._gossip()

    def _on_ping(self, ident: bytes, msg: Ping) -> None:
        self._send_client(ident, Pong(msg.id, self.node_id, self.status() if msg.want_status else None))

    # ------------------------------------------------------------ views

    def status(self) -> list[dict[str, Any]]:
        """The nodes this node sees, itself first (for `lanmesh status`)."""
        now = time.monotonic()
        rows = [
            {
                "node": self.node_id,
                "address": f"{self.addr.host}:{self.addr.port}",
                "state": "leaving" if self._leaving else "self",
                "models": {m: [v.inflight, v.queued, v.capacity] for m, v in self.server.models().items()},
                "labels": dict(self.server.labels),
                "last_heard_s": 0.0,
                "inflight_to": 0,
                "source": "self",
                "stats": dict(self.stats),
                "executor": self.server.stats(),
                "security": self.security_view(now),
            }
        ]
        for peer in self.peers:
            state = self.detector.state(peer.node)
            rows.append(
                {
                    "node": peer.node,
                    "address": f"{peer.addr.host}:{peer.addr.port}",
                    "state": "leaving" if peer.leaving else (state.value if state else "unknown"),
                    "models": {m: [v.inflight, v.queued, v.capacity] for m, v in peer.models.items()},
                    "labels": dict(peer.labels),
                    "last_heard_s": round(now - peer.last_heard, 3),
                    "inflight_to": self.policy.inflight_to(peer.node),
                    "source": peer.source,
                }
            )
        return rows

    # ------------------------------------------------------------ security: who may say what, and how much

    def _on_refused_connection(self, kind: str, source: str) -> None:
        # Runs on the ZAP thread (which also logs it). Each of these counters has that one writer, and a
        # dict store is atomic under the GIL, so the loop's own counters are not disturbed.
        self.stats[kind] += 1

    def _admit(self, ident: bytes, req: Request) -> Error | Reject | None:
        """Request limits and the per-sender in-flight cap: what to answer instead of serving `req`, or None."""
        problem = self.s.request_limits.check(req)
        if problem is not None:
            self.stats["limit_refused"] += 1
            return Error(req.id, ErrorCode.BAD_REQUEST, problem, self.node_id)
        ids = self._admitted.get(ident)
        if ids is None:
            ids = self._admitted[ident] = set()
        cap = self.s.max_inflight_per_peer if req.hops else self.s.max_inflight_per_client
        if len(ids) >= cap:
            # Finished requests leave this set lazily: only a sender at its cap pays for the recount.
            ids = self._admitted[ident] = {rid for rid in ids if self._in_flight_for(ident, rid)}
            if len(ids) >= cap:
                self.stats["inflight_cap_refused"] += 1
                queue = self.server.queue_length(req.model) if self.server.serves(req.model) else 0
                if req.hops:
                    return Reject(req.id, self.node_id, queue, f"this peer already has {cap} requests here")
                why = f"this client already has {cap} requests in flight at {self.node_id} (--max-inflight-per-client)"
                return Error(req.id, ErrorCode.OVERLOADED, why, self.node_id, queue)
        ids.add(req.id)
        return None

    def _in_flight_for(self, ident: bytes, rid: str) -> bool:
        p = self.pending.get(rid)
        if p is not None and p.client == ident:
            return True
        entry = self.local.get(rid)
        return entry is not None and entry[0] == ident

    def _sweep_admissions(self) -> None:
        """Forget senders with nothing in flight (clients come and go; each connection is a new identity)."""
        for ident, ids in list(self._admitted.items()):
            live = {rid for rid in ids if self._in_flight_for(ident, rid)}
            if live:
                self._admitted[ident] = live
            else:
                del self._admitted[ident]

    def _gossip_from_claimed_host(self, msg: LoadReport | Leave, frame: zmq.Frame) -> bool:
        """Gossip names a node; accept it only from the address that node claims (the SUB connection's peer)."""
        try:
            value = frame.get("Peer-Address")
        except zmq.ZMQError:
            value = None  # no transport address on this connection: nothing to compare
        seen = value if isinstance(value, str) else None
        if isinstance(msg, LoadReport):
            if msg.node == self.node_id:
                return True
            host = msg.addr.host
            if f"tcp://{host}:{msg.addr.pub_port}" not in self._sub_endpoints:
                self.stats["gossip_unsubscribed"] += 1  # e.g. from an endpoint just dropped; not ours to trust
                return False
        else:
            peer = self.peers.get(msg.node)
            if peer is None:
                return True  # a Leave for a node we do not know changes nothing
            host = peer.addr.host
        if same_host(host, seen):
            return True
        self._identity_mismatch(seen or "?", f"gossip claiming to be {msg.node} at {host}")
        return False

    def _speaks_for(self, peer: Peer, msg: Any) -> bool:
        """A message on a peer's DEALER comes from that peer: any node it names must be that peer."""
        claimed = msg.addr.node if isinstance(msg, Hello) else getattr(msg, "node", "")
        if not claimed or claimed == peer.node:
            return True
        self._identity_mismatch(f"{peer.addr.host}:{peer.addr.port}", f"{type(msg).__name__} naming {claimed}")
        return False

    def _identity_mismatch(self, source: str, what: str) -> None:
        self.stats["identity_mismatch"] += 1
        line = self._mismatch_log.note("identity mismatch", source, f"{what}, dropped")
        if line is not None:
            log.warning("%s", line, extra={"source": source})

    def _note_foreign(self, addr: PeerAddr, fingerprint: str, source: str) -> None:
        """Remember a node of another mesh (or an open one) that showed itself, for status and doctor."""
        now = time.monotonic()
        key = (addr.node, addr.host)
        entry = self.foreign.get(key)
        if entry is None:
            if len(self.foreign) >= 64:  # anyone on the LAN can announce: keep only the most recent few
                del self.foreign[min(self.foreign, key=lambda k: self.foreign[k]["last_seen"])]
            theirs = fingerprint or "none (an open --insecure node)"
            ours = self.s.fingerprint or "none (--insecure)"
            log.warning(
                "ignoring %s at %s:%d (via %s): another mesh (its key %s, ours %s)",
                addr.node, addr.host, addr.port, source, theirs, ours,
            )  # fmt: skip
            entry = self.foreign[key] = {"node": addr.node, "host": addr.host, "port": addr.port, "count": 0}
        entry.update(fingerprint=fingerprint, source=source, last_seen=now)
        entry["count"] += 1

    def security_view(self, now: float) -> dict[str, Any]:
        """This node's security state for `lanmesh status` and `lanmesh doctor`."""
        return {
            "mode": "curve" if self.s.key is not None else "insecure",
            "fingerprint": self.s.fingerprint,
            "auth_rejected": self.stats["auth_rejected"],
            "handshake_failed": self.stats["handshake_failed"],
            "identity_mismatch": self.stats["identity_mismatch"],
            "foreign": [
                {k: v for k, v in e.items() if k != "last_seen"} | {"last_seen_s": round(now - e["last_seen"], 1)}
                for e in self.foreign.values()
            ],
        }
