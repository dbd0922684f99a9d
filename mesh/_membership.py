"""Membership, as the mesh loop carries it out: the node's gossip on its sockets, peers' states and what follows
from them (fail-over, forgetting), transport events, hellos and announcements, and the node's view of the mesh.

A part `MeshNode` is composed of, with its dependencies given explicitly (it runs on the node's loop thread and uses
the node's PUB, SUB and peer links). What to send and what to believe is the pure `Gossip`'s (`_gossip`, over the
`MemberView` of `_view`); this module is the `GossipHost` it acts through, and carries its verdicts to the entry
table (`_entry`), the routing policy (`_routing`) and the links (`_links`, which also say who may claim what).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import (
    DecodeError,
    Digest,
    Hello,
    Leave,
    LoadReport,
    PeerAddr,
    Ping,
    Request,
    StageWant,
    Suspicion,
    decode,
    encode,
)

from ._failure import FORGOTTEN, INCARNATION_AHEAD_S, PeerState, Transition
from ._gossip import Gossip, GossipSettings
from ._peers import Peer
from ._pipeline import compose_chain, holders_of
from ._security import same_host
from ._sockets import bind_pub
from ._status import security_view, status_rows

if TYPE_CHECKING:
    from ._admission import Admission
    from ._entry import EntryTable
    from ._links import PeerLinks
    from ._routing import RoutingPolicy
    from ._settings import LocalServer, MeshSettings
    from ._trust import Trust

log = logging.getLogger("lanmesh.mesh")

DRAIN = 256  # messages read from one socket per turn: gossip and replies keep their rhythm under load


class Membership:
    """Gossip and peer-state handling of one node (see the module docstring)."""

    def __init__(
        self,
        settings: MeshSettings,
        addr: PeerAddr,
        incarnation: int,
        server: LocalServer,
        policy: RoutingPolicy,
        links: PeerLinks,
        entry: EntryTable,
        admission: Admission,
        stats: collections.Counter[str],
        *,
        send_client: Callable[[bytes, Any], None],
        guarded: Callable[..., None],
        in_flight_for: Callable[[bytes, str], bool],
    ) -> None:
        self.s = settings
        self.node_id = settings.node_id
        self.incarnation = incarnation
        self.server = server
        self.policy = policy
        self.links = links
        self.entry = entry
        self.admission = admission
        self.stats = stats
        self._send_client = send_client
        self._guarded = guarded
        self._in_flight_for = in_flight_for
        self.addr = addr  # as bound once the loop runs (`attach`)
        self.leaving = False  # this node is leaving: it gossips so, and takes no new work
        self._pub: zmq.Socket[Any] | None = None
        self.trust: Trust | None = None  # member identities (set by the node)
        self.pub_stale = False  # the gossip PUB is to be bound again (after a revocation)
        self._next_admission_sweep = 0.0
        self._next_sweep = 0.0
        self._next_report = 0.0
        self.gossip_settings = GossipSettings(
            interval=settings.gossip_interval,
            probe_every=min(2 * settings.gossip_interval, settings.suspect_after / 2),
            suspect_after=settings.suspect_after,
            dead_after=settings.dead_after,
            forget_after=settings.forget_after,
        )
        self._gossip: Gossip | None = None  # made once the node is bound (its address is part of its reports)

    def attach(self, pub: zmq.Socket[Any], addr: PeerAddr) -> None:
        """The node's gossip socket and its address as bound (the loop thread makes them once it starts)."""
        self._pub, self.addr = pub, addr
        self._gossip = Gossip(addr, self.incarnation, self, self.gossip_settings, fingerprint=self.s.fingerprint)
        self._gossip.sync_clock(self.incarnation, time.monotonic())  # before any gossip: incarnations are bounded
        self.gossip_report()  # before anyone can ask (a Hello is answered with the last report)

    @property
    def gossip(self) -> Gossip:
        if self._gossip is None:
            raise RuntimeError("membership has no gossip before the node binds")
        return self._gossip

    @property
    def bound(self) -> bool:
        """Whether the node is bound (its gossip runs)."""
        return self._gossip is not None

    def state(self, node: str) -> PeerState | None:
        """What this node acts on about a peer (None: not a member, or not yet heard from itself)."""
        return None if self._gossip is None else self._gossip.state(node)

    def incarnation_ok(self, incarnation: int, now: float) -> bool:
        """Whether a peer's incarnation is plausible by this node's clock (`FailureDetector.incarnation_ok`)."""
        return self._gossip is None or self._gossip.incarnation_ok(incarnation, now)

    @property
    def pub(self) -> zmq.Socket[Any]:
        if self._pub is None:
            raise RuntimeError("membership has no PUB socket before the node binds")
        return self._pub

    def rebind_pub(self) -> None:
        """Bind the gossip PUB again: every subscriber reconnects (within half a second) and passes ZAP again, so a
        key revoked since it subscribed hears nothing more. Retried each tick while the old port is not free yet."""
        self.pub_stale = True
        old = self._pub
        if old is not None and not old.closed:
            old.close(0)
        try:
            self._pub = bind_pub(self.links.ctx, self.s, self.links.security, None, self.addr.port, self.addr.pub_port)
        except zmq.ZMQError:
            return  # the old listener is still closing: the next housekeeping tick tries again
        self.pub_stale = False

    def revocations_serial(self) -> int:
        return self.trust.serial if self.trust is not None else 0

    def drain_monitor(self, sock: zmq.Socket[Any]) -> None:
        peer = self.links.monitors.get(sock)
        while True:
            try:
                event = recv_monitor_message(sock, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if peer is not None:
                self._guarded("a transport event", self._on_transport_event, peer, event)

    def _on_transport_event(self, peer: Peer, event: int) -> None:
        now = time.monotonic()
        if event == zmq.EVENT_DISCONNECTED:
            peer.disconnected = True
            self.gossip.connection_lost(peer.node, now)
        elif event == zmq.EVENT_CONNECT_RETRIED and peer.disconnected:
            self.gossip.unreachable(peer.node, now)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            peer.disconnected = False
            self.links.introduce(peer.dealer)  # member identities: who we are comes first on a new connection
            # Back after an outage (or new): ask at once rather than wait to route to it.
            self.gossip.reconnected(peer.node, now)
            if not peer.last_report:
                self.links.hello_peer(peer, now)

    def on_hello(self, ident: bytes, msg: Hello, by_itself: bool = False) -> None:
        """A node says hello on this node's ROUTER; `by_itself`: on a connection made with its own key (member
        identities), so where it says it is now is where it is."""
        self.links.learn(msg.addr, "hello", msg.incarnation, msg.fingerprint, by_itself=by_itself)
        # Tell the newcomer who we are (a seed contact learns our id and gossip port), and what we report.
        self._send_client(ident, Hello(self.addr, self.incarnation, self.s.fingerprint))
        self._send_client(ident, self.gossip.current_report())

    def on_announcement(self, ann: Any) -> None:
        if ann.fingerprint != self.s.fingerprint:
            # mDNS is anyone on the LAN: another mesh, an open (--insecure) node, or an impostor. Never connect.
            self.stats["foreign_announcements"] += 1
            self.links.note_foreign(ann.addr, ann.fingerprint, "mdns")
            return
        self.links.learn(ann.addr, "mdns", 0, ann.fingerprint)

    # ------------------------------------------------------------ what Gossip does through us (GossipHost)

    def publish(self, msg: LoadReport | Suspicion) -> None:
        try:
            self.pub.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.stats["gossip_dropped"] += 1

    def send(self, node: str, msg: Ping | Digest | Suspicion) -> bool:
        peer = self.links.peers.get(node)
        if peer is None:
            return False
        try:
            peer.dealer.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            return False  # not connected: its silence, or the transport, will tell
        self.links.poller.touch(peer.dealer)
        return True

    def learn(self, addr: PeerAddr, source: str) -> None:
        if self.links.peers.get(addr.node) is None:
            self.links.learn(addr, source)

    def pull(self, node: str) -> None:
        peer = self.links.peers.get(node)
        if peer is not None:
            self.links.hello(peer.dealer)  # the answer is its report, on this link

    def changed(self, t: Transition) -> None:
        self.on_transition(t)

    # ------------------------------------------------------------ gossip

    def gossip_report(self) -> None:
        """Publish this node's report if it is news (every gossip interval; `Gossip` decides)."""
        now = time.monotonic()
        g = self.gossip
        models = {} if self.leaving else self.server.models()
        legacy = [n for n in g.view.legacy() if g.state(n) is PeerState.ALIVE]
        peers = None
        if legacy:  # older nodes alive: they take silence for failure and learn the mesh from our reports
            peers = tuple(p.addr for p in self.links.peers if g.state(p.node) is PeerState.ALIVE and not p.leaving)
        wants = {} if self.leaving else dict(getattr(self.server, "wants", dict)())
        g.report(now, models, dict(self.server.labels), self.leaving, legacy_peers=peers, wants=wants,
                 prefixes={} if self.leaving else self._prefixes(), revocations=self.revocations_serial())  # fmt: skip

    def _prefixes(self) -> dict[str, bytes]:
        """What this node's prefix caches hold, per chat model (`mesh._prefixes`; `Gossip` reports what changed)."""
        summaries = getattr(self.server, "prefix_summaries", None)
        return summaries() if summaries is not None else {}

    def drain_sub(self, sock: zmq.Socket[Any], peer: Peer) -> None:
        """Gossip on one peer's SUB."""
        for _ in range(DRAIN):
            if sock.closed or self.links.subs.get(sock) is not peer:
                return  # its peer was dropped while this drain ran
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._guarded("gossip", self._on_gossip_frame, frame, peer)

    def _on_gossip_frame(self, frame: bytes, peer: Peer) -> None:
        try:
            msg = decode(frame, self.s.limits)
        except DecodeError as exc:
            self.stats["bad_frames"] += 1
            log.debug("bad gossip frame: %s", exc)
            return
        if not isinstance(msg, LoadReport | Leave | Suspicion):
            self.stats["bad_frames"] += 1
            return
        if not self.links.gossip_from(peer, msg):
            return
        if isinstance(msg, LoadReport):
            if self.trust is not None:
                self.trust.peer_serial(peer, msg.revocations)
            # With member identities the SUB's connection was made with the peer's key: its word on where it is.
            self._on_report(msg, by_itself=self.trust is not None)
        elif isinstance(msg, Suspicion):
            self.stats["suspicions_in"] += 1
            if self._plausible(msg.node, msg.incarnation, peer.addr.host):
                self.gossip.on_suspicion(msg, time.monotonic())
        else:
            self._on_leave(msg)

    def on_report_on_link(self, peer: Peer, r: LoadReport) -> None:
        """A report on the link to `peer` (the answer to a hello, or a refutation): from the peer itself."""
        if r.addr != peer.addr:
            self.links.refuse("identity_mismatch", f"{peer.addr.host}:{peer.addr.port}",
                              f"a report of {r.node} at another address on its link")  # fmt: skip
            return
        if self.trust is not None:
            self.trust.peer_serial(peer, r.revocations)
        self._on_report(r, by_itself=self.trust is not None)

    def on_digest(self, d: Digest, reply: Any, asked: bool, trusted: bool = True) -> None:
        """A digest: on the ROUTER from a member that syncs with us (`reply` answers it there), or on the link to
        it answering ours (`asked`)."""
        answer = self.gossip.on_digest(d, time.monotonic(), asked=asked, trusted=trusted)
        if answer is not None:
            reply(answer)

    def on_router_gossip(self, ident: bytes, msg: Digest | Suspicion, peer_address: str | None) -> None:
        """A digest or an accusation sent to this node's ROUTER (with member identities, it passed the door: its
        sender's key names it). Without them a digest naming a member must come from its host. An accusation of
        this node is answered with its report (which refutes it)."""
        if isinstance(msg, Suspicion):
            if msg.node == self.node_id:
                r = self.gossip.on_suspicion(msg, time.monotonic())
                if r is not None:
                    self._send_client(ident, r)
            return
        peer = self.links.peers.get(msg.node)
        known = peer is not None and peer.verified and self.state(msg.node) is not None
        if known and self.trust is None and not same_host(peer.addr.host, peer_address):  # type: ignore[union-attr]
            self.links.refuse("identity_mismatch", peer_address or "?", f"a digest naming {msg.node}")
            return
        # From a member not verified here yet (it just joined): it is answered, but what it says is not taken.
        self.on_digest(msg, lambda answer: self._send_client(ident, answer), asked=False, trusted=known)

    def _on_report(self, r: LoadReport, by_itself: bool = False) -> None:
        if r.node == self.node_id:
            return
        if self.s.fingerprint and r.fingerprint != self.s.fingerprint:
            self.stats["foreign_gossip"] += 1
            return
        if not self._plausible(r.node, r.incarnation, r.addr.host):
            return
        peer = self.links.peers.get(r.node)
        if peer is not None and peer.addr == r.addr and (r.incarnation, r.seq) <= (peer.incarnation, peer.seq):
            self.stats["stale_gossip"] += 1
            if r.incarnation == peer.incarnation:
                self.gossip.heard(r.node, time.monotonic())  # a repeat still says it runs
            return  # an older incarnation's late gossip, or a repeat
        if peer is None or peer.addr != r.addr:
            if peer is not None:
                self.entry.node_gone(peer.node, "peer-moved", time.monotonic())
            peer = self.links.learn(r.addr, "gossip", r.incarnation, r.fingerprint, by_itself=by_itself)
            if peer is None:
                return
        now = time.monotonic()
        self.stats["reports_in"] += 1
        if not self.gossip.on_report(r, now):
            return
        peer.last_heard = peer.last_report = now
        peer.incarnation, peer.seq = r.incarnation, r.seq
        peer.models = dict(r.models)
        peer.labels = dict(r.labels)
        peer.wants = dict(r.wants)
        peer.leaving = r.leaving
        for model, load in r.models.items():
            self.policy.observe_gossip(r.node, model, load.inflight + load.queued, load.capacity, now, load.rate)
        for model, summary in r.prefixes.items():
            self.policy.observe_prefixes(r.node, model, summary)
        for addr in r.peers:  # older nodes list their peers in every report
            if addr.node != self.node_id and self.links.peers.get(addr.node) is None:
                self.links.learn(addr, "gossip")

    def _on_leave(self, msg: Leave) -> None:
        peer = self.links.peers.get(msg.node)
        if peer is None:
            return
        if not self._plausible(msg.node, msg.incarnation, peer.addr.host):
            return
        peer.leaving = True
        self.gossip.on_leave(msg.node, msg.incarnation, time.monotonic())
        log.info("peer %s is leaving", msg.node)

    def _plausible(self, node: str, incarnation: int, host: str) -> bool:
        """Gossip whose incarnation is far ahead of this node's clock is refused and counted: believed, it would make
        the node's real reports stale (and keep it out of routing) until its clock caught up, restarts included."""
        if self.incarnation_ok(incarnation, time.monotonic()):
            return True
        ahead_s = (incarnation - time.time_ns()) / 1e9
        self.links.refuse(
            "incarnation_refused", host,
            f"gossip as {node} with an incarnation {ahead_s / 3600:.1f} h ahead of this node's clock (the limit is "
            f"{INCARNATION_AHEAD_S / 3600:g} h): a forgery, or one of the two clocks is wrong",
        )  # fmt: skip
        return False

    def heard(self, node: str, now: float) -> None:
        """Any message from `node` (a reply, a pong, a hello): proof of life."""
        self.gossip.heard(node, now)

    def on_transition(self, t: Transition) -> None:
        if t.reason == FORGOTTEN:
            peer = self.links.peers.get(t.node)
            if peer is not None:
                log.info("forgetting peer %s", t.node)
                self.drop_peer(peer, "peer-gone")
            return
        log.info("peer %s: %s -> %s (%s)", t.node, t.old.value if t.old else "-", t.new.value, t.reason)
        self.stats[f"peer_{t.new.value}"] += 1
        if t.new in (PeerState.SUSPECT, PeerState.DEAD):
            self.entry.node_gone(t.node, f"peer-{t.new.value}", time.monotonic())
        elif t.reason == "restarted":
            self.entry.node_gone(t.node, "peer-restarted", time.monotonic())
        if t.new is PeerState.ALIVE:
            if t.old in (PeerState.SUSPECT, PeerState.DEAD):
                peer = self.links.peers.get(t.node)
                if peer is not None:
                    self.links.resubscribe(peer)  # its gossip may sit on a half-open connection after an outage
            self.entry.node_back(time.monotonic())

    def drop_peer(self, peer: Peer, why: str) -> None:
        self.entry.node_gone(peer.node, why, time.monotonic())
        self.policy.forget(peer.node)
        self.links.drop(peer)

    # ------------------------------------------------------------ housekeeping

    def in_doubt(self) -> bool:
        return self._gossip is not None and self._gossip.in_doubt

    def housekeeping(self, now: float) -> None:
        if self.pub_stale:
            self.rebind_pub()
        if now >= self._next_report:
            self._next_report = now + self.s.gossip_interval
            self.gossip_report()
        self.gossip.sync_clock(time.time_ns(), now)  # incarnations are bounded by this clock (it may be stepped)
        self.gossip.tick(now, self.policy.busy_peers())
        if now >= self._next_sweep:
            self._next_sweep = now + self.s.gossip_interval
            self._sweep(now)
        self.entry.tick(now)
        self.links.hello_seeds(now)
        if now >= self._next_admission_sweep:
            self.admission.sweep(self._in_flight_for)
            self._next_admission_sweep = now + 5.0

    def _sweep(self, now: float) -> None:
        for peer in self.links.peers:
            state = self.state(peer.node)
            if state is None and not peer.last_report and now - peer.last_heard >= 2 * self.s.dead_after:
                # Claimed (hello, mDNS, digest) but never heard from itself: free its sockets (a later claim may
                # bring it back).
                log.info("dropping %s at %s:%d: never heard from it", peer.node, peer.addr.host, peer.addr.port)
                self.drop_peer(peer, "peer-gone")
            elif state is PeerState.LEFT and now - peer.last_heard > self.s.suspect_after:
                self.entry.node_gone(peer.node, "peer-left", now)

    def leave(self) -> None:
        self.leaving = True
        for _ in range(2):
            try:
                self.pub.send(encode(Leave(self.node_id, self.incarnation)), zmq.NOBLOCK)
            except zmq.Again:
                self.stats["gossip_dropped"] += 1
        self.gossip.report(time.monotonic(), {}, dict(self.server.labels), True, force=True)

    # ------------------------------------------------------------ views

    def status(self) -> list[dict[str, Any]]:
        """The nodes this node sees, itself first (for `lanmesh status`, clients learning the mesh, the console)."""
        return status_rows(self)

    def holders(self, name: str) -> list[tuple[str, str, str]]:
        """(node, host:port, version) of every live peer serving `name`, as its gossip says (any thread)."""
        out = []
        for peer in self.links.peers:
            load = peer.models.get(name)
            if load is not None and load.version and self.state(peer.node) is PeerState.ALIVE:
                out.append((peer.node, f"{peer.addr.host}:{peer.addr.port}", load.version))
        return out

    def eligible(self, req: Request, excluded: set[str] | frozenset[str]) -> tuple[list[str], bool]:
        """Eligible node ids for `req` (the node's `EntryHost.eligible`), and whether any node at all serves the
        model (a stage of it counts)."""
        out: list[str] = []
        known = False
        if self.server.serves(req.model):
            known = True
            labels = self.server.labels
            if (
                not self.leaving
                and self.node_id not in excluded
                and all(labels.get(k) == v for k, v in req.require.items())
            ):
                out.append(self.node_id)
        known = known or self.stage_known(req.model)
        if self.trust is not None and not self.trust.synced:
            return out, known  # catching up with revocations: no peer is routed to yet
        for peer in self.links.peers:
            if req.model not in peer.models:
                continue
            known = True
            if peer.node in excluded or peer.leaving:
                continue
            if self.state(peer.node) is not PeerState.ALIVE:
                continue
            if peer.serves(req.model, req.require):
                out.append(peer.node)
        return out, known

    def servers(self, model: str) -> list[str]:
        """Every node (alive or not) that announced `model`, this one included."""
        nodes = [peer.node for peer in self.links.peers if model in peer.models]
        if self.server.serves(model):
            nodes.append(self.node_id)
        return nodes

    def stage_servers(self, req: Request, excluded: set[str] | frozenset[str]) -> list[tuple[str, str, int, str]]:
        """(node, served name, the whole model's layers, version) of every pipeline stage this node and its live
        peers serve that may take `req` now (alive, not leaving, not excluded, labels matching)."""
        out = []
        if not self.leaving and self.node_id not in excluded:
            labels = self.server.labels
            if all(labels.get(k) == v for k, v in req.require.items()):
                out += [(self.node_id, name, load.layers, load.version) for name, load in self.server.models().items()
                        if load.layers]  # fmt: skip
        if self.trust is not None and not self.trust.synced:
            return out  # catching up with revocations: no peer is routed to yet
        for peer in self.links.peers:
            if peer.node in excluded or peer.leaving or self.state(peer.node) is not PeerState.ALIVE:
                continue
            out += [(peer.node, name, load.layers, load.version) for name, load in peer.models.items()
                    if load.layers and peer.serves(name, req.require)]  # fmt: skip
        return out

    def pipeline(self, req: Request, excluded: set[str], now: float) -> tuple[list[tuple[str, str]], str] | None:
        """A chain of live stage holders serving `req`'s model together (P2C among each stage's holders), and the
        route that says so (`pipeline:<why stage 1>><why stage 2>...`); None when they cannot cover it now."""
        holders = holders_of(req.model, self.stage_servers(req, excluded))

        def choose(stage: str, nodes: list[str]) -> tuple[str, str] | None:
            choice = self.policy.choose(stage, nodes, now)
            return (choice.node, choice.reason) if choice is not None else None

        found = compose_chain(holders, choose) if holders else None
        return None if found is None else (found[0], "pipeline:" + ">".join(found[1]))

    def stage_known(self, model: str) -> bool:
        """Whether any node (alive or not) serves a stage of `model`."""
        prefix = model.partition("@")[0] + "["
        models = [self.server.models(), *(p.models for p in self.links.peers)]
        return any(name.startswith(prefix) and load.layers for m in models for name, load in m.items())

    def stage_view(self, model: str) -> list[tuple[str, StageWant | None, list[tuple[str, str]]]]:
        """For the automatic split (any thread): every live peer's want of `model` and the stages of it it serves,
        as (node, want or None, [(stage name, version)])."""
        out = []
        prefix = model + "["
        for peer in self.links.peers:
            if peer.leaving or self.state(peer.node) is not PeerState.ALIVE:
                continue
            held = [(n, load.version) for n, load in peer.models.items() if n.startswith(prefix) and load.layers]
            want = peer.wants.get(model)
            if want is not None or held:
                out.append((peer.node, want, held))
        return out

    def on_refused_connection(self, kind: str, source: str) -> None:
        # Runs on the ZAP thread (which also logs it). Each of these counters has that one writer, and a
        # dict store is atomic under the GIL, so the loop's own counters are not disturbed.
        self.stats[kind] += 1

    def security_view(self, now: float) -> dict[str, Any]:
        """This node's security state for `lanmesh status` and `lanmesh doctor`."""
        return security_view(self, now)
