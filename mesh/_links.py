"""A node's links to its peers: one DEALER per peer (requests out, answers back), the SUB that hears their gossip,
seeds, hellos, and the rule of who may claim to be whom.

Links cost nothing while idle: no ZMTP heartbeats (a heartbeat per link would make every node's traffic grow with the
mesh; liveness is the gossip's probes), only a TCP keepalive every two minutes. Data that a peer does not acknowledge
within `dead_after` gives the connection up (TCP_MAXRT), a connect attempt gives up after half a second, and
ZeroMQ reconnects at most half a second apart, so a link dropped silently (a cable, a Wi-Fi blip, a firewall) is
re-made within about a second of the network coming back, whatever the length of the outage; a link that carried
nothing meanwhile never noticed. The SUB connection to a peer that comes back from the dead is made afresh
(`resubscribe`): its gossip may otherwise sit on a half-open connection.

Gossip arrives on one SUB per peer, connected to that peer's PUB: a report is believed only from the peer it names.

Identity with one shared mesh key: the key proves membership, not which member. A peer's name is bound to the
address it was learned at while it is alive: a claim to a live peer's name at another address (a LoadReport, a
Hello, a seed's answer, an announcement) is refused, counted (`identity_conflict`) and logged with both addresses.
A node that really moved (restarted elsewhere, a new DHCP lease) is accepted once its old address is dead or left.
With member identities a peer's name is bound to its key (`_members`): every link to it expects that key of the
server, nothing it says is believed before it presented a node certificate naming that key (`verified`), and a
move it announces itself, on a connection made with its key, is taken at once.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from protocol import Credentials, Hello, Leave, LoadReport, PeerAddr, Suspicion, encode

from ._backoff import HELLO
from ._certs import key_bytes
from ._failure import PeerState
from ._identity import MemberIdentity
from ._members import Members
from ._peers import Peer, PeerTable
from ._security import MeshKey, Plaintext, RejectionLog, valid_peer_host
from ._sockets import SocketPoller, tcp_options

log = logging.getLogger("lanmesh.mesh")

PEER_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
MAX_UNVERIFIED_PEERS = 256  # peers learned from claims (Hello, mDNS, digests) whose own report has not arrived yet
# A connect attempt into a silent network gives up after this and tries afresh (a SYN the kernel keeps
# retransmitting with backoff would reach a healed network seconds late): with the reconnect interval below,
# a link that comes back is used again within about a second.
_CONNECT_TIMEOUT_MS = 500
_RECONNECT_MS, _RECONNECT_MAX_MS = 100, 500
_SEED_HELLO_S = 0.5  # hellos to seeds that are not (yet) alive members


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() in ("localhost", "localhost.")


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
    bind: str
    fingerprint: str
    hwm: int
    dead_after: float
    key: MeshKey | MemberIdentity | None
    limits: Any


class PeerLinks:
    """The sockets to every peer and seed, and who may be learned as which peer. Used on the mesh loop only."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        poller: SocketPoller,
        settings: LinkSettings,
        state: Callable[[str], PeerState | None],
        stats: collections.Counter[str],
        incarnation_ok: Callable[[int, float], bool],
    ) -> None:
        self.ctx = ctx
        self.poller = poller
        self.s = settings
        self.state = state  # what the node believes of a peer (its gossip's view)
        self.incarnation_ok = incarnation_ok  # whether an incarnation is plausible by this node's clock
        self.stats = stats
        self.peers = PeerTable()
        self.monitors: dict[zmq.Socket[Any], Peer] = {}
        self.subs: dict[zmq.Socket[Any], Peer] = {}  # each peer's gossip arrives on a SUB of its own
        self.seeds: dict[tuple[str, int], tuple[zmq.Socket[Any], str]] = {}  # (host, port) -> (DEALER, its key)
        self.security: MeshKey | MemberIdentity | Plaintext = settings.key or Plaintext()
        self.identity = settings.key if isinstance(settings.key, MemberIdentity) else None
        self.members: Members | None = None  # with member identities: who is who (set by the node)
        self.credentials: Callable[[], bytes] | None = None  # this node's Credentials frame (member identities)
        self.foreign: dict[tuple[str, str], dict[str, Any]] = {}  # other meshes seen, for status and doctor
        self._closing: list[zmq.Socket[Any]] = []  # closed after the loop's turn: one may be being read now
        self._next_seed_hello = 0.0
        self.awaiting_reports = False  # a peer was learned and has not reported yet (`hello_seeds`)
        self._log = RejectionLog()
        self.addr: PeerAddr | None = None  # this node's own address, once bound
        self.incarnation = 0

    # ------------------------------------------------------------ sockets

    def _sub(self, addr: PeerAddr) -> zmq.Socket[Any]:
        """The SUB that hears one peer's gossip: connected to its PUB, expecting its key of the server."""
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        sub.setsockopt(zmq.RCVHWM, 1000)
        link_options(sub, self.s.dead_after)
        self.security.configure_client(sub, server_key=addr.key)
        sub.connect(f"tcp://{addr.host}:{addr.pub_port}")
        return sub

    def _dealer(self, server_key: str = "") -> zmq.Socket[Any]:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues towards a peer that is not connected
        dealer.setsockopt(zmq.SNDHWM, self.s.hwm)
        dealer.setsockopt(zmq.RCVHWM, self.s.hwm)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        link_options(dealer, self.s.dead_after)
        self.security.configure_client(dealer, server_key=server_key)
        return dealer

    def close_later(self) -> None:
        """Close sockets dropped during this turn (never while a drain may still hold one)."""
        for sock in self._closing:
            sock.close(0)
        self._closing.clear()

    # ------------------------------------------------------------ learning peers

    def learn(
        self, addr: PeerAddr, source: str, incarnation: int = 0, fingerprint: str = "", by_itself: bool = False
    ) -> Peer | None:
        """Add a peer (connect a DEALER and a SUB, say hello); None when the claim is refused. `by_itself`: the claim
        came from the peer's own key (member identities), so it may move the peer from a live address."""
        if addr.node == self.s.node_id:
            return None
        if self.members is not None:
            problem = self.key_problem(addr)
            if problem:
                self.refuse(
                    "name_refused", source, f"a claim that {addr.node} is at {addr.host}:{addr.port}: {problem}"
                )
                return None
        if not valid_peer_host(addr.host):
            self.refuse("bad_peer_address", source, f"{addr.node} claims host {addr.host[:64]!r}")
            return None
        nowhere = self.not_a_peer_address(addr.host, addr.port)
        if nowhere:
            self.refuse("bad_peer_address", source, f"{addr.node} claims {addr.host}:{addr.port}, {nowhere}")
            return None
        if incarnation and not self.incarnation_ok(incarnation, time.monotonic()):
            self.refuse("incarnation_refused", source, f"{addr.node} claims an incarnation far ahead of this node's "
                        "clock (a forgery, or one of the two clocks is wrong)")  # fmt: skip
            return None
        if self.s.fingerprint and fingerprint and fingerprint != self.s.fingerprint:
            self.stats["foreign_announcements"] += 1
            self.note_foreign(addr, fingerprint, source)
            return None
        old = self.peers.get(addr.node)
        if old is not None:
            if old.addr == addr:
                return old
            if not by_itself and not self.may_move(old):
                self.identity_conflict(old, f"{addr.host}:{addr.port}", f"{source} naming {addr.node}")
                return None
            log.info("peer %s moved from %s:%d to %s:%d", addr.node, old.addr.host, old.addr.port, addr.host, addr.port)
            self.drop(old)
        elif sum(1 for p in self.peers if not p.last_report) >= MAX_UNVERIFIED_PEERS:
            # Claims cost a socket each until the peer's own gossip proves it real: bound what they can make us hold.
            self.stats["learn_refused"] += 1
            return None
        dealer = self._dealer(addr.key)
        # Transport events tell a crashed process (connection closed, reconnect refused) in ~0.1 s;
        # hangs and partitions close nothing and are left to the silence timers and heartbeats.
        monitor = dealer.get_monitor_socket(PEER_EVENTS)
        dealer.connect(f"tcp://{addr.host}:{addr.port}")
        peer = Peer(addr=addr, dealer=dealer, source=source, incarnation=incarnation, fingerprint=fingerprint)
        peer.verified = self.members is None  # with member identities: once it presented its certificate
        peer.monitor = monitor
        self.monitors[monitor] = peer
        self.poller.register(monitor, zmq.POLLIN)
        self.poller.register(dealer, zmq.POLLIN)
        if peer.verified:
            self.subscribe(peer)
        peer.last_heard = time.monotonic()  # learned now: dropped if it never speaks for itself (`Membership`)
        self.peers.add(peer)
        self.hello_peer(peer, peer.last_heard)
        self.awaiting_reports = self.awaiting_reports or not peer.hello_sent
        log.info("learned peer %s at %s:%d via %s", addr.node, addr.host, addr.port, source)
        return peer

    def not_a_peer_address(self, host: str, port: int) -> str:
        """Why a claimed peer address cannot be another node ("" when it may be): this node itself under another
        name, the unspecified address, a multicast or broadcast group, or loopback while this node is not on it.
        Connecting there made a node list aliases of itself as flapping peers."""
        ip: ipaddress.IPv4Address | None
        try:
            ip = ipaddress.IPv4Address(host)
        except ValueError:
            ip = ipaddress.IPv4Address("127.0.0.1") if host.lower() in ("localhost", "localhost.") else None
        own = self.addr
        if own is not None and port == own.port and (host == own.host or ip is not None and self._is_local(ip)):
            return "which is this node itself"
        if ip is None:
            return ""  # a DNS name: resolved off the loop, its gossip checked against that address
        if ip.is_unspecified:
            return "the unspecified address (nobody)"
        if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            return "a multicast or broadcast address"
        if ip.is_loopback and not (own is not None and _is_loopback(own.host)):
            return "a loopback address while this node is not on loopback (it would reach this machine)"
        return ""

    def _is_local(self, ip: ipaddress.IPv4Address) -> bool:
        """Whether `ip` reaches this node's ROUTER: the address it binds, or, where it binds every address, any
        address of this machine (a bind to a free port on `ip` succeeds only for this machine's addresses)."""
        bind = self.s.bind
        if bind not in ("0.0.0.0", "*", ""):
            return str(ip) == bind
        if ip.is_loopback or ip.is_unspecified:
            return True
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind((str(ip), 0))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def subscribe(self, peer: Peer) -> None:
        """Listen to a peer's gossip; again on a link already made (member identities: the peer just answered this
        node's certificate, so its PUB, which admits only nodes it knows, lets the new handshake in; libzmq never
        retries a handshake its ZAP refused, as one made before the peer knew this node may have been)."""
        if peer.sub is None:
            peer.sub = self._sub(peer.addr)
            self.subs[peer.sub] = peer
            self.poller.register(peer.sub, zmq.POLLIN)
            return
        endpoint = f"tcp://{peer.addr.host}:{peer.addr.pub_port}"
        try:
            peer.sub.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # not connected (any more): connect afresh
        self.security.configure_client(peer.sub, server_key=peer.addr.key)
        peer.sub.connect(endpoint)

    def key_problem(self, addr: PeerAddr) -> str:
        """Why a claim that node `addr.node` is at `addr` cannot be taken, with member identities ('' if it can)."""
        assert self.members is not None
        try:
            key = key_bytes(addr.key)
        except ValueError:
            return "it names no key (a node of a mesh without member identities?)"
        return self.members.claim_problem(addr.node, key)

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
        if peer.sub is not None:
            self.poller.unregister(peer.sub)
            self.subs.pop(peer.sub, None)
            self._closing.append(peer.sub)

    def resubscribe(self, peer: Peer) -> None:
        """Make the SUB connection to a peer's gossip afresh: after an outage the old one may be half-open (the peer
        gave it up while this side, which only listens, never noticed), and its news would not arrive."""
        if peer.sub is not None and peer.verified:
            self.subscribe(peer)

    # ------------------------------------------------------------ hellos and seeds

    def _hello_frame(self) -> bytes:
        assert self.addr is not None
        return encode(Hello(self.addr, self.incarnation, self.s.fingerprint))

    def introduce(self, dealer: zmq.Socket[Any]) -> None:
        """With member identities: this node's certificate, the first thing on a new connection (else nothing)."""
        if self.credentials is not None:
            try:
                dealer.send(self.credentials(), zmq.NOBLOCK)
            except zmq.Again:
                return  # not connected: the handshake's event introduces us again
            self.poller.touch(dealer)  # a send may take the notification of a message that just arrived

    def hello(self, dealer: zmq.Socket[Any]) -> bool:
        """Say hello on a peer's link; False when it could not go (not connected yet: IMMEDIATE drops it)."""
        self.introduce(dealer)
        try:
            dealer.send(self._hello_frame(), zmq.NOBLOCK)
        except zmq.Again:
            return False  # the handshake's event, gossip (theirs, once they know us) or `hello_seeds` says it again
        self.poller.touch(dealer)
        return True

    def hello_peer(self, peer: Peer, now: float) -> None:
        """A hello that went out on a connected link is TCP's to deliver (the next one is a safety net, 0.5 s on);
        one that could not go is tried again soon (`_backoff.HELLO`), until the link is up."""
        peer.hello_sent = self.hello(peer.dealer)
        if peer.hello_sent:
            peer.hello_due = now + _SEED_HELLO_S
        else:
            peer.hellos += 1
            peer.hello_due = now + HELLO.delay(peer.hellos)

    def add_seed(self, seed: str) -> None:
        """A seed `host:port` (with member identities `KEY@host:port`, or a node of the identity file)."""
        key, _, address = seed.rpartition("@")
        host, _, port = address.rpartition(":")
        if self.identity is not None and not key:
            key = self.identity.node_keys.key_for(f"tcp://{address}") or ""
            if not key:
                log.error("seed %s: no key is known for it; give it as KEY@%s (KEY: the node's public key, in "
                          "its key file and `lanmesh status`); ignoring it", seed, address)  # fmt: skip
                return
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.MAXMSGSIZE, self.s.limits.max_frame_bytes)
        dealer.setsockopt(zmq.SNDHWM, 100)  # only Hellos go out here, one a second
        dealer.setsockopt(zmq.RCVHWM, 100)
        link_options(dealer, self.s.dead_after)
        try:
            self.security.configure_client(dealer, server_key=key)
            dealer.connect(f"tcp://{host}:{int(port)}")
        except (zmq.ZMQError, ValueError) as exc:
            log.error("seed %s is not a usable address (%s); ignoring it", seed, exc)
            dealer.close(0)
            return
        self.seeds[(host, int(port))] = (dealer, key)
        self.poller.register(dealer, zmq.POLLIN)

    def on_seed_answer(self, key: str, msg: Any) -> None:
        """A seed's answer on its DEALER: its Hello (with member identities after its certificate, which goes into
        the book, and naming the key this node connected with)."""
        if isinstance(msg, Credentials) and self.members is not None and key:
            self.members.present(msg.cert, key_bytes(key))
        elif isinstance(msg, Hello) and (not key or msg.addr.key == key):
            self.learn(msg.addr, "seed", msg.incarnation, msg.fingerprint, by_itself=bool(key))

    def seed_key(self, sock: zmq.Socket[Any]) -> str | None:
        """The key a seed DEALER expects of its server ("" without member identities); None: not a seed."""
        for dealer, key in self.seeds.values():
            if dealer is sock:
                return key
        return None

    def hello_seeds(self, now: float) -> None:
        waiting = False
        for peer in self.peers:
            if not peer.last_report:  # learned but never heard: maybe it does not know us yet
                if now >= peer.hello_due:
                    self.hello_peer(peer, now)
                waiting = waiting or not peer.hello_sent and HELLO.delay(peer.hellos) < HELLO.cap
        self.awaiting_reports = waiting  # the loop keeps its fine clock for the backoff's short steps (not after)
        if now < self._next_seed_hello:
            return
        self._next_seed_hello = now + _SEED_HELLO_S
        known = {(p.addr.host, p.addr.port) for p in self.peers if self.state(p.node) is PeerState.ALIVE}
        hello = self._hello_frame()
        for where, (dealer, _key) in self.seeds.items():
            if where in known:
                continue
            self.introduce(dealer)
            try:
                dealer.send(hello, zmq.NOBLOCK)
            except zmq.Again:
                self.stats["seed_unreachable"] += 1
            else:
                self.poller.touch(dealer)

    # ------------------------------------------------------------ who may say what

    def gossip_from(self, peer: Peer, msg: LoadReport | Leave | Suspicion) -> bool:
        """Gossip on a peer's own SUB must name that peer as its sender (a report's or goodbye's node, a suspicion's
        `by`), and, with member identities, come after its certificate."""
        if not peer.verified:
            self.stats["unverified_gossip"] += 1  # its certificate is on its way (a Hello answer): the next report
            return False
        sender = msg.by if isinstance(msg, Suspicion) else msg.node
        if sender == peer.node:
            return True
        self.refuse("identity_mismatch", f"{peer.addr.host}:{peer.addr.pub_port}",
                    f"gossip on {peer.node}'s link claiming to be {sender}")  # fmt: skip
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
