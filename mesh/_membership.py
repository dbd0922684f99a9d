"""Membership, as the mesh loop carries it out: gossip sent and heard, peers' states and what follows from them
(fail-over, forgetting), transport events, hellos and announcements, and the node's view of the mesh.

A part `MeshNode` is composed of, with its dependencies given explicitly (it runs on the node's loop thread and uses
the node's PUB and SUB); the decisions themselves are the failure detector's (`_failure`), the entry table's
(`_entry`) and the links' identity rule (`_links`).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import DecodeError, Hello, Leave, LoadReport, PeerAddr, Ping, Request, StageWant, decode, encode

from ._failure import FORGOTTEN, FailureDetector, PeerState, Transition
from ._peers import Peer
from ._pipeline import compose_chain, holders_of
from ._prefixes import summary_news
from ._sockets import bind_pub

if TYPE_CHECKING:
    from ._admission import Admission
    from ._entry import EntryTable
    from ._links import PeerLinks
    from ._routing import RoutingPolicy
    from ._settings import LocalServer, MeshSettings
    from ._trust import Trust

log = logging.getLogger("lanmesh.mesh")

DRAIN = 256  # messages read from one socket per turn: gossip and replies keep their rhythm under load
PREFIXES_RESENT_EVERY = 8  # reports: a prefix-cache summary that did not change is sent again this often (2 s)


def model_rows(models: dict[str, Any]) -> dict[str, list[Any]]:
    """A node's models as status rows show them: `name: [in flight, queued, capacity, version (8 hex), tasks]`, each
    loaded version once (tasks: the ones it serves, [] when its node did not say). Gossip lists the current version
    twice (as `name` and as its pin `name@v8`); the pin is left out here, so loads add up. A version loaded beside
    the current one (a rollout's moment) shows as `name@v8`."""
    out: dict[str, list[Any]] = {}
    for m, v in models.items():
        name, _, pin = m.partition("@")
        current = models.get(name)
        if pin and current is not None and name != m and str(getattr(current, "version", "")).startswith(pin):
            continue
        out[m] = [v.inflight, v.queued, v.capacity, str(getattr(v, "version", ""))[:8], list(getattr(v, "tasks", ()))]
    return out


def _wants_row(wants: dict[str, StageWant]) -> dict[str, Any]:
    """A status row's `wants`: models the node would hold a stage of (the automatic split), when there are any."""
    if not wants:
        return {}
    return {"wants": {m: {"budget_mib": w.budget >> 20, "cores": w.speed} for m, w in wants.items()}}


class Membership:
    """Gossip and peer-state handling of one node (see the module docstring)."""

    def __init__(
        self,
        settings: MeshSettings,
        addr: PeerAddr,
        incarnation: int,
        server: LocalServer,
        detector: FailureDetector,
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
        self.detector = detector
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
        self._seq = 0
        self.trust: Trust | None = None  # member identities (set by the node)
        self.pub_stale = False  # the gossip PUB is to be bound again (after a revocation)
        self._next_admission_sweep = 0.0
        self._prefixes_sent: dict[str, bytes] = {}  # each model's prefix-cache summary as last gossiped

    def attach(self, pub: zmq.Socket[Any], addr: PeerAddr) -> None:
        """The node's gossip socket and its address as bound (the loop thread makes them once it starts)."""
        self._pub, self.addr = pub, addr

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
        if event == zmq.EVENT_DISCONNECTED:
            peer.disconnected = True
            for t in self.detector.connection_lost(peer.node, time.monotonic(), "connection closed"):
                self.on_transition(t)
        elif event == zmq.EVENT_CONNECT_RETRIED and peer.disconnected:
            for t in self.detector.unreachable(peer.node, time.monotonic(), "reconnect failed"):
                self.on_transition(t)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            peer.disconnected = False
            self.links.introduce(peer.dealer)  # member identities: who we are comes first on a new connection
            # Back after an outage (or new): ask at once rather than wait for its next gossip to route to it.
            self._ping(peer)
            if not peer.last_report:
                self.links.hello(peer.dealer)

    def on_hello(self, ident: bytes, msg: Hello, by_itself: bool = False) -> None:
        """A node says hello on this node's ROUTER; `by_itself`: on a connection made with its own key (member
        identities), so where it says it is now is where it is."""
        self.links.learn(msg.addr, "hello", msg.incarnation, msg.fingerprint, by_itself=by_itself)
        # Tell the newcomer who we are, so a seed contact learns our id and gossip port.
        self._send_client(ident, Hello(self.addr, self.incarnation, self.s.fingerprint))

    def on_announcement(self, ann: Any) -> None:
        if ann.fingerprint != self.s.fingerprint:
            # mDNS is anyone on the LAN: another mesh, an open (--insecure) node, or an impostor. Never connect.
            self.stats["foreign_announcements"] += 1
            self.links.note_foreign(ann.addr, ann.fingerprint, "mdns")
            return
        self.links.learn(ann.addr, "mdns", 0, ann.fingerprint)

    def _ping(self, peer: Peer) -> None:
        self._seq += 1
        try:
            peer.dealer.send(encode(Ping(f"ping-{self._seq}", self.node_id)), zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected: silence will make it dead

    # ------------------------------------------------------------ gossip

    def gossip(self) -> None:
        self._seq += 1
        digest = tuple(
            p.addr for p in self.links.peers if self.detector.state(p.node) is PeerState.ALIVE and not p.leaving
        )
        report = LoadReport(
            node=self.node_id,
            incarnation=self.incarnation,
            seq=self._seq,
            addr=self.addr,
            models={} if self.leaving else self.server.models(),
            labels=dict(self.server.labels),
            peers=digest,
            leaving=self.leaving,
            fingerprint=self.s.fingerprint,
            prefixes={} if self.leaving else self._prefix_news(),
            wants={} if self.leaving else dict(getattr(self.server, "wants", dict)()),
            revocations=self.revocations_serial(),
        )
        try:
            self.pub.send(encode(report), zmq.NOBLOCK)
        except zmq.Again:
            self.stats["gossip_dropped"] += 1

    def _prefix_news(self) -> dict[str, bytes]:
        """Prefix-cache summaries for this report: those that changed since the last one, and all of them every
        PREFIXES_RESENT_EVERY reports (a report may be lost; a peer may be new). Bounded in bytes whatever the
        caches hold (`mesh._prefixes.REPORT_BYTES`)."""
        summaries = getattr(self.server, "prefix_summaries", None)
        current: dict[str, bytes] = summaries() if summaries is not None else {}
        news = summary_news(current, self._prefixes_sent, self._seq % PREFIXES_RESENT_EVERY == 0)
        self._prefixes_sent = dict(current)
        return news

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
        if not isinstance(msg, LoadReport | Leave):
            self.stats["bad_frames"] += 1
            return
        if not self.links.gossip_from(peer, msg):
            return
        if isinstance(msg, LoadReport):
            if self.trust is not None:
                self.trust.peer_serial(peer, msg.revocations)
            # With member identities the SUB's connection was made with the peer's key: its word on where it is.
            self._on_report(msg, by_itself=self.trust is not None)
        else:
            self._on_leave(msg)

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
            return  # an older incarnation's late gossip, or a repeat
        if peer is None or peer.addr != r.addr:
            if peer is not None:
                self.entry.node_gone(peer.node, "peer-moved", time.monotonic())
            peer = self.links.learn(r.addr, "gossip", r.incarnation, r.fingerprint, by_itself=by_itself)
            if peer is None:
                return
        now = time.monotonic()
        t = self.detector.heard(r.node, now, r.incarnation, r.seq)
        if t is not None:
            self.on_transition(t)
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
        for addr in r.peers:
            if addr.node != self.node_id and self.links.peers.get(addr.node) is None:
                self.links.learn(addr, "gossip")

    def _on_leave(self, msg: Leave) -> None:
        peer = self.links.peers.get(msg.node)
        if peer is None:
            return
        if not self._plausible(msg.node, msg.incarnation, peer.addr.host):
            return
        peer.leaving = True
        t = self.detector.left(msg.node, time.monotonic(), msg.incarnation)
        if t is not None:
            self.on_transition(t)
        log.info("peer %s is leaving", msg.node)

    def _plausible(self, node: str, incarnation: int, host: str) -> bool:
        """Gossip whose incarnation is far ahead of this node's clock is refused and counted: believed, it would make
        the node's real reports stale (and keep it out of routing) until its clock caught up, restarts included."""
        if self.detector.incarnation_ok(incarnation, time.monotonic()):
            return True
        ahead_s = (incarnation - time.time_ns()) / 1e9
        self.links.refuse(
            "incarnation_refused", host,
            f"gossip as {node} with an incarnation {ahead_s / 3600:.1f} h ahead of this node's clock (the limit is "
            f"{self.detector.incarnation_ahead / 3600:g} h): a forgery, or one of the two clocks is wrong",
        )  # fmt: skip
        return False

    def heard(self, node: str, now: float) -> None:
        """Any message from `node` (a reply, a pong, a hello): proof of life."""
        t = self.detector.heard(node, now)
        if t is not None:
            self.on_transition(t)

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
            self.entry.node_back(time.monotonic())

    def drop_peer(self, peer: Peer, why: str) -> None:
        self.entry.node_gone(peer.node, why, time.monotonic())
        self.policy.forget(peer.node)
        self.links.drop(peer)

    # ------------------------------------------------------------ housekeeping

    def housekeeping(self, now: float) -> None:
        if self.pub_stale:
            self.rebind_pub()
        self.detector.sync_clock(time.time_ns(), now)  # incarnations are bounded by this clock (it may be stepped)
        for t in self.detector.tick(now):
            self.on_transition(t)
        for peer in self.links.peers:
            state = self.detector.state(peer.node)
            if state is None:
                log.info("forgetting peer %s", peer.node)
                self.drop_peer(peer, "peer-gone")
            elif state is PeerState.DEAD and not peer.last_report:
                # Claimed (Hello, mDNS, digest) but never heard from: free its sockets now, not in forget_after.
                log.info("dropping %s at %s:%d: never heard from it", peer.node, peer.addr.host, peer.addr.port)
                self.drop_peer(peer, "peer-gone")
            elif state is PeerState.SUSPECT:
                self._ping(peer)
            elif state is PeerState.LEFT and now - peer.last_heard > self.s.suspect_after:
                self.entry.node_gone(peer.node, "peer-left", now)
        self.entry.tick(now)
        self.links.hello_seeds(now)
        if now >= self._next_admission_sweep:
            self.admission.sweep(self._in_flight_for)
            self._next_admission_sweep = now + 5.0

    def leave(self) -> None:
        self.leaving = True
        for _ in range(2):
            try:
                self.pub.send(encode(Leave(self.node_id, self.incarnation)), zmq.NOBLOCK)
            except zmq.Again:
                self.stats["gossip_dropped"] += 1
        self.gossip()

    # ------------------------------------------------------------ views

    def status(self) -> list[dict[str, Any]]:
        """The nodes this node sees, itself first (for `lanmesh status`, clients learning the mesh, the console)."""
        now = time.monotonic()
        rows = [
            {
                "node": self.node_id,
                "address": f"{self.addr.host}:{self.addr.port}",
                "state": "leaving" if self.leaving else "self",
                "models": model_rows(self.server.models()),
                "labels": dict(self.server.labels),
                "last_heard_s": 0.0,
                "inflight_to": 0,
                "source": "self",
                "stats": dict(self.stats),
                "executor": self.server.stats(),
                "security": self.security_view(now),
                **_wants_row(getattr(self.server, "wants", dict)()),
            }
        ]
        for peer in self.links.peers:
            state = self.detector.state(peer.node)
            rows.append(
                {
                    "node": peer.node,
                    "address": f"{peer.addr.host}:{peer.addr.port}",
                    "state": "leaving" if peer.leaving else (state.value if state else "unknown"),
                    "models": model_rows(peer.models),
                    "labels": dict(peer.labels),
                    "last_heard_s": round(now - peer.last_heard, 3),
                    "inflight_to": self.policy.inflight_to(peer.node),
                    "source": peer.source,
                    **_wants_row(peer.wants),
                    # member identities: each node's key and certificate (clients learn node keys from them)
                    **(self.trust.row(peer.addr.key) if self.trust is not None and peer.verified else {}),
                }
            )
            chains_held = getattr(self.policy, "chains_held", None)  # cache-aware routing: what its gossip says
            if chains_held is not None:
                rows[-1]["prefix_chains"] = chains_held(peer.node)
        if self.trust is not None:
            rows[0].update(self.trust.row(self.addr.key))
        return rows

    def holders(self, name: str) -> list[tuple[str, str, str]]:
        """(node, host:port, version) of every live peer serving `name`, as its gossip says (any thread)."""
        out = []
        for peer in self.links.peers:
            load = peer.models.get(name)
            if load is not None and load.version and self.detector.state(peer.node) is PeerState.ALIVE:
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
            if self.detector.state(peer.node) is not PeerState.ALIVE:
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
            if peer.node in excluded or peer.leaving or self.detector.state(peer.node) is not PeerState.ALIVE:
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
            if peer.leaving or self.detector.state(peer.node) is not PeerState.ALIVE:
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
        return {
            "mode": "insecure" if self.s.key is None else "identities" if self.trust is not None else "curve",
            "fingerprint": self.s.fingerprint,
            "auth_rejected": self.stats["auth_rejected"],
            "handshake_failed": self.stats["handshake_failed"],
            "identity_mismatch": self.stats["identity_mismatch"],
            "identity_conflict": self.stats["identity_conflict"],
            "incarnation_refused": self.stats["incarnation_refused"],
            "bad_peer_address": self.stats["bad_peer_address"],
            **(self.trust.view() if self.trust is not None else {}),
            "foreign": [
                {k: v for k, v in e.items() if k != "last_seen"} | {"last_seen_s": round(now - e["last_seen"], 1)}
                for e in self.links.foreign.values()
            ],
        }
