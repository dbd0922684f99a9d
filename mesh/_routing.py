"""The routing policy: power of two choices on estimated load, as a pure class fed with observations and `now`.

It decides where a request goes; the sockets that carry it live elsewhere.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["POLICIES", "Choice", "LeastLoadedGossipPolicy", "RandomPolicy", "RoundRobinPolicy", "RoutingPolicy"]


@dataclass(frozen=True, slots=True)
class Choice:
    """Where to send a request, and why (the reason travels back in the reply's `route`, for tracing).

    Reasons: "local" (this node was the only eligible one), "only:<id>" (the only eligible peer), and
    "p2c:<winner><<loser>" when two were compared, e.g. "p2c:n1<n3": n1 was sampled with n3 and chosen
    over it. This node appears there under its own id, so "local" always means "no other choice".
    """

    node: str
    reason: str


@dataclass(slots=True)
class _PeerLoad:
    """What this node knows about one peer's load for one model."""

    m: int = 0  # this node's requests in flight to the peer, exact, counted at dispatch
    g: int | None = None  # the peer's own in-flight+queued count, last reported
    cap: int | None = None  # how many the peer runs at once, last gossiped
    at: float | None = None  # clock value when `g` arrived
    m0: int = 0  # `m` when `g` arrived: what was already counted in `g`
    rate: float = 0.0  # requests/s the peer completes when busy, as it measured and gossiped (0: unknown)


class RoutingPolicy:
    """Power of two choices over eligible nodes, on an estimate that survives stale gossip.

    Per peer and model it keeps the gossiped load `g` and capacity `cap`, when `g` arrived, this
    node's exact in-flight count `m` to the peer and `m0`, the value of `m` when `g` arrived. The
    estimate is `max(m, g + (m - m0))`: the reported load plus what this node sent since (or minus what
    came back since). Gossip older than `stale_after` is ignored and `m` alone is used.

    `choose` samples two distinct candidates and takes the lower `(estimate + 1) / cap`, ties to this
    node. Never "least loaded by gossip": every node reads the same stale report, so all of them would
    pile onto the one peer that looked idle; sampling two spreads that herd, and counting at dispatch
    makes each node see its own pile at once.

    This node's own load comes from `local_load(model) -> (inflight + queued, capacity)`, which is
    exact, so `dispatched`/`completed` are for peers only. When one reply carries both, call
    `completed` before `observe_queue`: the reported queue no longer holds the finished request.
    """

    def __init__(
        self,
        self_id: str,
        local_load: Callable[[str], tuple[int, int]],
        stale_after: float = 0.75,
        rng: random.Random | None = None,
        local_rate: Callable[[str], float] | None = None,
    ) -> None:
        if not stale_after > 0:
            raise ValueError(f"stale_after must be > 0 seconds, got {stale_after!r}")
        self.self_id = self_id
        self.stale_after = stale_after
        self._local_load = local_load
        self._local_rate = local_rate
        self._rng = rng if rng is not None else random.Random()
        self._peers: dict[str, dict[str, _PeerLoad]] = {}
        self._busy: dict[str, int] = {}  # peer -> requests in flight to it, over all models (only those with some)

    def observe_gossip(self, node: str, model: str, load: int, capacity: int, now: float, rate: float = 0.0) -> None:
        """A load report from `node`: `load` = in-flight + queued for `model`, `capacity` = how many it runs at once,
        `rate` = requests/s it completes when busy (0: not measured yet)."""
        if load < 0 or capacity < 0 or not rate >= 0:
            raise ValueError(f"load, capacity and rate must be >= 0, got {load}, {capacity}, {rate} from {node}")
        entry = self._entry(node, model)
        entry.g, entry.cap, entry.at, entry.m0, entry.rate = load, capacity, now, entry.m, rate

    def observe_queue(self, node: str, model: str, queue: int, now: float) -> None:
        """The queue length a peer's Reply, Reject or Error carried: as fresh as gossip, capacity unchanged."""
        if queue < 0:
            raise ValueError(f"queue must be >= 0, got {queue} from {node}")
        entry = self._entry(node, model)
        entry.g, entry.at, entry.m0 = queue, now, entry.m

    def dispatched(self, node: str, model: str) -> None:
        """A request for `model` was just sent to `node`: count it now, not when the reply comes."""
        self._entry(node, model).m += 1
        self._busy[node] = self._busy.get(node, 0) + 1

    def completed(self, node: str, model: str) -> None:
        """A request sent to `node` ended (reply, reject, error, or given up); never counts below zero."""
        entry = self._peers.get(node, {}).get(model)
        if entry is not None and entry.m > 0:
            entry.m -= 1
            left = self._busy.get(node, 0) - 1
            if left > 0:
                self._busy[node] = left
            else:
                self._busy.pop(node, None)

    def estimate(self, node: str, model: str, now: float) -> float:
        """Estimated in-flight + queued requests at `node` for `model` as of `now` (never negative)."""
        entry = self._peers.get(node, {}).get(model)
        if entry is None:
            return 0.0
        if entry.g is None or entry.at is None or now - entry.at > self.stale_after:
            return float(entry.m)
        return float(max(entry.m, entry.g + (entry.m - entry.m0)))

    def choose(self, model: str, candidates: Sequence[str], now: float) -> Choice:
        """Pick the node for one request among `candidates` (eligible ids, may include this node).

        Candidates that cannot serve (capacity <= 0) are left out while any other can; if none can,
        one of them is still chosen and will answer with a Reject.
        """
        if len(candidates) == 1:  # the common single-node case: nothing to compare
            node = candidates[0]
            return Choice(node, "local" if node == self.self_id else f"only:{node}")
        unique = list(dict.fromkeys(candidates))
        if not unique:
            raise ValueError(f"no candidate node for model {model!r}")
        scores = {node: self._score(node, model, now) for node in unique}
        servable = [node for node in unique if math.isfinite(scores[node])]
        pool = servable or unique
        if len(pool) == 1:
            node = pool[0]
            return Choice(node, "local" if node == self.self_id else f"only:{node}")
        first, second = self._rng.sample(pool, 2)
        a, b = scores[first], scores[second]
        rate_a, rate_b = self._rate(first, model), self._rate(second, model)
        if rate_a > 0 and rate_b > 0 and math.isfinite(a) and math.isfinite(b):
            # Both speeds are known: compare the time each needs to get through its load and this request.
            a, b = a * self._cap(first, model) / rate_a, b * self._cap(second, model) / rate_b
        if b < a or (b == a and second == self.self_id):
            first, second = second, first
        return Choice(first, f"p2c:{first}<{second}")

    def forget(self, node: str) -> None:
        """Drop everything known about `node` (it died, left or restarted); unknown nodes are a no-op."""
        self._peers.pop(node, None)
        self._busy.pop(node, None)

    def busy_peers(self) -> list[str]:
        """The peers this node has requests in flight to (it watches them itself, as the links it uses)."""
        return [node for node, n in self._busy.items() if n > 0]

    def inflight_to(self, node: str) -> int:
        """Requests this node has in flight to `node`, over all models (for status and metrics)."""
        return sum(entry.m for entry in self._peers.get(node, {}).values())

    def _rate(self, node: str, model: str) -> float:
        if node == self.self_id:
            return self._local_rate(model) if self._local_rate is not None else 0.0
        entry = self._peers.get(node, {}).get(model)
        return 0.0 if entry is None else entry.rate

    def _cap(self, node: str, model: str) -> int:
        if node == self.self_id:
            return self._local_load(model)[1]
        entry = self._peers.get(node, {}).get(model)
        return 1 if entry is None or entry.cap is None else entry.cap

    def _score(self, node: str, model: str, now: float) -> float:
        if node == self.self_id:
            load, cap = self._local_load(model)
            return (load + 1) / cap if cap > 0 else math.inf
        entry = self._peers.get(node, {}).get(model)
        cap = 1 if entry is None or entry.cap is None else entry.cap  # unknown capacity: assume one slot
        return (self.estimate(node, model, now) + 1) / cap if cap > 0 else math.inf

    def _entry(self, node: str, model: str) -> _PeerLoad:
        return self._peers.setdefault(node, {}).setdefault(model, _PeerLoad())


class RoundRobinPolicy(RoutingPolicy):
    """Baseline for benchmarks: candidates in turn, blind to load and speed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turn = 0

    def choose(self, model: str, candidates: Sequence[str], now: float) -> Choice:
        unique = sorted(dict.fromkeys(candidates))
        if not unique:
            raise ValueError(f"no candidate node for model {model!r}")
        self._turn += 1
        node = unique[self._turn % len(unique)]
        return Choice(node, f"rr:{node}")


class RandomPolicy(RoutingPolicy):
    """Baseline for benchmarks: a uniformly random candidate."""

    def choose(self, model: str, candidates: Sequence[str], now: float) -> Choice:
        unique = list(dict.fromkeys(candidates))
        if not unique:
            raise ValueError(f"no candidate node for model {model!r}")
        node = self._rng.choice(unique)
        return Choice(node, f"random:{node}")


class LeastLoadedGossipPolicy(RoutingPolicy):
    """Baseline for benchmarks: the lowest gossiped `(load + 1) / cap`, as seed-style schedulers do.

    It trusts the last report as is (no count of what this node sent since), so between two reports
    every entry node sends everything to the same peer: the herd that power of two choices avoids.
    """

    def choose(self, model: str, candidates: Sequence[str], now: float) -> Choice:
        unique = list(dict.fromkeys(candidates))
        if not unique:
            raise ValueError(f"no candidate node for model {model!r}")

        def gossiped(node: str) -> float:
            if node == self.self_id:
                load, cap = self._local_load(model)
            else:
                entry = self._peers.get(node, {}).get(model)
                load = 0 if entry is None or entry.g is None else entry.g
                cap = 1 if entry is None or entry.cap is None else entry.cap
            return (load + 1) / cap if cap > 0 else math.inf

        node = min(unique, key=lambda n: (gossiped(n), n != self.self_id))
        return Choice(node, f"least:{node}")


POLICIES: dict[str, type[RoutingPolicy]] = {
    "p2c": RoutingPolicy,
    "round-robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "least-loaded": LeastLoadedGossipPolicy,
}
