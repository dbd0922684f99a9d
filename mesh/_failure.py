"""Failure detection: a pure state machine that turns "heard from a peer" and silence into peer states.

No sockets, threads, sleeps or clock: the node feeds it observations with the time they happened (`now`, any
monotonic seconds) and calls `tick(now)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["FORGOTTEN", "INCARNATION_AHEAD_S", "FailureDetector", "PeerState", "Transition"]

# How far ahead of this node's own clock a peer's incarnation (its wall clock at start, in ns) may be. Honest
# incarnations are never ahead of the peer's clock, so this is the clock skew tolerated between two machines: an hour
# covers LAN clocks minutes apart; a forged incarnation further ahead would make every real report look stale.
INCARNATION_AHEAD_S = 3600.0


class PeerState(StrEnum):
    """What this node believes about a peer."""

    ALIVE = "alive"  # heard recently: route work to it
    SUSPECT = "suspect"  # silent for a while: route nothing new, ping it, fail over what is in flight
    DEAD = "dead"  # silent for long: gone until heard again
    LEFT = "left"  # said goodbye: gone until it comes back with a higher incarnation


FORGOTTEN = "forgotten"
"""Reason of the `Transition` that `tick()` reports when it drops a DEAD or LEFT node (see `tick`)."""


@dataclass(frozen=True, slots=True)
class Transition:
    """A change in a peer's state, with why it happened (for logs and tracing).

    Reasons: "new", "heard", "restarted", "left", "silent 1.0s" (the silence measured), and `FORGOTTEN`.
    """

    node: str
    old: PeerState | None
    new: PeerState
    reason: str


@dataclass(slots=True)
class _Peer:
    state: PeerState
    last_heard: float
    since: float  # when it entered `state`: forgetting counts from the moment it became DEAD or LEFT
    incarnation: int | None
    seq: int | None


class FailureDetector:
    """Tracks liveness of peers from the messages they send.

    Rules, in the order `heard()` applies them:

    1. Any message from a peer is proof of life, except a stale one. A message is stale when its
       incarnation is lower than the highest seen, or when it has the same incarnation and a `seq`
       not above the highest seen (a late or duplicated gossip). A stale message changes nothing and
       `heard()` returns None: it must not keep a dead peer looking alive.
    2. A higher incarnation than known means the peer restarted: it is ALIVE again with reason
       "restarted", even if it was ALIVE, SUSPECT, DEAD or LEFT. The caller must fail over requests
       in flight to the old incarnation, which died with it.
    3. A LEFT peer stays LEFT on anything but a higher incarnation: after a goodbye its late gossip and
       its last replies are still in flight. If the goodbye carried no incarnation, the first
       incarnation heard afterwards is taken as the one that left.
    4. Otherwise an unknown peer becomes ALIVE ("new"), a SUSPECT or DEAD one ALIVE again ("heard").

    `tick()` applies silence: ALIVE silent for `suspect_after` seconds becomes SUSPECT, silent for
    `dead_after` becomes DEAD. DEAD and LEFT peers are dropped `forget_after` seconds after entering
    that state, so a long-gone peer is later greeted as "new".

    Incarnations are bounded: once told this node's wall clock (`sync_clock`), an incarnation more than
    `incarnation_ahead` seconds ahead of it is refused (`incarnation_ok`; `heard` and `left` ignore such a
    message and count it in `refused_incarnations`), at first contact and on any jump. Accepted, it would make
    every real report of the peer stale until the peer's clock caught up, even across clean restarts. The bound
    is the node's own clock, not the last incarnation seen: a peer that ran for weeks before this node met it
    jumps by weeks when it restarts, honestly.
    """

    def __init__(
        self,
        suspect_after: float = 1.0,
        dead_after: float = 3.0,
        forget_after: float = 300.0,
        incarnation_ahead: float = INCARNATION_AHEAD_S,
    ) -> None:
        if not (0 < suspect_after < dead_after) or not math.isfinite(dead_after):
            raise ValueError(
                f"need 0 < suspect_after < dead_after (finite), got suspect_after={suspect_after!r}, "
                f"dead_after={dead_after!r}"
            )
        if not forget_after > 0:  # inf is allowed: never forget
            raise ValueError(f"forget_after must be > 0 seconds, got {forget_after!r}")
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.forget_after = forget_after
        self.incarnation_ahead = incarnation_ahead
        self.refused_incarnations = 0
        self._clock: tuple[int, float] | None = None  # (this node's wall clock in ns, at monotonic `now`)
        self._peers: dict[str, _Peer] = {}

    def sync_clock(self, wall_ns: int, now: float) -> None:
        """This node's wall clock (ns since the epoch) read at `now`: what incarnations are bounded by."""
        self._clock = (wall_ns, now)

    def incarnation_ok(self, incarnation: int, now: float) -> bool:
        """Whether an incarnation is plausible as of `now`: at most `incarnation_ahead` seconds ahead of this node's
        clock (always, before the clock is known)."""
        if self._clock is None:
            return True
        wall_ns, at = self._clock
        return incarnation <= wall_ns + int((now - at + self.incarnation_ahead) * 1e9)

    def heard(self, node: str, now: float, incarnation: int | None = None, seq: int | None = None) -> Transition | None:
        """Record a message from `node`; returns the state change it caused, if any.

        `incarnation` and `seq` come only with gossip (LoadReport); other messages pass neither.
        """
        if seq is not None and incarnation is None:
            raise ValueError("seq counts within an incarnation: pass the incarnation with it")
        if incarnation is not None and not self.incarnation_ok(incarnation, now):
            self.refused_incarnations += 1
            return None
        peer = self._peers.get(node)
        if peer is None:
            self._peers[node] = _Peer(PeerState.ALIVE, now, now, incarnation, seq)
            return Transition(node, None, PeerState.ALIVE, "new")

        if incarnation is not None and peer.incarnation is not None:
            if incarnation < peer.incarnation:
                return None
            if incarnation > peer.incarnation:
                old = peer.state
                peer.state, peer.since, peer.last_heard = PeerState.ALIVE, now, now
                peer.incarnation, peer.seq = incarnation, seq
                return Transition(node, old, PeerState.ALIVE, "restarted")
            if seq is not None and peer.seq is not None and seq <= peer.seq:
                return None
        if incarnation is not None:
            peer.incarnation = incarnation
            if seq is not None:
                peer.seq = seq
        peer.last_heard = now
        if peer.state in (PeerState.ALIVE, PeerState.LEFT):
            return None
        old = peer.state
        peer.state, peer.since = PeerState.ALIVE, now
        return Transition(node, old, PeerState.ALIVE, "heard")

    def left(self, node: str, now: float, incarnation: int | None = None) -> Transition | None:
        """Record a goodbye from `node` (a Leave, or gossip with `leaving` set).

        A goodbye from an incarnation older than the known one is stale (the peer has since restarted)
        and is ignored. A goodbye from a node never heard of is still recorded, so its late gossip does
        not introduce it as new.
        """
        if incarnation is not None and not self.incarnation_ok(incarnation, now):
            self.refused_incarnations += 1
            return None
        peer = self._peers.get(node)
        if peer is None:
            self._peers[node] = _Peer(PeerState.LEFT, now, now, incarnation, None)
            return Transition(node, None, PeerState.LEFT, "left")
        if incarnation is not None and peer.incarnation is not None and incarnation < peer.incarnation:
            return None
        if incarnation is not None and incarnation != peer.incarnation:
            peer.incarnation, peer.seq = incarnation, None
        peer.last_heard = now
        if peer.state is PeerState.LEFT:
            return None
        old = peer.state
        peer.state, peer.since = PeerState.LEFT, now
        return Transition(node, old, PeerState.LEFT, "left")

    def connection_lost(self, node: str, now: float, reason: str = "connection lost") -> list[Transition]:
        """The transport saw the peer's connection close: suspect it now instead of after `suspect_after`.

        A closed TCP connection is strong evidence (the process exited or crashed) but not proof: the
        next message from the peer makes it ALIVE again. LEFT and already SUSPECT/DEAD peers are unchanged.
        """
        peer = self._peers.get(node)
        if peer is None or peer.state is not PeerState.ALIVE:
            return []
        peer.state, peer.since = PeerState.SUSPECT, now
        return [Transition(node, PeerState.ALIVE, PeerState.SUSPECT, reason)]

    def unreachable(self, node: str, now: float, reason: str = "connection refused") -> list[Transition]:
        """The transport could not reconnect (nothing listens at the peer's port): dead now.

        Reported like a late tick: ALIVE goes through SUSPECT to DEAD. LEFT peers stay LEFT.
        """
        peer = self._peers.get(node)
        if peer is None or peer.state in (PeerState.DEAD, PeerState.LEFT):
            return []
        out = self.connection_lost(node, now, reason)
        peer.state, peer.since = PeerState.DEAD, now
        out.append(Transition(node, PeerState.SUSPECT, PeerState.DEAD, reason))
        return out

    def tick(self, now: float) -> list[Transition]:
        """Apply silence as of `now`; returns the state changes it caused and the peers it dropped.

        A peer silent past `dead_after` while still ALIVE (ticks came late) is reported as two steps,
        ALIVE->SUSPECT then SUSPECT->DEAD, so a caller that acts on SUSPECT sees every step. A dropped
        peer is reported as Transition(node, old=state, new=state, reason=FORGOTTEN); afterwards
        `state(node)` is None.
        """
        out: list[Transition] = []
        for node, peer in list(self._peers.items()):
            if peer.state in (PeerState.DEAD, PeerState.LEFT):
                if now - peer.since >= self.forget_after:
                    del self._peers[node]
                    out.append(Transition(node, peer.state, peer.state, FORGOTTEN))
                continue
            silence = now - peer.last_heard
            reason = f"silent {silence:.1f}s"
            if peer.state is PeerState.ALIVE and silence >= self.suspect_after:
                peer.state, peer.since = PeerState.SUSPECT, now
                out.append(Transition(node, PeerState.ALIVE, PeerState.SUSPECT, reason))
            if peer.state is PeerState.SUSPECT and silence >= self.dead_after:
                peer.state, peer.since = PeerState.DEAD, now
                out.append(Transition(node, PeerState.SUSPECT, PeerState.DEAD, reason))
        return out

    def state(self, node: str) -> PeerState | None:
        """The peer's state, or None if it is unknown (never heard, or forgotten)."""
        peer = self._peers.get(node)
        return None if peer is None else peer.state

    def last_heard(self, node: str) -> float | None:
        """Time (as given) of the last message that counted as proof of life (stale ones do not)."""
        peer = self._peers.get(node)
        return None if peer is None else peer.last_heard

    def incarnation(self, node: str) -> int | None:
        """Highest incarnation seen from the peer, None if unknown."""
        peer = self._peers.get(node)
        return None if peer is None else peer.incarnation

    def nodes(self) -> dict[str, PeerState]:
        """A snapshot of every known peer's state."""
        return {node: peer.state for node, peer in self._peers.items()}

    def forget(self, node: str) -> None:
        """Drop everything known about `node`; forgetting an unknown node is a no-op."""
        self._peers.pop(node, None)
