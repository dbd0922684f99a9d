"""What the mesh layer of a node is configured with (`MeshSettings`), and what it needs of the rest of its node:
the models it serves (`LocalServer`, the executor) and someone to tell about finished requests (`RequestObserver`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from protocol import DEFAULT_LIMITS, Limits, ModelLoad, Request

from ._authority import Authority
from ._identity import MemberIdentity
from ._security import MeshKey, RequestLimits


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
    def cancel(self, request_id: str, reason: str) -> bool: ...


class RequestObserver(Protocol):
    """Told about every request this node answers (metrics). Called on the mesh loop: keep it cheap.

    `where`: `local` (this node was the entry and served it), `forwarded` (the entry sent it to a peer),
    `peer` (served here for another entry node). `outcome`: `ok`, `cancelled`, or the error code's name in lower
    case.
    """

    def completed(self, model: str, outcome: str, where: str, seconds: float) -> None: ...
    def first_chunk(self, model: str, seconds: float) -> None: ...


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
    try_timeout: float = 0.0  # 0: a try lasts as long as its request (abandoned only when its node fails)
    max_tries: int = 4
    stall_timeout: float = 10.0  # the watchdog's limit on a loop that stops turning (0: no watchdog)
    fingerprint: str = ""
    limits: Limits = DEFAULT_LIMITS
    hwm: int = 20_000
    routing: str = "p2c"  # or a baseline for benchmarks: round-robin, random, least-loaded
    key: MeshKey | MemberIdentity | None = None  # None: an open mesh (plaintext, anyone may join); see _security.py
    authority: Authority | None = None  # member identities: this node holds the mesh authority (joins, revocations)
    state_dir: str = ""  # member identities: where the revocation list is kept across restarts ("": nowhere)
    request_limits: RequestLimits = field(default_factory=RequestLimits)
    max_inflight_per_client: int = 1024  # requests one client connection may have here at once
    max_inflight_per_peer: int = 2048  # requests one peer may have forwarded here at once


@dataclass(frozen=True, slots=True)
class GossipSettings:
    interval: float = 0.25  # the shortest time between two reports of one node
    probe_every: float = 0.5  # probe period (a member in doubt is probed four times as often)
    suspect_after: float = 1.0
    dead_after: float = 3.0
    forget_after: float = 300.0
    watchers: int = 3  # how many members probe each member (and how many each member probes)
    sync_every: float = 2.0  # anti-entropy: one digest to one member drawn at random
    threshold: float = 0.25  # a model's load is news once it moved by this share of its capacity (>= 1 request)
    settle: float = 2.0  # a smaller difference is news once it has lasted this long

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.suspect_after < self.dead_after or not math.isfinite(self.dead_after):
            raise ValueError(
                f"need 0 < interval < suspect_after < dead_after, got {self.interval}, {self.suspect_after}, "
                f"{self.dead_after}"
            )
        if not 0 < self.probe_every <= self.suspect_after / 2:
            raise ValueError(f"need 0 < probe_every <= suspect_after / 2, got {self.probe_every}, {self.suspect_after}")
        if self.watchers < 1 or self.sync_every <= 0 or self.threshold < 0 or self.settle <= 0:
            raise ValueError("watchers >= 1, sync_every > 0, threshold >= 0 and settle > 0 are required")
