"""The automatic split: every node derives the same stages from the same gossip, weighted by what each can hold and
how fast it is, and a change of one holder moves nobody else."""

from __future__ import annotations

import random

from nodes.models.backends.onnx_stage_graph import LayerCosts
from nodes.models.stage_plan import Member, StagePlan, plan_stages

MB = 1_000_000
# SmolLM2-135M as its int4 build costs: 30 layers of ~2.9 MB and 3.5 M multiply-adds per token, a 32 MB table
# shared by the embeddings and the head, whose matmul is worth 8 layers of work.
SMOLLM2 = LayerCosts(30, 576, (int(2.9 * MB),) * 30, (3_538_944,) * 30, 32 * MB, 32 * MB, 28_311_552, 2 * MB)


def need(first: int, last: int) -> int:
    return int(SMOLLM2.stage_bytes(first, last) * 1.5) + 50 * MB


WHOLE = need(0, 29)  # about 230 MB


def covers_the_model(plan: StagePlan) -> bool:
    expected = 0
    for first, last in plan.ranges:
        if first != expected or last < first:
            return False
        expected = last + 1
    return expected == SMOLLM2.layers


def test_two_nodes_that_each_hold_about_half_split_it_in_two_with_the_work_balanced() -> None:
    budget = int(WHOLE * 0.7)
    plan = plan_stages(SMOLLM2, [Member("a", budget), Member("b", budget)], need)
    assert plan is not None and covers_the_model(plan) and len(plan.ranges) == 2
    assert {n for n, _ in plan.holders} == {"a", "b"} and plan.range_of("a") != plan.range_of("b")
    (a0, a1), (b0, b1) = plan.ranges
    work = [SMOLLM2.stage_flops(a0, a1), SMOLLM2.stage_flops(b0, b1)]
    assert max(work) / min(work) < 1.15  # the head weighs in: the last stage gets fewer layers
    assert a1 - a0 > b1 - b0
    assert all(need(first, last) <= budget for first, last in plan.ranges)


def test_every_node_derives_the_same_plan_whatever_order_it_heard_of_the_others() -> None:
    members = [Member(f"n{i}", int(WHOLE * f)) for i, f in enumerate([0.4, 0.45, 0.5, 0.42])]
    plans = set()
    for seed in range(10):
        shuffled = list(members)
        random.Random(seed).shuffle(shuffled)
        plans.add(plan_stages(SMOLLM2, shuffled, need))
    assert len(plans) == 1


def test_a_third_node_where_two_suffice_holds_a_second_copy_of_a_stage() -> None:
    budget = int(WHOLE * 0.7)
    plan = plan_stages(SMOLLM2, [Member(n, budget) for n in "abc"], need)
    assert plan is not None and len(plan.ranges) == 2
    held = sorted(i for _, i in plan.holders)
    assert held == [0, 0, 1]


def test_smaller_nodes_make_more_stages() -> None:
    budget = int(WHOLE * 0.5)  # the embeddings, the head and the engine are the same size in every split
    plan = plan_stages(SMOLLM2, [Member(n, budget) for n in "abc"], need)
    assert plan is not None and covers_the_model(plan) and len(plan.ranges) == 3
    assert all(need(first, last) <= budget for first, last in plan.ranges)


def test_the_node_that_can_hold_more_gets_more_layers_when_memory_binds() -> None:
    small, big = int(WHOLE * 0.42), int(WHOLE * 0.9)
    plan = plan_stages(SMOLLM2, [Member("small", small), Member("big", big)], need)
    assert plan is not None
    (f0, l0), (f1, l1) = plan.ranges
    assert dict(plan.holders)["big"] == 0  # the biggest is dealt first
    assert l0 - f0 > l1 - f1 and need(f1, l1) <= small


def test_a_faster_node_gets_more_of_the_work() -> None:
    budget = int(WHOLE * 0.9)
    even = plan_stages(SMOLLM2, [Member("a", budget), Member("b", budget)], need)
    fast_second = plan_stages(SMOLLM2, [Member("a", budget, 1.0), Member("b", budget, 3.0)], need)
    assert even is not None and fast_second is not None
    assert dict(fast_second.holders)["b"] == 1
    assert fast_second.ranges[1][0] < even.ranges[1][0]  # the fast second stage starts earlier: more layers


def test_nodes_that_cannot_hold_it_even_together_get_no_plan() -> None:
    assert plan_stages(SMOLLM2, [Member("a", WHOLE // 4), Member("b", WHOLE // 4)], need) is None
    assert plan_stages(SMOLLM2, [Member("a", WHOLE * 2)], need) is None  # one node: nothing to split


def test_a_plan_once_adopted_is_the_plan_again() -> None:
    budget = int(WHOLE * 0.7)
    members = [Member(n, budget) for n in "abcd"]
    plan = plan_stages(SMOLLM2, members, need)
    assert plan is not None
    adopted = [Member(m.node, m.budget, holds=plan.range_of(m.node)) for m in members]
    assert plan_stages(SMOLLM2, adopted, need) == plan


def test_losing_one_holder_of_a_copied_stage_moves_nobody_else() -> None:
    budget = int(WHOLE * 0.7)
    members = [Member(n, budget) for n in "abcd"]
    plan = plan_stages(SMOLLM2, members, need)
    assert plan is not None and sorted(i for _, i in plan.holders) == [0, 0, 1, 1]
    holding = {m.node: plan.range_of(m.node) for m in members}
    for gone in "abcd":
        left = [Member(n, budget, holds=holding[n]) for n in "abcd" if n != gone]
        after = plan_stages(SMOLLM2, left, need)
        assert after is not None and after.ranges == plan.ranges
        moved = [m.node for m in left if after.range_of(m.node) != holding[m.node]]
        stranded = [i for i in range(2) if all(after.range_of(m.node) != plan.ranges[i] for m in left)]
        assert moved == [] and stranded == [], (gone, moved)
