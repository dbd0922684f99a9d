"""What one node knows about each other node: address, sockets, models, labels, last word."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from protocol import ModelLoad, PeerAddr, StageWant


@dataclass(slots=True)
class Peer:
    """One known peer and the DEALER this node forwards to it on."""

    addr: PeerAddr
    dealer: zmq.Socket[Any]
    source: str  # how we learned of it: seed, mdns, gossip, hello
    incarnation: int = 0
    seq: int = 0
    models: dict[str, ModelLoad] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    last_heard: float = 0.0  # monotonic; any message counts
    last_report: float = 0.0  # monotonic; last load report
    leaving: bool = False
    fingerprint: str = ""
    monitor: zmq.Socket[Any] | None = None  # transport events of `dealer`
    sub: zmq.Socket[Any] | None = None  # where its gossip arrives
    disconnected: bool = False  # its connection closed and has not come back yet
    wants: dict[str, StageWant] = field(default_factory=dict)  # models it would hold a stage of (gossiped)
    verified: bool = True  # member identities: it presented a node certificate naming its name and key
    hello_due: float = 0.0  # monotonic; until its first report, when to say hello again (`PeerLinks.hello_seeds`)
    hellos: int = 0  # hellos that could not go (the link not up yet), for `_backoff.HELLO`
    hello_sent: bool = False  # the last hello went out (on a connected link, TCP delivers it)

    @property
    def node(self) -> str:
        return self.addr.node

    def serves(self, model: str, require: dict[str, str]) -> bool:
        load = self.models.get(model)
        if load is None or load.capacity <= 0:
            return False
        return all(self.labels.get(k) == v for k, v in require.items())


class PeerTable:
    """Peers by node id and by the DEALER socket their replies arrive on."""

    def __init__(self) -> None:
        self._by_node: dict[str, Peer] = {}
        self._by_socket: dict[zmq.Socket[Any], Peer] = {}

    def __len__(self) -> int:
        return len(self._by_node)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._by_node.values()))

    def get(self, node: str) -> Peer | None:
        return self._by_node.get(node)

    def by_socket(self, sock: zmq.Socket[Any]) -> Peer | None:
        return self._by_socket.get(sock)

    def add(self, peer: Peer) -> None:
        self._by_node[peer.node] = peer
        self._by_socket[peer.dealer] = peer

    def remove(self, node: str) -> Peer | None:
        peer = self._by_node.pop(node, None)
        if peer is not None:
            self._by_socket.pop(peer.dealer, None)
        return peer

    def known_models(self) -> set[str]:
        return {m for p in self._by_node.values() for m in p.models}
