"""`NodeDirectory`: which nodes a client holds connections to, the ones it was given and the ones it learned from
the mesh, so that one address is enough and losing that node loses nothing.

Pure policy: fed with the status rows a node answered (`Ping(want_status)`) and a clock, it says which learned nodes
to connect to and which to drop, and when to ask again. The `CallTable` asks and carries out what it says.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._endpoints import parse_endpoint

# Row states (a node's status view) in which a node is worth a connection, and in which one already held is kept.
_ALIVE = frozenset({"self", "alive"})
_KEPT = _ALIVE | {"suspect"}  # a suspect may be a false alarm; anything else (dead, left, leaving) counts as gone


@dataclass
class NodeChanges:
    """Learned nodes to connect to (`opened`) and to drop (`closed`), in the order decided."""

    opened: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opened or self.closed)


class NodeDirectory:
    """The given endpoints, plus the live nodes any connected node reports (at most `max_learned` of them).

    Asks: as soon as a node is connected, then every `refresh_s`, and at once after a node drops or a given one
    comes back (`ask_soon`). A learned node that the mesh reports gone (dead, left, leaving or no longer listed)
    for `forget_after_s`, and that this client is not connected to, is dropped; given nodes are never dropped.
    """

    def __init__(
        self,
        given: Sequence[str],
        *,
        refresh_s: float = 5.0,
        retry_s: float = 1.0,
        forget_after_s: float = 10.0,
        max_learned: int = 16,
    ) -> None:
        self.given = tuple(given)
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.forget_after_s = forget_after_s
        self.max_learned = max_learned
        self.next_ask = 0.0  # the first connected node is asked at once
        self._given_up_at = 0.0
        self._learned: dict[str, float | None] = {}  # endpoint -> since when the mesh reports it gone (None: live)
        # A node may advertise another address than the one this client reaches it by (a name, loopback): its own
        # status row ("self") says which, so the same node is not connected to twice.
        self._aliases: dict[str, str] = {}  # advertised endpoint -> the held endpoint that reaches that node

    @property
    def learned(self) -> tuple[str, ...]:
        return tuple(self._learned)

    def ask_soon(self, now: float) -> None:
        self.next_ask = min(self.next_ask, now)

    def asked(self, now: float, timeout: float) -> None:
        """A status ping went out at `now`, answered within `timeout` or failed."""
        self._given_up_at = now + timeout
        self.next_ask = math.inf  # until it is answered or fails

    def failed(self) -> None:
        self.next_ask = self._given_up_at + self.retry_s

    def answered(self, rows: Sequence[Any], via: str, now: float, connected: Collection[str]) -> NodeChanges:
        """Take one node's view of the mesh (`rows`, answered on endpoint `via`); `connected`: the endpoints this
        client has a live connection to."""
        self.next_ask = now + self.refresh_s
        seen = self._states(rows, via)
        changes = NodeChanges()
        learned = self._learned
        for ep, state in seen.items():
            if ep in learned:
                if state in _KEPT:
                    learned[ep] = None
                elif learned[ep] is None:
                    learned[ep] = now
            elif ep not in self.given and state in _ALIVE and len(learned) < self.max_learned:
                learned[ep] = None
                changes.opened.append(ep)
        for ep, gone_since in list(learned.items()):
            if gone_since is None and ep not in seen:
                learned[ep] = gone_since = now
            if gone_since is not None and now - gone_since >= self.forget_after_s and ep not in connected:
                del learned[ep]
                self._aliases = {adv: held for adv, held in self._aliases.items() if held != ep}
                changes.closed.append(ep)
        return changes

    def _states(self, rows: Sequence[Any], via: str) -> dict[str, str]:
        """Each listed node's state by the endpoint this client holds (or would hold) for it. Rows are another
        process's words: anything malformed is skipped."""
        seen: dict[str, str] = {}
        for row in rows if isinstance(rows, list) else ():
            if not isinstance(row, dict):
                continue
            state, address = row.get("state"), row.get("address")
            if not isinstance(state, str) or not isinstance(address, str):
                continue
            try:
                ep = parse_endpoint(address)
            except ValueError:
                continue
            if state == "self":  # the answering node itself, reached at `via` whatever it advertises
                self._aliases = {adv: held for adv, held in self._aliases.items() if held != via}
                if ep != via:
                    self._aliases[ep] = via
                ep = via
            seen[self._aliases.get(ep, ep)] = state
        return seen


__all__ = ["NodeChanges", "NodeDirectory"]
