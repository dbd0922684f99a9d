"""A simulated network for the membership protocol: the nodes' own `Gossip` (from `mesh`), driven by an event
queue with delay and loss instead of sockets, so meshes of 10,000 nodes run on one machine.

What is modelled as the real node does it (`mesh/_membership.py`, `mesh/_node.py`):

- every node holds a link to each member it knows (a DEALER, and a SUB on its PUB); `publish` reaches every node
  that holds a link to the publisher, `send` one member over the sender's link, and answers come back on it;
- a `Hello` makes the receiver link back to the sender (and say hello in turn) and answer with its report;
- any message on a link is proof of life of the node at its other end (`Gossip.heard`);
- kill -9: every node linked to the victim sees the connection close at once and a reconnect refused soon after;
  a hung node (SIGSTOP) closes nothing: what is sent to it waits until it runs again;
- loss drops each delivery on its own, with the same probability for every message (real links are TCP, so this
  is harsher than a LAN: a lost segment is only late there, by TCP's retransmission timeout, about 0.2 s). A node
  says hello again to a member it linked to but has not heard from on `HELLO`'s schedule, which stands in for that
  retransmission (the real node re-sends only a hello its link could not take yet, and leaves a sent one to TCP).

Each node ticks every `tick` seconds, at a phase of its own.
"""

from __future__ import annotations

import collections
import gc
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mesh import FORGOTTEN, HELLO, Gossip, GossipSettings, MemberView, PeerState, Transition
from protocol import Digest, Hello, Leave, LoadReport, Member, ModelLoad, PeerAddr, Ping, Pong, Suspicion, encode

MODELS = {"echo": ModelLoad(0, 0, 64, 0.0, "0" * 64)}
LABELS = {"cores": "2"}


def addr_of(name: str, index: int) -> PeerAddr:
    return PeerAddr(name, f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}", 7000, 7001)


@dataclass
class Tally:
    """Messages delivered (each one is out at its sender and in at its receiver), by type, and their bytes."""

    messages: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes: collections.Counter[str] = field(default_factory=collections.Counter)
    dropped: int = 0

    def reset(self) -> None:
        self.messages.clear()
        self.bytes.clear()
        self.dropped = 0


class SimNode:
    """One simulated node: its `Gossip` and the links it holds. It is the `GossipHost` of its gossip."""

    def __init__(self, mesh: SimMesh, name: str, index: int, incarnation: int, view: MemberView | None = None) -> None:
        self.mesh = mesh
        self.name = name
        self.addr = addr_of(name, index)
        self.incarnation = incarnation
        self.up = True
        self.hung = False
        self.held: list[tuple[str, Any, str]] = []  # what arrived while hung
        self.hints: dict[str, list[float]] = {}  # linked to, not (yet) a member of its view: [hellos, next one due]
        rng = random.Random(f"{mesh.seed}-{name}-{incarnation}")
        self.gossip = Gossip(self.addr, incarnation, self, mesh.settings, rng=rng, view=view)

    def linked(self, node: str) -> bool:
        return node in self.hints or node in self.gossip.view

    # ------------------------------------------------------------ GossipHost

    def publish(self, msg: LoadReport | Suspicion) -> None:
        self.mesh.broadcast(self, msg)

    def send(self, node: str, msg: Ping | Digest | Suspicion) -> bool:
        if not self.linked(node):
            return False
        self.mesh.deliver(self.name, node, msg, "router")
        return True

    def learn(self, addr: PeerAddr, source: str) -> None:
        if addr.node == self.name or self.linked(addr.node):
            return
        self.hints[addr.node] = [1, self.mesh.now + HELLO.delay(1)]
        self.mesh.addresses[addr.node] = addr
        self.mesh.deliver(self.name, addr.node, Hello(self.addr, self.incarnation), "router")

    def pull(self, node: str) -> None:
        if self.linked(node):
            self.mesh.deliver(self.name, node, Hello(self.addr, self.incarnation), "router")

    def changed(self, t: Transition) -> None:
        if t.reason == FORGOTTEN:
            self.hints.pop(t.node, None)
        self.mesh.observe(self.name, t)

    # ------------------------------------------------------------ what arrives

    def receive(self, src: str, msg: Any, channel: str) -> None:
        if not self.up:
            return
        if self.hung:
            self.held.append((src, msg, channel))
            return
        now = self.mesh.now
        g = self.gossip
        if channel == "pub":
            if isinstance(msg, LoadReport):
                self._report(msg, now)
            elif isinstance(msg, Suspicion):
                g.on_suspicion(msg, now)
            elif isinstance(msg, Leave):
                g.on_leave(msg.node, msg.incarnation, now)
        elif channel == "router":  # on this node's ROUTER; answers go back on the sender's link
            if isinstance(msg, Ping):
                self.mesh.deliver(self.name, src, Pong(msg.id, self.name), "link")
            elif isinstance(msg, Hello):
                self.learn(msg.addr, "hello")
                self.mesh.deliver(self.name, src, g.current_report(), "link")
            elif isinstance(msg, Digest):
                answer = g.on_digest(msg, now, asked=False)
                if answer is not None:
                    self.mesh.deliver(self.name, src, answer, "link")
            elif isinstance(msg, Suspicion):
                refutation = g.on_suspicion(msg, now)
                if refutation is not None:
                    self.mesh.deliver(self.name, src, refutation, "link")
        else:  # on this node's link to `src`: from `src` itself
            g.heard(src, now)
            if isinstance(msg, LoadReport):
                self._report(msg, now)
            elif isinstance(msg, Digest):
                answer = g.on_digest(msg, now, asked=True)
                if answer is not None:
                    self.send(src, answer)

    def _report(self, r: LoadReport, now: float) -> None:
        if self.gossip.on_report(r, now):
            self.hints.pop(r.node, None)

    def tick(self) -> None:
        if self.up and not self.hung:
            now = self.mesh.now
            self.gossip.tick(now)
            for node, due in self.hints.items():  # links.hello_seeds: hellos to the unverified, backing off
                if now >= due[1]:
                    due[0] += 1
                    due[1] = now + HELLO.delay(int(due[0]))
                    self.mesh.deliver(self.name, node, Hello(self.addr, self.incarnation), "router")


class SimMesh:
    """Nodes, an event queue and a clock (see the module docstring)."""

    def __init__(
        self,
        settings: GossipSettings | None = None,
        *,
        loss: float = 0.0,
        delay: float = 0.0005,
        tick: float = 0.1,
        seed: int = 1,
        count_bytes: bool = False,
    ) -> None:
        self.settings = settings or GossipSettings()
        self.loss = loss
        self.delay = delay
        self.tick_every = tick
        self.seed = seed
        self.count_bytes = count_bytes
        self.rng = random.Random(seed)
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.addresses: dict[str, PeerAddr] = {}
        self.cut_off: set[str] = set()
        self.tally = Tally()
        self.transitions: list[tuple[float, str, Transition]] = []
        self.keep_transitions = True
        self.watch: Callable[[float, str, Transition], None] | None = None
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._sizes: dict[str, int] = {}
        self._order = itertools.count()
        self._index = itertools.count(1)
        self._incarnations = itertools.count(1)

    # ------------------------------------------------------------ building

    def converged(self, n: int) -> list[str]:
        """`n` nodes that already know each other, as a mesh looks once every node has joined."""
        names = [f"n{i}" for i in range(1, n + 1)]
        gc.disable()  # n views of n members: a collector pass over them costs more than the build itself
        members = []
        for name in names:
            index = next(self._index)
            self.addresses[name] = addr_of(name, index)
            members.append((name, index, next(self._incarnations)))
        proto: MemberView | None = None
        for name, _index, inc in members:
            m = Member(self.addresses[name], inc, 1, PeerState.ALIVE.value)
            if proto is None:
                proto = MemberView(m)
            else:
                proto.put(m)
        assert proto is not None
        for name, index, inc in members:
            node = SimNode(self, name, index, inc, view=proto.copy_for(name))
            node.gossip.assume_reported(self.now, MODELS, LABELS, 1)
            self._start(node)
        gc.freeze()  # what exists now lives as long as the mesh: the collector need never look at it again
        gc.enable()
        return names

    def join(self, name: str, seeds: Iterable[str]) -> SimNode:
        """A node starting now that knows only `seeds` (as `--peer`); it learns the rest from them."""
        index = next(self._index)
        node = SimNode(self, name, index, next(self._incarnations))
        self.addresses[name] = node.addr
        self._start(node)
        node.gossip.report(self.now, MODELS, LABELS)
        for seed in seeds:
            node.learn(self.addresses[seed], "seed")
        return node

    def _start(self, node: SimNode) -> None:
        self.nodes[node.name] = node
        self.at(self.now + self.rng.uniform(0, self.tick_every), self._tick, node)

    def _tick(self, node: SimNode) -> None:
        if self.nodes.get(node.name) is not node or not node.up:
            return
        node.tick()
        self.at(self.now + self.tick_every, self._tick, node)

    # ------------------------------------------------------------ faults

    def kill(self, name: str) -> None:
        """kill -9: linked nodes see the connection close now and a reconnect refused a little later."""
        node = self.nodes[name]
        node.up = False
        for other in self.nodes.values():
            if other.up and other is not node and other.linked(name):
                self.at(self.now + self._lag(), self._transport, other, name, "lost")
                self.at(self.now + 0.1 + self.rng.uniform(0, 0.4), self._transport, other, name, "refused")

    def _transport(self, node: SimNode, peer: str, what: str) -> None:
        if not node.up or node.hung or not node.linked(peer):
            return
        if what == "lost":
            node.gossip.connection_lost(peer, self.now)
        elif what == "back":
            node.gossip.reconnected(peer, self.now)
        else:
            node.gossip.unreachable(peer, self.now)

    def cut(self, name: str) -> None:
        """Unplug a node's cable: nothing reaches it or leaves it; no link closes (silence only)."""
        self.cut_off.add(name)

    def heal(self, name: str) -> None:
        """Plug it back: ZeroMQ re-makes the links it gave up, and each end sees a handshake."""
        self.cut_off.discard(name)
        node = self.nodes[name]
        for other in self.live():
            if other is not node and other.linked(name):
                self.at(self.now + 0.1 + self._lag(), self._transport, other, name, "back")
            if other is not node and node.linked(other.name):
                self.at(self.now + 0.1 + self._lag(), self._transport, node, other.name, "back")

    def hang(self, name: str) -> None:
        self.nodes[name].hung = True

    def resume(self, name: str) -> None:
        node = self.nodes[name]
        node.hung = False
        held, node.held = node.held, []
        for src, msg, channel in held:
            node.receive(src, msg, channel)

    # ------------------------------------------------------------ the network

    def _lag(self) -> float:
        return self.delay * (0.5 + self.rng.random())

    def deliver(self, src: str, dst: str, msg: Any, channel: str) -> None:
        kind = type(msg).__name__
        if isinstance(msg, Digest) and msg.members:
            kind = "Digest+members"
        self.tally.messages[kind] += 1
        if self.count_bytes:
            size = self._sizes.get(kind)
            if size is None:  # every message of a kind is about as long, but a full digest's length is its table's
                size = len(encode(msg))
                if kind != "Digest+members":
                    self._sizes[kind] = size
            self.tally.bytes[kind] += size
        if (self.loss and self.rng.random() < self.loss) or src in self.cut_off or dst in self.cut_off:
            self.tally.dropped += 1
            return
        node = self.nodes.get(dst)
        if node is not None:
            self.at(self.now + self._lag(), node.receive, src, msg, channel)

    def broadcast(self, src: SimNode, msg: Any) -> None:
        for node in self.nodes.values():
            if node is not src and node.up and node.linked(src.name):
                self.deliver(src.name, node.name, msg, "pub")

    # ------------------------------------------------------------ time

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (t, next(self._order), fn, args))

    def run_until(self, t: float) -> None:
        q = self._queue
        while q and q[0][0] <= t:
            when, _, fn, args = heapq.heappop(q)
            self.now = when
            fn(*args)
        self.now = max(self.now, t)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def run_while(self, waiting: Callable[[], bool], limit: float, step: float = 0.05) -> float | None:
        """Run until `waiting()` is false (checked every `step`); seconds taken, or None if `limit` passed."""
        start = self.now
        while waiting():
            if self.now - start >= limit:
                return None
            self.run_for(step)
        return self.now - start

    # ------------------------------------------------------------ observing

    def observe(self, observer: str, t: Transition) -> None:
        if self.keep_transitions:
            self.transitions.append((self.now, observer, t))
        if self.watch is not None:
            self.watch(self.now, observer, t)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up]

    def states_of(self, about: str) -> dict[str, PeerState | None]:
        return {n.name: n.gossip.state(about) for n in self.live() if n.name != about}

    def all_see(self, about: str, states: tuple[PeerState | None, ...]) -> bool:
        return all(n.gossip.state(about) in states for n in self.live() if n.name != about and not n.hung)

    def sees_everyone(self, node: SimNode) -> bool:
        alive = {n.name for n in self.live() if not n.hung}
        return all(node.gossip.state(other) is PeerState.ALIVE for other in alive if other != node.name)


def messages_per_node_second(tally: Tally, nodes: int, seconds: float) -> float:
    """Messages each node sent (= received, on average) per second."""
    return sum(tally.messages.values()) / nodes / seconds if nodes and seconds else math.nan
