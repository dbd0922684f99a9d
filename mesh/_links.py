"""A node's links to its peers: one DEALER per peer (requests out, answers back), the SUB that hears their gossip,
seeds, hellos, and the rule of who may claim to be whom.

Links cost nothing while idle: no ZMTP heartbeats (a heartbeat per link would make every node's traffic grow with the
mesh; liveness is the gossip's probes), only a TCP keepalive every two minutes. Data that a peer does not acknowledge
within `dead_after` gives the connection up (TCP_MAXRT), a connect attempt gives up after half a second, and
ZeroMQ reconnects at most half a second apart, so a link dropped silently (a cable, a Wi-Fi blip, a firewall) is
re-made within about a second of the network coming back, whatever the length of the outage; a link that carried
nothing meanwhile never noticed. The SUB connection to a peer that comes back from the dead is made afresh
(`resubscribe`): its gossip may otherwise sit on a half-open connection.

Identity: one mesh key proves membership, not which member. A peer's name is bound to the address it gossips
from while it is alive: a claim to a live peer's name from another address (a LoadReport, a Hello, a seed's
answer, an announcement) is refused, counted (`identity_conflict`) and logged with both addresses. A node that
really moved (restarted elsewhere, a new DHCP lease) is accepted once its old address is dead or has left. Peers
advertised by DNS name are resolved once, off the mesh loop, and their gossip is checked against that address.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from protocol import Hello, Leave, LoadReport, PeerAddr, Suspicion, encode

from ._failure import PeerState
from ._peers import Peer, PeerTable
from ._security import MeshKey, Plaintext, RejectionLog, same_host, valid_peer_host
from ._sockets import SocketPoller, tcp_options

log = logging.getLogger("lanmesh.mesh")

PEER_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
MAX_UNVERIFIED_PEERS = 256  # peers learned from claims (Hello, mDNS, digests) whose own report has not arrived yet
# A connect attempt into a silent network gives up after this and tries afresh (a SYN the kernel keeps
# retransmitting with backoff would reach a healed network seconds late): with the reconnect interval below,
# a link that comes back is used again within about a second.
_CONNECT_TIMEOUT_MS = 500
_RECONNECT_MS, _RECONNECT_MAX_MS = 100, 500
_SEED_HELLO_S = 0.5  # hellos to seeds and to peers that have not reported yet


def link_options(sock: zmq.Socket[Any], dead_after_s: float) -> None:
    """What every peer link (DEALER, SUB) sets: reconnect quickly, give up on data nobody acknowledges, never wait
    on a dead SYN, and say nothing while idle."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
    tcp_options(sock, dead_after_s)


class LinkSettings(Protocol):
    node_id: str
    fingerprint: str
    hwm: int
    dead_after: float
    key: MeshKey | None
    limits: Any


class Resolver:
    """DNS names of peers resolved to IPv4 once, in a thread of its own (a lookup can take seconds)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._done: dict[str, str | None] = {}
        self._asked: set[str] = set()
        self._lock = threading.Lock()
        self._wake = wake

    def address(self, host: str) -> str | None | bool:
        """The IPv4 of `host`: the host itself when it is an IP; None when it could not be resolved; False while
        the lookup is under way (asked now if it was not yet)."""
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        with self._lock:
            if host in self._done:
                return self._done[host]
            if host in self._asked:
                return False
            self._asked.add(host)
        threading.Thread(target=self._lookup, args=(host,), name="lanmesh-resolve", daemon=True).start()
        return False

    def _lookup(self, host: str) -> None:
        try:
            found: str | None = str(socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0])
        except (OSError, IndexError, UnicodeError):
            found = None
        with self._lock:
            self._done[host] = found
        self._wake()


class PeerLinks:
    """The sockets to every peer and seed, and who may be learned as which peer. Used on the mesh loop only."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        poller: SocketPoller,
        settings: LinkSettings,
        state: Callable[[str], PeerState | None],
        stats: collections.Counter[str],
        wake: Callable[[], None],
    ) -> None:
        self.ctx = ctx
        self.poller = poller
        self.s = settings
        self.state = state  # what the node believes of a peer (its gossip's view)
        self.stats = stats
        self.peers = PeerTable()
        self.monitors: dict[zmq.Socket[Any], Peer] = {}
        self.seeds: dict[tuple[str, int], zmq.Socket[Any]] = {}
        self.security: MeshKey | Plaintext = settings.key or Plaintext()
        self.resolver = Resolver(wake)
        self.foreign: dict[tuple[str, str], dict[str, Any]] = {}  # other meshes seen, for status and doctor
        self._sub_endpoints: set[str] = set()
        self._closing: list[zmq.Socket[Any]] = []  # closed after the loop's turn: one may be being read now
        self._next_seed_hello = 0.0
        self._log = RejectionLog()
        self.addr: PeerAddr | None = None  # this node's own address, once bound
        self.incarnation = 0
        self.sub: zmq.Socket[Any] | None = None

    # ------------------------------------------------------------ sockets

    def open_sub(self) -> zmq.Socket[Any]:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        sub.setsockopt(zmq.RCVHWM, 1000)
        link_options(sub, self.s.dead_after)
        self.security.configure_client(sub)
        self.sub = sub
        return sub

    def _dealer(self) -> zmq.Socket[Any]:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues towards a peer that is not connected
        dealer.setsockopt(zmq.SNDHWM, self.s.hwm)
        dealer.setsockopt(zmq.RCVHWM, self.s.hwm)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        link_options(dealer, self.s.dead_after)
        self.security.configure_client(dealer)
        return dealer

    def close_later(self) -> None:
        """Close sockets dropped during this turn (never while a drain may still hold one)."""
        for sock in self._closing:
            sock.close(0)
        self._closing.clear()

    # ------------------------------------------------------------ learning peers

    def learn(self, addr: PeerAddr, source: str, incarnation: int = 0, fingerprint: str = "") -> Peer | None:
        """Add a peer (connect a DEALER and the SUB, say hello); None when the claim is refused."""
        if addr.node == self.s.node_id:
            return None
        if not valid_peer_host(addr.host):
            self.refuse("bad_peer_address", source, f"{addr.node} claims host {addr.host[:64]!r}")
            return None
        if self.s.fingerprint and fingerprint and fingerprint != self.s.fingerprint:
            self.stats["foreign_announcements"] += 1
            self.note_foreign(addr, fingerprint, source)
            return None
        old = self.peers.get(addr.node)
        if old is not None:
            if old.addr == addr:
                return old
            if not self.may_move(old):
                self.identity_conflict(old, f"{addr.host}:{addr.port}", f"{source} naming {addr.node}")
                return None
            log.info("peer %s moved from %s:%d to %s:%d", addr.node, old.addr.host, old.addr.port, addr.host, addr.port)
            self.drop(old)
        elif sum(1 for p in self.peers if not p.last_report) >= MAX_UNVERIFIED_PEERS:
            # Claims cost a socket each until the peer's own gossip proves it real: bound what they can make us hold.
            self.stats["learn_refused"] += 1
            return None
        dealer = self._dealer()
        # Transport events tell a crashed process (connection closed, reconnect refused) in ~0.1 s;
        # hangs and partitions close nothing and are left to the silence timers and heartbeats.
        monitor = dealer.get_monitor_socket(PEER_EVENTS)
        dealer.connect(f"tcp://{addr.host}:{addr.port}")
        peer = Peer(addr=addr, dealer=dealer, source=source, incarnation=incarnation, fingerprint=fingerprint)
        peer.monitor = monitor
        self.monitors[monitor] = peer
        self.poller.register(monitor, zmq.POLLIN)
        self.poller.register(dealer, zmq.POLLIN)
        peer.last_heard = time.monotonic()  # learned now: dropped if it never speaks for itself (`Membership`)
        self.peers.add(peer)
        endpoint = f"tcp://{addr.host}:{addr.pub_port}"
        if endpoint not in self._sub_endpoints and self.sub is not None:
            self.sub.connect(endpoint)
            self._sub_endpoints.add(endpoint)
        self.resolver.address(addr.host)  # a DNS name: start resolving it now, its gossip will need it
        self.hello(dealer)
        log.info("learned peer %s at %s:%d via %s", addr.node, addr.host, addr.port, source)
        return peer

    def may_move(self, old: Peer) -> bool:
        """Whether a peer's name may move to another address: only once the old one is dead, left or never spoke."""
        state = self.state(old.node)
        return not old.last_report or state in (PeerState.DEAD, PeerState.LEFT, None)

    def drop(self, peer: Peer) -> None:
        """Forget a peer and its sockets (the caller fails over what was in flight there first)."""
        self.peers.remove(peer.node)
        self.poller.unregister(peer.dealer)
        if peer.monitor is not None:
            self.poller.unregister(peer.monitor)
            self.monitors.pop(peer.monitor, None)
            peer.dealer.disable_monitor()
            self._closing.append(peer.monitor)
        self._closing.append(peer.dealer)
        endpoint = f"tcp://{peer.addr.host}:{peer.addr.pub_port}"
        still_used = any(f"tcp://{p.addr.host}:{p.addr.pub_port}" == endpoint for p in self.peers)
        if endpoint in self._sub_endpoints and not still_used and self.sub is not None:
            self.sub.disconnect(endpoint)
            self._sub_endpoints.discard(endpoint)

    def resubscribe(self, peer: Peer) -> None:
        """Make the SUB connection to a peer's gossip afresh: after an outage the old one may be half-open (the peer
        gave it up while this side, which only listens, never noticed), and its news would not arrive."""
        endpoint = f"tcp://{peer.addr.host}:{peer.addr.pub_port}"
        if endpoint in self._sub_endpoints and self.sub is not None:
            self.sub.disconnect(endpoint)
            self.sub.connect(endpoint)

    # ------------------------------------------------------------ hellos and seeds

    def _hello_frame(self) -> bytes:
        assert self.addr is not None
        return encode(Hello(self.addr, self.incarnation, self.s.fingerprint))

    def hello(self, dealer: zmq.Socket[Any]) -> None:
        try:
            # Queued (not IMMEDIATE-dropped) only once connected; the seed timer re-sends.
            dealer.send(self._hello_frame(), zmq.NOBLOCK)
        except zmq.Again:
            return  # not connected yet: gossip (theirs, once they know us) or the next hello will do
        self.poller.touch(dealer)

    def add_seed(self, seed: str) -> None:
        host, _, port = seed.rpartition(":")
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        dealer.setsockopt(zmq.SNDHWM, 100)  # only Hellos go out here, one a second
        dealer.setsockopt(zmq.RCVHWM, 100)
        link_options(dealer, self.s.dead_after)
        self.security.configure_client(dealer)
        try:
            dealer.connect(f"tcp://{host}:{int(port)}")
        except zmq.ZMQError as exc:
            log.error("seed %s is not a usable address (%s); ignoring it", seed, exc)
            dealer.close(0)
            return
        self.seeds[(host, int(port))] = dealer
        self.poller.register(dealer, zmq.POLLIN)

    def is_seed(self, sock: zmq.Socket[Any]) -> bool:
        return sock in self.seeds.values()

    def hello_seeds(self, now: float) -> None:
        if now < self._next_seed_hello:
            return
        self._next_seed_hello = now + _SEED_HELLO_S
        known = {(p.addr.host, p.addr.port) for p in self.peers if self.state(p.node) is PeerState.ALIVE}
        hello = self._hello_frame()
        for peer in self.peers:
            if not peer.last_report:  # learned but never heard: maybe it does not know us yet
                self.hello(peer.dealer)
        for key, dealer in self.seeds.items():
            if key in known:
                continue
            try:
                dealer.send(hello, zmq.NOBLOCK)
            except zmq.Again:
                self.stats["seed_unreachable"] += 1
            else:
                self.poller.touch(dealer)

    # ------------------------------------------------------------ who may say what

    def gossip_from_claimed_host(self, msg: LoadReport | Leave | Suspicion, frame: zmq.Frame) -> bool:
        """Gossip names its sender (a report's or goodbye's node, a suspicion's `by`); accept it only from the
        address that node claims (the SUB connection's peer), and never a report that would move a live peer
        elsewhere."""
        try:
            value = frame.get("Peer-Address")
        except zmq.ZMQError:
            value = None  # no transport address on this connection: nothing to compare
        seen = value if isinstance(value, str) else None
        if isinstance(msg, LoadReport):
            if msg.node == self.s.node_id:
                return True
            host = msg.addr.host
            if f"tcp://{host}:{msg.addr.pub_port}" not in self._sub_endpoints:
                self.stats["gossip_unsubscribed"] += 1  # e.g. from an endpoint just dropped; not ours to trust
                return False
            known = self.peers.get(msg.node)
            if known is not None and known.addr != msg.addr and not self.may_move(known):
                self.identity_conflict(known, f"{host}:{msg.addr.port} (seen from {seen or '?'})", "gossip")
                return False
        else:
            sender = msg.by if isinstance(msg, Suspicion) else msg.node
            peer = self.peers.get(sender)
            if peer is None:
                return isinstance(msg, Leave)  # a Leave for a node we do not know changes nothing
            host = peer.addr.host
        resolved = self.resolver.address(host)
        if resolved is False:
            self.stats["gossip_unresolved"] += 1  # its name is being resolved: the next report (in 250 ms) counts
            return False
        if resolved is not None and same_host(str(resolved), seen):
            return True
        claimed = msg.by if isinstance(msg, Suspicion) else msg.node
        self.refuse("identity_mismatch", seen or "?", f"gossip claiming to be {claimed} at {host}")
        return False

    def speaks_for(self, peer: Peer, msg: Any) -> bool:
        """A message on a peer's DEALER comes from that peer: any node it names must be that peer."""
        claimed = msg.addr.node if isinstance(msg, Hello) else getattr(msg, "node", "")
        if not claimed or claimed == peer.node:
            return True
        self.refuse("identity_mismatch", f"{peer.addr.host}:{peer.addr.port}", f"{type(msg).__name__} naming {claimed}")
        return False

    def identity_conflict(self, live: Peer, claimed_at: str, what: str) -> None:
        self.stats["identity_conflict"] += 1
        line = self._log.note(
            "identity conflict", claimed_at,
            f"{what} claims {live.node}, which is alive at {live.addr.host}:{live.addr.port}; refused",
        )  # fmt: skip
        if line is not None:
            log.warning("%s", line, extra={"source": claimed_at})

    def refuse(self, counter: str, source: str, what: str) -> None:
        self.stats[counter] += 1
        line = self._log.note(counter.replace("_", " "), source, f"{what}, dropped")
        if line is not None:
            log.warning("%s", line, extra={"source": source})

    def note_foreign(self, addr: PeerAddr, fingerprint: str, source: str) -> None:
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
