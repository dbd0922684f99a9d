"""The mesh loop of one node: its sockets, and the turn that moves messages between them and the deciders.

One thread owns every socket and runs a plain `zmq.Poller` loop (zmq.asyncio costs about 2x per request). What to
do lives elsewhere and is unit-tested without sockets: where a request goes (`_routing`), whether a peer is alive
(`_failure`), what happens to a request this node took (`_entry`); who a peer is and the sockets to it are in
`_links`. No message can stop the loop: each is handled on its own, and an unexpected error is logged with its
traceback, counted (`handler_errors`) and the loop goes on; a watchdog ends the process if the loop still dies or
stops turning, so a supervisor restarts it instead of a zombie answering heartbeats.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from protocol import (
    Admin,
    Cancel,
    Chunk,
    DecodeError,
    Digest,
    Error,
    ErrorCode,
    Fetch,
    Hello,
    LoadReport,
    PeerAddr,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    Stage,
    Suspicion,
    decode,
    encode,
)

from ._admission import Admission
from ._entry import EntryTable, PipelineFn, ServeTrackedFn
from ._identity import MemberIdentity
from ._links import PeerLinks
from ._local import LocalWork
from ._members import Members
from ._membership import DRAIN, Membership
from ._peers import Peer
from ._routing import node_policy
from ._security import Authenticator
from ._services import Services
from ._settings import LocalServer, MeshSettings, RequestObserver
from ._sockets import SocketPoller, Waker, bind_pub, bind_router, bound_port, peer_address
from ._stages import FailFn, StageTraffic
from ._trust import Trust
from ._watchdog import LoopWatchdog, within

log = logging.getLogger("lanmesh.mesh")

_NOBODY: frozenset[str] = frozenset()
# Plain ints: zmq's flag enums cost an enum operation per `|` on the hot path; send_multipart/recv_multipart loop in
# Python and ask RCVMORE by getsockopt, two socket calls per message more than needed here.
_NB, _NB_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
_TICK = 0.05  # seconds between housekeeping passes (deadlines, retries, probes in doubt) while anything needs them
_FLUSH_AT = 32  # answers queued before the loop sends them mid-turn (bounds the wait of the first in a burst)
_INBOX_PER_TURN = 1024  # events from other threads handled per turn: a flood of chunks cannot hold up the sockets
_ERROR_LOG_EVERY_S = 10.0


class MeshNode:
    """Runs the mesh loop for one node in a thread of its own."""

    pipeline: PipelineFn  # EntryHost's: a chain of stage holders (`Membership.pipeline`)
    serve_tracked: ServeTrackedFn  # EntryHost's: a try served here, answered to the entry table (`LocalWork`)
    cancel_here: Callable[[str, str], None]  # EntryHost's: a request here, and a stage's sequence of that id

    def __init__(
        self,
        server: LocalServer,
        settings: MeshSettings,
        rng: random.Random | None = None,
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.server = server
        self.s = settings
        self.node_id = settings.node_id
        self.incarnation = time.time_ns()
        self.ctx = zmq.Context()
        self.stats: collections.Counter[str] = collections.Counter()
        self.policy = node_policy(settings.routing, self.node_id, server, rng, self.stats)
        self._poller = SocketPoller()
        self.links = PeerLinks(self.ctx, self._poller, settings, lambda node: self.membership.state(node), self.stats,
                               lambda incarnation, now: self.membership.incarnation_ok(incarnation, now))  # fmt: skip
        self.entry = EntryTable(
            self,
            self.policy,
            max_tries=settings.max_tries,
            try_timeout=settings.try_timeout or None,
            wait_for_node=settings.dead_after,
            counts=self.stats,
        )
        self.admission = Admission(self.node_id, settings.request_limits, settings.max_inflight_per_client,
                                   settings.max_inflight_per_peer, self.stats)  # fmt: skip
        identity = settings.key if isinstance(settings.key, MemberIdentity) else None
        self.addr = PeerAddr(self.node_id, settings.advertise, settings.port, settings.pub_port or settings.port + 1,
                             identity.key_text if identity is not None else "")  # fmt: skip
        self.membership = Membership(
            settings, self.addr, self.incarnation, server, self.policy, self.links, self.entry,
            self.admission, self.stats,
            send_client=self._send_client, guarded=self._guarded, in_flight_for=self._in_flight_for,
        )  # fmt: skip
        # Operators' commands and model files (`Admin`, `Fetch`), answered on worker threads (the node sets the handler)
        self.services = Services(self.node_id, self.post)
        # Member identities: who is who (`_members`) and the door every message passes (`_trust`); None: one key.
        self.trust: Trust | None = None
        if identity is not None:
            members = Members(identity.verify_key, identity.cert, identity.certificate, self.stats,
                              state_dir=settings.state_dir or None, clock=time.time)  # fmt: skip
            self.trust = Trust(
                identity, members, self.links, self.stats, settings, send_client=self._send_client, post=self.post,
                drop_peer=self.membership.drop_peer, router_frame=self._on_router_frame, services=self.services,
                on_hello=self.membership.on_hello, rebind_pub=self.membership.rebind_pub, guarded=self._guarded,
            )  # fmt: skip
            self.links.members, self.links.credentials = members, self.trust.credentials
            self.membership.trust, self.services.membership = self.trust, self.trust.handle
        self.observer: RequestObserver | None = None
        self.local = LocalWork(self.node_id, server, self.stats, send_client=self._send_client, post=self.post,
                               observer=lambda: self.observer, entry=self.entry)  # fmt: skip
        self.stages = StageTraffic(self.node_id, server, self.stats, settings.limits, self.links.peers, self.local)
        self.pipeline, self.serve_tracked = self.membership.pipeline, self.local.submit_tracked
        self.cancel_here = self.stages.cancel_here
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._outbox: list[tuple[bytes, bytes]] = []  # answers to clients, sent at the end of the loop's turn
        self._waker: Waker | None = None  # made with the loop's sockets; until then the inbox waits for the loop
        self._drain_wake: Callable[[], None] = lambda: None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._running = False
        self._discovery: Any = None
        self._loop_ident = 0
        self._auth: Authenticator | None = None
        self._error_log: dict[str, float] = {}
        self.last_turn = time.monotonic()  # the watchdog reads it
        self._on_stall = on_stall
        self._watchdog: LoopWatchdog | None = None

    @property
    def peers(self) -> Any:
        return self.links.peers

    @property
    def foreign(self) -> dict[tuple[str, str], dict[str, Any]]:
        return self.links.foreign

    def status(self) -> list[dict[str, Any]]:
        """The nodes this node sees, itself first (see `Membership.status`)."""
        return self.membership.status()

    def holders(self, name: str) -> list[tuple[str, str, str]]:
        """(node, host:port, version) of every live peer serving `name` (any thread)."""
        return self.membership.holders(name)

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Bind, start the loop thread (and its watchdog), and start mDNS; raises if binding fails."""
        self._thread = threading.Thread(target=self._main, name=f"mesh-{self.node_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("mesh loop did not start in time")
        if self._start_error is not None:
            raise self._start_error
        if self.s.stall_timeout > 0:
            self._watchdog = LoopWatchdog(
                self._thread, lambda: self.last_turn, self.s.stall_timeout, self._stopped,
                goodbye=lambda: self.unregister(timeout=2.0), on_stall=self._on_stall,
            )  # fmt: skip
            self._watchdog.start()
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

    def unregister(self, timeout: float = 3.0) -> None:
        """Say goodbye on mDNS (bounded: a stuck zeroconf must not keep a dying node alive)."""
        discovery, self._discovery = self._discovery, None
        if discovery is not None:
            within(discovery.stop, timeout, "mdns goodbye")

    def begin_leave(self) -> None:
        """Graceful leave, step 1: unregister, gossip 'leaving', take no new local work."""
        self.unregister()
        self.post("leave", None)

    def wait_settled(self, timeout: float) -> bool:
        """Wait until no request this node took is still being served (here or elsewhere)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not len(self.entry) and not self.local:
                return True
            time.sleep(0.02)
        return not len(self.entry) and not self.local

    def stop(self) -> None:
        """Close everything; anything still running here is handed back as UNAVAILABLE."""
        self.unregister()
        if self._thread is not None and self._thread.is_alive():
            self.post("stop", None)
            self._thread.join(5.0)
        self._stopped.set()  # leaving on purpose from here on, whatever the loop did
        self.services.close()
        if self._auth is not None:
            self._auth.stop()  # it closes its own sockets; destroy() must not close them under its feet
        self.ctx.destroy(linger=0)

    def post(self, kind: str, payload: Any) -> None:
        """Hand an event to the loop from any thread."""
        self._inbox.append((kind, payload))
        if threading.get_ident() != self._loop_ident:
            self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    # ------------------------------------------------------------ the loop

    def _bind(self) -> None:
        s = self.s
        security = self.links.security
        if s.key is not None:
            # Before any bind: without a ZAP handler CURVE would admit any key (the sockets also fail closed).
            admits = self.trust.members.zap_admits if self.trust is not None else None
            self._auth = Authenticator(self.ctx, s.key, self.membership.on_refused_connection, admits)
            self._auth.start()
        self.router = bind_router(self.ctx, s, security, self._auth)
        port = bound_port(self.router)
        self.pub = bind_pub(self.ctx, s, security, self._auth, port)
        self.addr = PeerAddr(self.node_id, s.advertise, port, bound_port(self.pub), self.addr.key)
        self.links.addr, self.links.incarnation = self.addr, self.incarnation
        self.membership.attach(self.pub, self.addr)
        if self.trust is not None:
            self.trust.address = f"{self.addr.host}:{self.addr.port}"
        self._waker = Waker(self.ctx)
        self.wake_pull, self._drain_wake = self._waker.pull, self._waker.drain
        for sock in (self.router, self.wake_pull):
            self._poller.register(sock, zmq.POLLIN)

    def _main(self) -> None:
        self._loop_ident = self.local.loop_ident = threading.get_ident()
        try:
            self._bind()
        except zmq.ZMQError as exc:
            self._start_error = OSError(f"cannot bind {self.s.bind}:{self.s.port}: {exc}")
            self._ready.set()
            return
        self._running = True
        for seed in self.s.seeds:
            self.links.add_seed(seed)
        self._ready.set()
        log.info("node up", extra={"addr": f"{self.addr.host}:{self.addr.port}", "pub": self.addr.pub_port})
        next_tick = 0.0
        crashed = True
        try:
            while self._running:
                now = time.monotonic()
                self.last_turn = now
                wait = 0.0 if self._inbox else max(0.0, next_tick - now)  # events left: go on
                events = self._poller.poll(math.ceil(wait * 1000))
                for sock, _ in events:
                    self._drain(sock)
                self.links.close_later()
                if self._inbox:
                    self._drain_inbox()
                if self._outbox:
                    self._flush()
                now = time.monotonic()
                if now >= next_tick:
                    self._guarded("housekeeping", self.membership.housekeeping, now)
                    if self.trust is not None:
                        self._guarded("identities", self.trust.housekeeping, now)
                    next_tick = now + self.s.gossip_interval  # idle: nothing needs a finer clock
                if self._busy():
                    next_tick = min(next_tick, now + _TICK)
            crashed = False
        except Exception:
            # The watchdog sees the loop thread gone and ends the process (goodbye, exit 70).
            log.exception("mesh loop crashed")
        finally:
            self._shutdown(intended=not crashed)

    def _busy(self) -> bool:
        """Whether housekeeping needs its fine clock: requests to route, retry or time out, work served here, or a
        peer in doubt (probed more often), or a peer learned that has not reported yet (hellos back off from 0.1 s).
        An idle node wakes for it four times a second instead of twenty."""
        return bool(len(self.entry) or len(self.local)) or self.membership.in_doubt() or self.links.awaiting_reports

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        if sock is self.router:
            self._drain_router()
        elif sock is self.wake_pull:
            self._drain_wake()
        elif sock in self.links.monitors:
            self.membership.drain_monitor(sock)
        elif sock in self.links.subs:
            self.membership.drain_sub(sock, self.links.subs[sock])
        else:
            self._drain_dealer(sock)

    def _guarded(self, what: str, handler: Callable[..., Any], *args: Any) -> None:
        """Run one handler; an unexpected error is logged (with its traceback, rate-limited), counted, survived."""
        try:
            handler(*args)
        except Exception:
            self.stats["handler_errors"] += 1
            now = time.monotonic()
            if now - self._error_log.get(what, -_ERROR_LOG_EVERY_S) >= _ERROR_LOG_EVERY_S:
                self._error_log[what] = now
                log.exception("error handling %s (the loop goes on; %d such errors so far)", what,
                              self.stats["handler_errors"])  # fmt: skip

    def _shutdown(self, intended: bool) -> None:
        """The loop ends: every caller hears UNAVAILABLE. Only a stop asked for (`stop()`) tells the watchdog it was
        meant; a loop that crashed leaves it to see a dead loop, so the process leaves the mesh and exits."""
        self._guarded("shutdown", self.entry.hand_back, "entry node stopped", time.monotonic())
        self._guarded("handing back local work", self.local.hand_back)
        self._guarded("the last answers", self._flush)
        if self._waker is not None:
            self._waker.silence()
        self._poller.close()
        if intended:
            self._stopped.set()

    def _drain_inbox(self) -> None:
        inbox = self._inbox
        for _ in range(_INBOX_PER_TURN):
            if not inbox:
                return
            kind, payload = inbox.popleft()
            if kind == "done":
                self._guarded("a local answer", self.local.done, *payload)
            elif kind == "chunk":
                self._guarded("a local chunk", self.local.chunk, *payload)
            elif kind == "stage":
                self._guarded("a stage's message", self.stages.send, *payload)
            elif kind == "answer":
                ident, frame, done = payload
                self.services.done(done)
                if frame is not None:
                    self.send_client(ident, frame)
            elif kind == "found":
                self._guarded("an announcement", self.membership.on_announcement, payload)
            elif kind == "lost":
                log.info("mDNS says %s is gone", payload)
            elif kind == "revocations" and self.trust is not None:
                self._guarded("a revocation list", self.trust.on_revocations, payload, "an admin's command")
            elif kind == "leave":
                self.membership.leave()
            elif kind == "stop":
                self._running = False

    # ------------------------------------------------------------ requests in

    def _drain_router(self) -> None:
        router, trust = self.router, self.trust
        for _ in range(DRAIN):
            try:
                ident = router.recv(_NB)
            except zmq.Again:
                return
            part = router.recv(_NB, copy=False)  # a ROUTER hands over whole messages: the body is there
            if part.more:  # multi-part: a pipeline stage's header and tensor (from a node), or dropped (counted) whole
                if trust is not None and not trust.from_node(part):
                    self.stages.skip(router, part)
                    continue
                self._guarded("a stage's message", self.stages.read, router, part)
                continue
            if trust is not None:  # member identities: who sent it is on the message (ZAP's User-Id)
                trust.on_part(ident, part)
                continue
            self._guarded("a message from a client", self._on_router_frame, ident, part.bytes, None, part)

    def _on_router_frame(self, ident: bytes, frame: bytes, decoded: Any = None, part: zmq.Frame | None = None) -> None:
        try:
            msg = decoded if decoded is not None else decode(frame, self.s.limits)
        except DecodeError as exc:
            self.stats["bad_frames"] += 1
            if exc.request_id is not None:
                self._send_client(ident, Error(exc.request_id, ErrorCode.BAD_REQUEST, str(exc), self.node_id))
            else:
                log.debug("dropped undecodable frame: %s", exc)
            return
        if type(msg) is Request:
            self._on_request(ident, msg, frame)
        elif isinstance(msg, Cancel):
            self._on_cancel(ident, msg)
        elif isinstance(msg, Ping):
            self._send_client(ident, Pong(msg.id, self.node_id, self.status() if msg.want_status else None))
        elif isinstance(msg, Hello):
            self.membership.on_hello(ident, msg)
        elif isinstance(msg, Digest | Suspicion):
            self.membership.on_router_gossip(ident, msg, peer_address(part) if part is not None else None)
        elif isinstance(msg, Stage):
            self.stages.deliver([(msg, None)])
        elif isinstance(msg, Admin | Fetch):
            refused = self.services.submit(ident, msg)
            if refused is not None:
                self._send_client(ident, refused)
        else:
            self.stats["bad_frames"] += 1
            if hasattr(msg, "id"):
                err = f"{type(msg).__name__} is not accepted here"
                self._send_client(ident, Error(msg.id, ErrorCode.BAD_REQUEST, err, self.node_id))

    def _on_request(self, ident: bytes, req: Request, frame: bytes) -> None:
        self.stats["requests_in"] += 1
        now = time.monotonic()
        if req.id in self.entry or req.id in self.local:
            self._send_client(ident, Error(req.id, ErrorCode.BAD_REQUEST, "request id already in flight", self.node_id))
            return
        refusal = self.admission.admit(ident, req, self._in_flight_for, self._queue_of)
        if refusal is not None:
            self._send_client(ident, refusal)
            return
        deadline = now + req.deadline_ms / 1000
        if req.hops >= 1:
            # Forwarded to us: serve here or say no. Never forward again (hop limit 1).
            if self.membership.leaving or not self.local.submit(ident, req, deadline, "forwarded", 0, now, "peer"):
                self.stats["rejects_sent"] += 1
                why = "leaving" if self.membership.leaving else "queue full"
                self._send_client(ident, Reject(req.id, self.node_id, self.server.queue_length(req.model), why))
            return
        # The common case first: the policy picks this node and it has room, or a peer that takes the try.
        candidates, _known = self.eligible(req, _NOBODY)
        choice = self.policy.choose(req.model, candidates, now, req) if candidates else None
        if choice is not None and choice.node == self.node_id:
            if self.local.submit(ident, req, deadline, choice.reason, 0, now, "local"):
                self.stats["served_local"] += 1
                return
            self.entry.take(ident, req, now, refused_here=True, frame=frame)
            return
        if choice is not None and self.entry.forward_first(ident, req, choice.node, choice.reason, now, frame):
            return
        self.entry.take(ident, req, now, frame=frame)

    def _on_cancel(self, ident: bytes, msg: Cancel) -> None:
        """The sender gave up on one of its requests: stop it where it runs. Nobody answers a Cancel."""
        self.stats["cancels_in"] += 1
        if self.entry.cancel(ident, msg.id, msg.reason, time.monotonic()):
            return
        self.cancel_here(msg.id, msg.reason)

    def send_stage(self, node: str, items: list[tuple[Stage, Any]], on_fail: FailFn | None) -> None:
        """Send a stage's messages to `node` as one (any thread: headers encoded here, sent by the loop)."""
        self.post("stage", (node, [(msg, encode(msg), tensor) for msg, tensor in items], on_fail))

    def _in_flight_for(self, ident: bytes, rid: str) -> bool:
        p = self.entry.get(rid)
        if p is not None and p.client == ident:
            return True
        local = self.local.get(rid)
        return local is not None and local.client == ident

    def _queue_of(self, model: str) -> int:
        return self.server.queue_length(model) if self.server.serves(model) else 0

    # ------------------------------------------------------------ EntryHost: what the entry table asks of us

    def eligible(self, req: Request, excluded: set[str] | frozenset[str]) -> tuple[list[str], bool]:
        return self.membership.eligible(req, excluded)

    def servers(self, model: str) -> list[str]:
        return self.membership.servers(model)

    def serve_here(self, client: bytes, req: Request, deadline: float, route: str, seq0: int, started: float) -> bool:
        return self.local.submit(client, req, deadline, route, seq0, started, "local")

    def send_peer(self, node: str, frame: bytes) -> bool:
        peer = self.links.peers.get(node)
        if peer is None:
            return False
        try:
            peer.dealer.send(frame, _NB)
        except zmq.ZMQError:
            return False
        self._poller.touch(peer.dealer)
        return True

    def send_client(self, client: bytes, frame: bytes) -> None:
        """Queue an answer to a client; the loop sends what is queued once per turn (`_flush`), so a burst of answers
        wakes ZeroMQ's I/O thread once instead of once each (on a busy CPU each wake-up is a context switch)."""
        self._outbox.append((client, frame))
        if len(self._outbox) >= _FLUSH_AT:
            self._flush()

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        router = self.router
        self._poller.touch(router)
        for client, frame in out:
            try:
                router.send(client, _NB_MORE)  # with ROUTER_MANDATORY an unknown client fails here, at once
            except zmq.ZMQError:
                self.stats["undeliverable"] += 1  # the client went away (or is not reading): it will retry elsewhere
                continue
            router.send(frame, _NB)

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        if self.observer is not None:
            self.observer.completed(model, outcome, "forwarded", seconds)

    def first_chunk(self, model: str, seconds: float) -> None:
        if self.observer is not None:
            self.observer.first_chunk(model, seconds)

    def _send_client(self, ident: bytes, msg: Any) -> None:
        self.send_client(ident, encode(msg))

    # ------------------------------------------------------------ messages from peers

    def _drain_dealer(self, sock: zmq.Socket[Any]) -> None:
        peer = self.links.peers.by_socket(sock)
        seed_key = self.links.seed_key(sock) if peer is None else None
        for _ in range(DRAIN):
            if sock.closed or (peer is not None and self.links.peers.get(peer.node) is not peer):
                return  # its peer was dropped (re-addressed, forgotten) while this drain ran
            try:
                frame = sock.recv(_NB)
            except zmq.Again:
                return
            try:
                msg = decode(frame, self.s.limits)
            except DecodeError as exc:
                self.stats["bad_frames"] += 1
                log.debug("bad frame from a peer: %s", exc)
                continue
            if peer is None:
                if seed_key is not None:
                    self._guarded("a seed's answer", self.links.on_seed_answer, seed_key, msg)
                continue
            self._guarded("a message from a peer", self._on_peer_message, peer, msg, frame)

    def _on_peer_message(self, peer: Peer, msg: Any, frame: bytes) -> None:
        if self.trust is not None and self.trust.from_peer(peer, msg):
            return  # member identities: its certificate, a revocation list, or anything before its certificate
        now = time.monotonic()
        peer.last_heard = now
        self.membership.heard(peer.node, now)
        if not self.links.speaks_for(peer, msg):
            return
        if type(msg) is Reply:
            self.entry.on_reply(peer.node, msg, now, frame)
        elif isinstance(msg, Chunk):
            self.entry.on_chunk(peer.node, msg, now)
        elif isinstance(msg, Reject):
            self.entry.on_reject(peer.node, msg, now)
        elif isinstance(msg, Error):
            self.entry.on_error(peer.node, msg, now)
        elif isinstance(msg, Hello):
            self.links.learn(msg.addr, "hello", msg.incarnation, msg.fingerprint, by_itself=self.trust is not None)
        elif isinstance(msg, LoadReport):
            self.membership.on_report_on_link(peer, msg)
        elif isinstance(msg, Digest):
            self.membership.on_digest(msg, lambda answer: self.membership.send(peer.node, answer), asked=True)
        elif not isinstance(msg, Pong):
            self.stats["bad_frames"] += 1


__all__ = ["LocalServer", "MeshNode", "MeshSettings", "RequestObserver"]
