"""The automatic split of a model over the nodes that want it and cannot hold it whole: which layer ranges (stages)
there are and which node holds which. Pure: every node computes it from the same gossip and gets the same plan.

Rules:
- The fewest stages `s` that fit: nodes sorted by budget (largest first), then name, are dealt to the stages in turn
  (stage k gets members k, k+s, k+2s, ...), so n members make n // s whole pipelines and the rest are extra holders of
  the first stages; a stage must fit the smallest budget among its holders.
- Within that, the boundaries balance the work: each stage's multiply-adds per token (the head's included) divided by
  the speed of its slowest holder, the largest of these as small as it can be, by dynamic programming over the
  boundaries, under the memory fit.
- A member that already holds a planned range keeps it (where it fits its budget), so losing one holder of a
  replicated range moves nobody else.
- Deterministic: the same members, budgets, speeds and holdings give the same plan (ties go to the earlier boundary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backends.onnx_stage_graph import LayerCosts

NeedFn = Callable[[int, int], int]  # bytes a stage of layers first..last needs, all told (weights, engine, cache)


@dataclass(frozen=True)
class Member:
    """A node that wants the model: the bytes it can give a stage, how fast it is, what range it holds now."""

    node: str
    budget: int
    speed: float = 1.0
    holds: tuple[int, int] | None = None


@dataclass(frozen=True)
class StagePlan:
    """The stages (layer ranges, in order) and which stage each member holds (its index)."""

    ranges: tuple[tuple[int, int], ...]
    holders: tuple[tuple[str, int], ...]  # (node, stage index), sorted by node

    def range_of(self, node: str) -> tuple[int, int] | None:
        for name, index in self.holders:
            if name == node:
                return self.ranges[index]
        return None

    def describe(self) -> str:
        parts = []
        for index, (first, last) in enumerate(self.ranges):
            nodes = ",".join(n for n, i in self.holders if i == index)
            parts.append(f"[{first}-{last}] on {nodes}")
        return "; ".join(parts)


def plan_stages(costs: LayerCosts, members: Sequence[Member], need: NeedFn) -> StagePlan | None:
    """The plan for `members` (see the module docstring), or None when together they cannot hold the model."""
    order = sorted(members, key=lambda m: (-m.budget, m.node))
    for stages in range(2, min(len(order), costs.layers) + 1):
        groups = [order[k::stages] for k in range(stages)]
        budgets = [min(m.budget for m in group) for group in groups]
        speeds = [max(1e-6, min(m.speed for m in group)) for group in groups]
        ranges = balanced_split(costs, budgets, speeds, need)
        if ranges is None:
            continue
        dealt = {m.node: k for k, group in enumerate(groups) for m in group}
        holders = _keep_what_is_held(ranges, order, need) or dealt
        return StagePlan(tuple(ranges), tuple(sorted(holders.items())))
    return None


def balanced_split(
    costs: LayerCosts, budgets: Sequence[int], speeds: Sequence[float], need: NeedFn
) -> list[tuple[int, int]] | None:
    """Contiguous ranges, one per budget, covering every layer: each fits its budget, and the slowest stage (its
    multiply-adds over its speed) is as fast as it can be. None when no split fits."""
    layers, stages = costs.layers, len(budgets)
    inf = float("inf")
    # best[k][b]: the smallest largest-stage-time of stages 0..k-1 covering layers [0, b); cut[k][b]: where stage k-1
    # starts in that best split.
    best = [[inf] * (layers + 1) for _ in range(stages + 1)]
    cut = [[-1] * (layers + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for b in range(k, layers - (stages - k) + 1):
            for a in range(k - 1, b):
                if best[k - 1][a] == inf or need(a, b - 1) > budgets[k - 1]:
                    continue
                slowest = max(best[k - 1][a], costs.stage_flops(a, b - 1) / speeds[k - 1])
                if slowest < best[k][b]:
                    best[k][b], cut[k][b] = slowest, a
    if best[stages][layers] == inf:
        return None
    ranges, b = [], layers
    for k in range(stages, 0, -1):
        a = cut[k][b]
        ranges.append((a, b - 1))
        b = a
    return ranges[::-1]


def _keep_what_is_held(ranges: list[tuple[int, int]], order: list[Member], need: NeedFn) -> dict[str, int] | None:
    """Holders where members that hold a planned range keep it; None when that leaves a stage without a holder
    that fits (then the plain deal stands)."""
    holders: dict[str, int] = {}
    for m in order:
        if m.holds in ranges and need(*m.holds) <= m.budget:
            holders[m.node] = ranges.index(m.holds)
    counts = [0] * len(ranges)
    for index in holders.values():
        counts[index] += 1
    for m in order:  # stages nobody holds first, then the fewest holders, each to a member it fits
        if m.node in holders:
            continue
        fits = [k for k, (a, b) in enumerate(ranges) if need(a, b) <= m.budget]
        if not fits:
            continue
        k = min(fits, key=lambda i: (counts[i], i))
        holders[m.node] = k
        counts[k] += 1
    return holders if all(counts) else None
