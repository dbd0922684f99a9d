"""The routing policy: power of two choices on estimated load, as a pure class fed with observations and `now`.

It decides where a request goes; the sockets that carry it live elsewhere.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import Request

from ._prefixes import request_chain, unpack_summary

__all__ = [
    "POLICIES",
    "CacheAwarePolicy",
    "Choice",
    "LeastLoadedGossipPolicy",
    "RandomPolicy",
    "RoundRobinPolicy",
    "RoutingPolicy",
    "node_policy",
]


@dataclass(frozen=True, slots=True)
class Choice:
    """Where to send a request, and why (the reason travels back in the reply's `route`, for tracing).

    Reasons: "local" (this node was the only eligible one), "only:<id>" (the only eligible peer), and
    "p2c:<winner><<loser>" when two were compared, e.g. "p2c:n1<n3": n1 was sampled with n3 and chosen
    over it. This node appears there under its own id, so "local" always means "no other choice".
    Cache-aware routing adds "prefix:<id>(<n> msgs)" (chosen for holding the first n messages of the chat) and
    "p2c:...(prefix:<id> busy)" (the holder was out of balance with the others).
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

    def observe_prefixes(self, node: str, model: str, summary: bytes) -> None:
        """What `node`'s prefix cache holds for `model` (a gossiped summary); only cache-aware routing reads it."""

    def choose(self, model: str, candidates: Sequence[str], now: float, request: Request | None = None) -> Choice:
        """Pick the node for one request among `candidates` (eligible ids, may include this node).

        Candidates that cannot serve (capacity <= 0) are left out while any other can; if none can,
        one of them is still chosen and will answer with a Reject. `request` is for policies that look at it.
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

    def choose(self, model: str, candidates: Sequence[str], now: float, request: Request | None = None) -> Choice:
        unique = sorted(dict.fromkeys(candidates))
        if not unique:
            raise ValueError(f"no candidate node for model {model!r}")
        self._turn += 1
        node = unique[self._turn % len(unique)]
        return Choice(node, f"rr:{node}")


class RandomPolicy(RoutingPolicy):
    """Baseline for benchmarks: a uniformly random candidate."""

    def choose(self, model: str, candidates: Sequence[str], now: float, request: Request | None = None) -> Choice:
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

    def choose(self, model: str, candidates: Sequence[str], now: float, request: Request | None = None) -> Choice:
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


class CacheAwarePolicy(RoutingPolicy):
    """The node expected to hold the longest prefix of a chat, unless that would put it out of balance; else p2c.

    Each node gossips which chains of chat messages its prefix cache holds (`observe_prefixes`; this node's own from
    `local_prefixes(model)`, exact). For a chat request every candidate's depth is the number of leading messages of
    which it holds the chain. The deepest wins; several as deep are compared by power of two choices. Holding only
    the first message does not count: that is the system prompt every conversation shares, which any node holds
    after serving one of them, so following it would pile every new conversation onto the first node that did (a
    new conversation is placed by p2c, and its later turns follow it). A holder is passed over when it is out of
    balance with the least loaded candidate: at least `balance_abs` more requests (in flight + queued, estimated as
    p2c does) *and* more than `balance_rel` times its load per slot, as SGLang's cache-aware router bounds load;
    then p2c over all candidates decides. So a hot conversation fills its holder only up to that bound, and the
    nodes that take the overflow hold that prefix too from then on. Requests without a chain (other tasks) and chats
    no node holds more than the first message of go by p2c, and so does everything when no node gossips a summary.
    """

    def __init__(
        self,
        self_id: str,
        local_load: Callable[[str], tuple[int, int]],
        stale_after: float = 0.75,
        rng: random.Random | None = None,
        local_rate: Callable[[str], float] | None = None,
        local_prefixes: Callable[[str], bytes] | None = None,
        balance_abs: int = 4,
        balance_rel: float = 1.5,
    ) -> None:
        super().__init__(self_id, local_load, stale_after, rng, local_rate)
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._local_prefixes = local_prefixes
        self._held: dict[str, dict[str, frozenset[bytes]]] = {}  # node -> model -> chain digests its cache holds
        self._local: dict[str, tuple[bytes, frozenset[bytes]]] = {}  # model -> (this node's summary, unpacked)
        self.counts: collections.Counter[str] = collections.Counter()  # routed_prefix, routed_prefix_busy

    def observe_prefixes(self, node: str, model: str, summary: bytes) -> None:
        held = self._held.setdefault(node, {})
        if summary:
            held[model] = unpack_summary(summary)
        else:
            held.pop(model, None)

    def forget(self, node: str) -> None:
        super().forget(node)
        self._held.pop(node, None)

    def chains_held(self, node: str) -> dict[str, int]:
        """How many chains `node`'s gossip says its prefix cache holds, per model (for status views)."""
        return {model: len(chains) for model, chains in self._held.get(node, {}).items()}

    def choose(self, model: str, candidates: Sequence[str], now: float, request: Request | None = None) -> Choice:
        unique = list(dict.fromkeys(candidates))
        base = model.partition("@")[0]
        held = {node: self._holds(node, base) for node in unique}
        if request is None or len(unique) < 2 or not any(held.values()):
            return super().choose(model, candidates, now)
        chain = request_chain(request.task, request.input, request.params)
        depth = {node: _depth(chain, held[node]) for node in unique}
        best = max(depth.values(), default=0)
        if best <= 1:  # nothing, or only the first message: a system prompt every node holds after one request
            return super().choose(model, candidates, now)
        holders = [node for node in unique if depth[node] == best]
        calm = [node for node in holders if not self._out_of_balance(node, unique, model, now)]
        if not calm:
            self.counts["routed_prefix_busy"] += 1
            choice = super().choose(model, candidates, now)
            return Choice(choice.node, f"{choice.reason}(prefix:{holders[0]} busy)")
        node = calm[0] if len(calm) == 1 else super().choose(model, calm, now).node
        self.counts["routed_prefix"] += 1
        return Choice(node, f"prefix:{node}({best} msgs)")

    def _holds(self, node: str, model: str) -> frozenset[bytes]:
        if node != self.self_id:
            return self._held.get(node, {}).get(model, frozenset())
        if self._local_prefixes is None:
            return frozenset()
        blob = self._local_prefixes(model)
        last = self._local.get(model)
        if last is None or last[0] is not blob:
            last = self._local[model] = (blob, unpack_summary(blob))
        return last[1]

    def _load(self, node: str, model: str, now: float) -> tuple[float, int]:
        if node == self.self_id:
            load, cap = self._local_load(model)
            return float(load), cap
        return self.estimate(node, model, now), self._cap(node, model)

    def _out_of_balance(self, node: str, candidates: Sequence[str], model: str, now: float) -> bool:
        loads = {n: self._load(n, model, now) for n in candidates}
        est, cap = loads[node]
        if cap <= 0:
            return True
        least, least_cap = min(loads.values(), key=lambda lc: (lc[0] + 1) / lc[1] if lc[1] > 0 else math.inf)
        if least_cap <= 0:
            return False
        return est - least >= self.balance_abs and (est + 1) / cap > self.balance_rel * (least + 1) / least_cap


def _depth(chain: Sequence[bytes], held: frozenset[bytes]) -> int:
    """How many leading messages of `chain` a node holds (the longest of its chains that `chain` starts with)."""
    if not held:
        return 0
    for i in range(len(chain) - 1, -1, -1):
        if chain[i] in held:
            return i + 1
    return 0


POLICIES: dict[str, type[RoutingPolicy]] = {
    "cache-aware": CacheAwarePolicy,
    "p2c": RoutingPolicy,
    "round-robin": RoundRobinPolicy,
    "random": RandomPolicy,
    "least-loaded": LeastLoadedGossipPolicy,
}


def node_policy(name: str, node_id: str, server: Any, rng: random.Random | None, counts: Any) -> RoutingPolicy:
    """The routing policy `name` of a node whose own work is `server` (its load, rate and, for cache-aware routing,
    what its prefix caches hold; an executor without them: none). A peer reports whenever its load moved past a
    threshold (or a smaller difference lasted seconds), so its last report holds however old it is: the entry's own
    counts cover what it sent since."""
    policy = POLICIES[name]
    extra = {"local_prefixes": getattr(server, "prefix_summary", None)} if policy is CacheAwarePolicy else {}
    out = policy(node_id, server.load, stale_after=math.inf, rng=rng, local_rate=getattr(server, "rate", None), **extra)
    if isinstance(out, CacheAwarePolicy):
        out.counts = counts  # routed_prefix, routed_prefix_busy: in status rows and /metrics
    return out
