"""The benchmark baselines behave as their names say (they exist to be compared with power of two choices)."""

from __future__ import annotations

import collections
import random

from mesh import POLICIES

RoundRobinPolicy = POLICIES["round-robin"]
RandomPolicy = POLICIES["random"]
LeastLoadedGossipPolicy = POLICIES["least-loaded"]


def _idle(model: str) -> tuple[int, int]:
    return (0, 4)


def test_round_robin_takes_candidates_in_turn() -> None:
    p = RoundRobinPolicy("a", _idle)
    picks = [p.choose("m", ["a", "b", "c"], 0.0).node for _ in range(6)]
    assert collections.Counter(picks) == {"a": 2, "b": 2, "c": 2}


def test_random_spreads_uniformly() -> None:
    p = RandomPolicy("a", _idle, rng=random.Random(7))
    picks = collections.Counter(p.choose("m", ["a", "b", "c", "d"], 0.0).node for _ in range(4000))
    assert all(800 < n < 1200 for n in picks.values())


def test_least_loaded_trusts_stale_gossip_and_herds() -> None:
    p = LeastLoadedGossipPolicy("a", lambda m: (3, 4))
    p.observe_gossip("b", "m", 0, 4, 0.0)
    p.observe_gossip("c", "m", 2, 4, 0.0)
    picks = [p.choose("m", ["a", "b", "c"], 0.0) for _ in range(20)]
    for c in picks:
        p.dispatched(c.node, "m")
    assert {c.node for c in picks} == {"b"}  # every request piles onto the peer that looked idle
    assert picks[0].reason == "least:b"


def test_every_policy_is_selectable_by_name() -> None:
    assert set(POLICIES) == {"cache-aware", "p2c", "round-robin", "random", "least-loaded"}
