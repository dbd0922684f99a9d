"""What one request, client or peer may ask of a node before any work starts: the request limits, and a cap on
how many requests one sender (a client connection, a peer) may have in flight here."""

from __future__ import annotations

import collections
from collections.abc import Callable

from protocol import Error, ErrorCode, Reject, Request

from ._security import RequestLimits

InFlight = Callable[[bytes, str], bool]  # whether (sender, request id) is still being served here


class Admission:
    """Decides, per incoming request, whether to take it; remembers which requests each sender has here."""

    def __init__(
        self, node_id: str, limits: RequestLimits, per_client: int, per_peer: int, stats: collections.Counter[str]
    ) -> None:
        self.node_id = node_id
        self.limits = limits
        self.per_client = per_client
        self.per_peer = per_peer
        self.stats = stats
        self._admitted: dict[bytes, set[str]] = {}  # sender identity -> ids it may still have in flight here

    def admit(
        self, ident: bytes, req: Request, in_flight: InFlight, queue_of: Callable[[str], int]
    ) -> Error | Reject | None:
        """What to answer instead of serving `req`, or None to take it."""
        problem = self.limits.check(req)
        if problem is not None:
            self.stats["limit_refused"] += 1
            return Error(req.id, ErrorCode.BAD_REQUEST, problem, self.node_id)
        ids = self._admitted.get(ident)
        if ids is None:
            ids = self._admitted[ident] = set()
        cap = self.per_peer if req.hops else self.per_client
        if len(ids) >= cap:
            # Finished requests leave this set lazily: only a sender at its cap pays for the recount.
            ids = self._admitted[ident] = {rid for rid in ids if in_flight(ident, rid)}
            if len(ids) >= cap:
                self.stats["inflight_cap_refused"] += 1
                queue = queue_of(req.model)
                if req.hops:
                    return Reject(req.id, self.node_id, queue, f"this peer already has {cap} requests here")
                why = f"this client already has {cap} requests in flight at {self.node_id} (--max-inflight-per-client)"
                return Error(req.id, ErrorCode.OVERLOADED, why, self.node_id, queue)
        ids.add(req.id)
        return None

    def sweep(self, in_flight: InFlight) -> None:
        """Forget senders with nothing in flight (clients come and go; each connection is a new identity)."""
        for ident, ids in list(self._admitted.items()):
            live = {rid for rid in ids if in_flight(ident, rid)}
            if live:
                self._admitted[ident] = live
            else:
                del self._admitted[ident]
