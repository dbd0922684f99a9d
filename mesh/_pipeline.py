"""Composing a pipeline for a model no eligible node holds whole: one live holder per stage, chained from layer 0 to
the model's last layer. Pure: told the holders, it asks `choose` (the routing policy: P2C on each stage's load) for
one node among a stage's holders, and never reads a clock or a socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from protocol import parse_stage


@dataclass(frozen=True, slots=True)
class StageHolder:
    """A node serving a stage of a model, as its gossip (or this node's executor) says."""

    node: str
    stage: str  # the stage's name, `model[first-last]`
    first: int
    last: int
    layers: int  # of the whole model
    version: str  # of the whole build: only stages of one build chain


Chain = list[tuple[str, str]]  # (node, stage name), from layer 0 to the last layer
Choose = Callable[[str, list[str]], tuple[str, str] | None]  # (stage, nodes) -> (node, why) or None


def holders_of(model: str, served: Sequence[tuple[str, str, int, str]]) -> list[StageHolder]:
    """The stage holders of `model` (or of `model@version`, a pinned version) among (node, served name, the whole
    model's layers, version) entries; entries that are not stages of it are left out."""
    name, _, pin = model.partition("@")
    out = []
    for node, served_name, layers, version in served:
        stage = parse_stage(served_name)
        if stage is None or stage.model != name or layers <= stage.last or (pin and not version.startswith(pin)):
            continue
        out.append(StageHolder(node, served_name, stage.first, stage.last, layers, version))
    return out


def compose_chain(holders: Sequence[StageHolder], choose: Choose) -> tuple[Chain, list[str]] | None:
    """A chain of distinct nodes covering every layer (one build), and why each was chosen; None when the holders
    cannot cover the model. Stages that start where the chain has got to are tried longest first (fewer hops), one
    node per stage chosen by `choose`; a dead end tries the other holders of that stage, then other stages."""
    by_version: dict[str, list[StageHolder]] = {}
    for h in holders:
        by_version.setdefault(h.version, []).append(h)
    for version in sorted(by_version, key=lambda v: (-len(by_version[v]), v)):
        group = by_version[version]
        layers = max(h.layers for h in group)
        found = _extend([], [], 0, layers, [h for h in group if h.layers == layers], choose)
        if found is not None:
            return found
    return None


def _extend(chain: Chain, why: list[str], at: int, layers: int, holders: list[StageHolder],
            choose: Choose) -> tuple[Chain, list[str]] | None:  # fmt: skip
    if at == layers:
        return chain, why
    used = {node for node, _ in chain}
    stages: dict[str, list[StageHolder]] = {}
    for h in holders:
        if h.first == at and h.node not in used:
            stages.setdefault(h.stage, []).append(h)
    for stage in sorted(stages, key=lambda s: -stages[s][0].last):
        nodes = sorted({h.node for h in stages[stage]})
        end = stages[stage][0].last + 1
        while nodes:
            picked = choose(stage, nodes)
            if picked is None:
                break
            node, reason = picked
            found = _extend([*chain, (node, stage)], [*why, reason], end, layers, holders, choose)
            if found is not None:
                return found
            nodes.remove(node)
    return None
