"""What one node believes about every member of the mesh: a pure table, no sockets and no clock.

Each member is known as the last report of it (`incarnation`, `seq`) and a state, as news made it: its own reports,
its goodbye, the suspicions its watchers published, other nodes' digests. These *public* records follow one rule
(SWIM's), so that every node that heard the same news holds the same table, and a checksum of the table tells two
nodes whether they agree:

- a later report outranks an earlier one: a higher incarnation (a restart), else a higher seq;
- for the same report, the worse state wins: alive < suspect < dead < left;
- left is final for an incarnation; only the member itself outranks a suspicion of it, by reporting again.

On top of them, this node's own evidence that it tells nobody (a closed connection, a silence it saw while cut off
from everyone) is kept *private*: it changes what this node routes to, never the checksum, so a node that was cut
off does not talk the others into its mistakes. `state()` is the worse of the two.

The ring decides who watches whom: every member has a place on it (a hash of its name) and each node probes the
few members just before its own place, so every member is probed by that many others, whatever the mesh's size.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
from collections.abc import Iterator

from protocol import Member, PeerAddr

from ._failure import PeerState

__all__ = ["RANK", "MemberView", "outranks", "ring_key"]

RANK = {PeerState.ALIVE: 0, PeerState.SUSPECT: 1, PeerState.DEAD: 2, PeerState.LEFT: 3}
_STATE = {s.value: s for s in PeerState}  # a dict lookup: calling the enum costs ten times more, on every query
_ON_RING = (PeerState.ALIVE, PeerState.SUSPECT)  # suspects stay on the ring: their watchers confirm or clear them
_MASK = (1 << 64) - 1


@functools.lru_cache(maxsize=1 << 16)
def ring_key(node: str) -> tuple[int, str]:
    """A member's place on the ring (a hash of its name, then the name): the same on every node, which Python's
    own hash of a string is not. Cached, so the views of a simulated mesh share one key per member."""
    return int.from_bytes(hashlib.blake2b(node.encode(), digest_size=8).digest(), "big"), node


def outranks(new: Member, old: Member) -> bool:
    """Whether `new` news of a member replaces `old` (see the module docstring)."""
    if (new.incarnation, new.seq) != (old.incarnation, old.seq):
        return (new.incarnation, new.seq) > (old.incarnation, old.seq)
    return RANK[_STATE[new.state]] > RANK[_STATE[old.state]]


def _fingerprint(m: Member, seq: int) -> int:
    text = f"{m.addr.node}\0{m.addr.host}\0{m.addr.port}\0{m.addr.pub_port}\0{m.incarnation}\0{seq}\0{m.state}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class MemberView:
    """The members this node knows, itself included (see the module docstring). Used on one thread."""

    def __init__(self, me: Member) -> None:
        self.me = me.node
        self._public: dict[str, Member] = {}
        self._private: dict[str, PeerState] = {}
        self._legacy: set[str] = set()  # members that report every interval: their seq is left out of the checksum
        self._checksum = 0
        self._ring: list[tuple[int, str]] = []
        self.ring_version = 0  # grows whenever the ring changes, so callers recompute what they derive from it
        self.put(me)

    # ------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._public)

    def __iter__(self) -> Iterator[Member]:
        return iter(list(self._public.values()))

    def __contains__(self, node: str) -> bool:
        return node in self._public

    def get(self, node: str) -> Member | None:
        """The public record of `node`, or None when it is not a member."""
        return self._public.get(node)

    def state(self, node: str) -> PeerState | None:
        """What this node acts on: the worse of the public state and its own private evidence (None: unknown)."""
        m = self._public.get(node)
        if m is None:
            return None
        public = _STATE[m.state]
        private = self._private.get(node)
        return public if private is None or RANK[private] <= RANK[public] else private

    def public_state(self, node: str) -> PeerState | None:
        m = self._public.get(node)
        return None if m is None else _STATE[m.state]

    def private_state(self, node: str) -> PeerState | None:
        return self._private.get(node)

    def addr(self, node: str) -> PeerAddr | None:
        m = self._public.get(node)
        return None if m is None else m.addr

    def digest(self) -> tuple[int, int]:
        """(members, checksum) of the public records: equal on two nodes that hold the same table."""
        return len(self._public), self._checksum

    def members(self) -> tuple[Member, ...]:
        """Every public record, for a full digest."""
        return tuple(self._public.values())

    def is_legacy(self, node: str) -> bool:
        return node in self._legacy

    def legacy(self) -> set[str]:
        """Members that report every interval (older nodes)."""
        return set(self._legacy)

    def random_member(self, rng: random.Random, state: PeerState = PeerState.ALIVE) -> str | None:
        """A member other than this node, drawn at random among those in `state` by the public records (a few draws
        on the ring, so the cost does not grow with the mesh); None when there is none."""
        ring = self._ring
        if len(ring) <= 1:
            return None
        for _ in range(8):
            node = ring[rng.randrange(len(ring))][1]
            m = self._public.get(node)
            if node != self.me and m is not None and m.state == state.value:
                return node
        others = [n for _, n in ring if n != self.me and self._public[n].state == state.value]
        return rng.choice(others) if others else None

    def watched(self, k: int) -> list[str]:
        """The (up to) `k` members on the ring just before this node: the ones it probes."""
        ring = self._ring
        if len(ring) <= 1:
            return []
        i = bisect.bisect_left(ring, ring_key(self.me))
        out = []
        for step in range(1, min(k, len(ring) - 1) + 1):
            out.append(ring[(i - step) % len(ring)][1])
        return out

    def watchers(self, node: str, k: int) -> list[str]:
        """The (up to) `k` members just after `node` on the ring: the ones that probe it (as this node sees it)."""
        ring = self._ring
        i = bisect.bisect_right(ring, ring_key(node))
        out = []
        for step in range(min(k, len(ring))):
            other = ring[(i + step) % len(ring)][1]
            if other == node:
                break
            out.append(other)
        return out

    # ------------------------------------------------------------ changing

    def put(self, m: Member) -> Member | None:
        """Set the public record of a member as given (the caller decided it outranks); returns the old one."""
        old = self._public.get(m.node)
        if old is not None:
            self._checksum ^= self._hash(old)
        self._public[m.node] = m
        self._checksum ^= self._hash(m)
        was_on = old is not None and _STATE[old.state] in _ON_RING
        is_on = _STATE[m.state] in _ON_RING
        if was_on != is_on:
            key = ring_key(m.node)
            if is_on:
                bisect.insort(self._ring, key)
            else:
                i = bisect.bisect_left(self._ring, key)
                if i < len(self._ring) and self._ring[i] == key:
                    del self._ring[i]
            self.ring_version += 1
        return old

    def remove(self, node: str) -> Member | None:
        """Forget a member entirely."""
        old = self._public.pop(node, None)
        self._private.pop(node, None)
        if old is None:
            return None
        self._checksum ^= self._hash(old)
        if _STATE[old.state] in _ON_RING:
            key = ring_key(node)
            i = bisect.bisect_left(self._ring, key)
            if i < len(self._ring) and self._ring[i] == key:
                del self._ring[i]
            self.ring_version += 1
        self._legacy.discard(node)
        return old

    def set_private(self, node: str, state: PeerState | None) -> None:
        """Record (or with None, clear) this node's own evidence about a member, which it tells nobody."""
        if state is None or state is PeerState.ALIVE:
            self._private.pop(node, None)
        elif node in self._public:
            self._private[node] = state

    def set_legacy(self, node: str, legacy: bool) -> None:
        """A member that reports every interval (an older node): its ever-growing seq stays out of the checksum."""
        m = self._public.get(node)
        if legacy == (node in self._legacy) or m is None:
            return
        self._checksum ^= self._hash(m)
        if legacy:
            self._legacy.add(node)
        else:
            self._legacy.discard(node)
        self._checksum ^= self._hash(m)

    def _hash(self, m: Member) -> int:
        return _fingerprint(m, 0 if m.node in self._legacy else m.seq) & _MASK

    def copy_for(self, node: str) -> MemberView:
        """The same public table as seen by another member `node` (no private evidence): how a simulation gives
        every node of a converged mesh its view without building each one record by record."""
        if node not in self._public:
            raise ValueError(f"{node!r} is not a member of this view")
        view = MemberView.__new__(MemberView)
        view.me = node
        view._public = dict(self._public)
        view._private = {}
        view._legacy = set(self._legacy)
        view._checksum = self._checksum
        view._ring = list(self._ring)
        view.ring_version = 0
        return view
