"""The chat engine's scheduler as a specification, driven with a fake runner that keeps each slot's tokens: slots,
the key/value cache's cap, request states, and that moving requests between slots never loses what they hold."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.models.backends.chat_scheduler import ChatScheduler, IllegalMove, SchedSeq, SeqState, StepPlan
from nodes.models.backends.prefix_cache import BLOCK_TOKENS


@dataclass
class FakeRunner:
    """What the real runner holds, as tokens: slot -> the tokens in its cache, within the planned shape."""

    rows: int = 0
    length: int = 0
    slots: dict[int, list[int]] = field(default_factory=dict)
    peak_cells: int = 0
    pool: dict[int, list[int]] = field(default_factory=dict)  # prefix cache: pool slot -> its block's tokens

    def run(self, plan: StepPlan, next_tokens: dict[int, int]) -> None:
        for row, saved in plan.saves:  # first, before any row is moved or cut
            for i, slot in enumerate(saved.slots):
                start = saved.start + i * BLOCK_TOKENS
                block = self.slots[row][start : start + BLOCK_TOKENS]
                assert len(block) == BLOCK_TOKENS, "a block saved from a row that does not hold it"
                self.pool[slot] = block
        for src, dst, tokens in plan.moves:
            self.slots[dst] = list(self.slots.get(src, [])[:tokens])
        self.rows, self.length = plan.rows, plan.length
        self.slots = {s: t[: self.length] for s, t in self.slots.items() if s < self.rows}
        self.peak_cells = max(self.peak_cells, self.rows * self.length)
        if plan.load:
            assert plan.prefill is not None
            self.slots[plan.prefill.slot] = [t for slot in plan.load for t in self.pool[slot]]
        if plan.prefill is not None:
            seq = plan.prefill
            assert seq.slot < self.rows and seq.cached + len(plan.chunk) <= self.length
            self.slots[seq.slot] = self.slots.get(seq.slot, [])[: seq.cached] + list(plan.chunk)
        for i, seq in enumerate(plan.decode):
            assert seq.slot == i, "running requests sit in slots 0..n-1"
            assert seq.cached < self.length
            self.slots[i] = self.slots[i][: seq.cached] + [next_tokens[id(seq)]]


class Engine:
    """The engine's side of the loop, minus the model: each request writes its own number as its tokens."""

    def __init__(self, scheduler: ChatScheduler) -> None:
        self.s = scheduler
        self.runner = FakeRunner()
        self.expected: dict[int, list[int]] = {}  # id(seq) -> what its cache must hold
        self.left: dict[int, int] = {}  # tokens each may still write
        self.prompts: dict[int, list[int]] = {}

    def add(self, seq: SchedSeq, prompt: list[int], new_tokens: int) -> None:
        self.s.add(seq)
        self.s.prepared(seq, prompt, len(prompt) + new_tokens)
        self.expected[id(seq)] = []
        self.left[id(seq)] = new_tokens
        self.prompts[id(seq)] = list(prompt)

    def step(self) -> StepPlan | None:
        plan = self.s.schedule()
        if plan is None:
            return None
        tokens = {id(seq): 1000 + len(self.expected[id(seq)]) for seq in plan.decode}
        if plan.load:  # what it takes from the prefix cache is the start of its own prompt, nobody else's
            seq = plan.prefill
            assert seq is not None and seq.reused == len(plan.load) * BLOCK_TOKENS == seq.cached
            self.expected[id(seq)] = self.prompts[id(seq)][: seq.reused]
        self.runner.run(plan, tokens)
        # What each request of the step finds in its slot is its own past: moves and resizes lost nothing.
        for seq in plan.decode:
            assert self.runner.slots[seq.slot][: seq.cached + 1] == self.expected[id(seq)] + [tokens[id(seq)]]
        if plan.prefill is not None:
            seq = plan.prefill
            assert self.runner.slots[seq.slot] == self.expected[id(seq)] + plan.chunk
        assert self.runner.rows * self.runner.length <= self.s.kv_tokens, "the cache passed its cap"
        if plan.prefill is not None:
            seq = plan.prefill
            self.expected[id(seq)] += plan.chunk
            if self.s.prefilled(seq, len(plan.chunk)):
                self.s.start(seq)
        for seq in plan.decode:
            self.expected[id(seq)].append(tokens[id(seq)])
            self.s.decoded(seq, tokens[id(seq)])
            assert seq.tokens == self.expected[id(seq)]
            self.left[id(seq)] -= 1
            if self.left[id(seq)] <= 0:
                self.s.end(seq, SeqState.FINISHED)
        return plan

    def check(self) -> None:
        assert self.runner.peak_cells <= self.s.kv_tokens, "the cache passed its cap"
        assert [x.slot for x in self.s.running] == list(range(len(self.s.running)))


def seq(name: str = "") -> SchedSeq:
    return SchedSeq(owner=name, need=0)


def test_a_preparing_request_takes_no_slot_and_does_not_hold_up_the_others() -> None:
    s = ChatScheduler(slots=2, kv_tokens=4096, context=512)
    engine = Engine(s)
    slow = seq("grammar still compiling")
    s.add(slow)
    ready = seq("ready")
    engine.add(ready, [1, 2, 3], new_tokens=4)
    plan = engine.step()
    assert plan is not None and plan.prefill is ready and slow.state is SeqState.PREPARING
    assert slow.slot == -1 and s.room() == 0  # both slots are spoken for, one by the preparing request


def test_the_prompt_is_read_in_chunks_within_the_step_token_budget_while_others_decode() -> None:
    s = ChatScheduler(slots=4, kv_tokens=1 << 16, context=4096, prefill_chunk=128, step_tokens=100)
    engine = Engine(s)
    first = seq()
    engine.add(first, [7] * 10, new_tokens=50)
    while first.state is not SeqState.RUNNING:
        engine.step()
    long = seq()
    engine.add(long, list(range(300)), new_tokens=5)
    chunks = []
    while long.state is SeqState.WAITING or long.state is SeqState.PREFILLING:
        plan = engine.step()
        assert plan is not None
        if plan.prefill is long:
            chunks.append(len(plan.chunk))
            assert first in plan.decode, "the running request advanced in the same step"
    assert chunks == [99, 99, 99, 3]  # 100 tokens a step: one decodes, 99 are read
    engine.check()


def test_a_taken_over_answer_is_read_one_token_a_step_as_it_was_decoded() -> None:
    """A failed node's streamed answer (the input's last tokens) is not read as a chunk: its keys and values would
    differ in the last bits from the failed node's, and the answer could go another way at a near tie."""
    s = ChatScheduler(slots=2, kv_tokens=1 << 16, context=4096, prefill_chunk=128)
    engine = Engine(s)
    resumed = seq("taken over")
    s.add(resumed)
    s.prepared(resumed, list(range(300)) + [900, 901, 902], 303 + 5, replay=3)
    engine.expected[id(resumed)], engine.left[id(resumed)] = [], 5
    chunks = []
    while resumed.state is not SeqState.RUNNING:
        plan = engine.step()
        assert plan is not None and plan.prefill is resumed
        chunks.append(plan.chunk)
    assert [len(c) for c in chunks] == [128, 128, 44, 1, 1, 1]
    assert chunks[-3:] == [[900], [901], [902]]


def test_a_request_that_leaves_frees_its_slot_and_the_last_one_moves_into_the_hole() -> None:
    s = ChatScheduler(slots=3, kv_tokens=1 << 16, context=2048)
    engine = Engine(s)
    a, b, c = seq("a"), seq("b"), seq("c")
    for x in (a, b, c):
        engine.add(x, [1, 2], new_tokens=100)
    while len(s.running) < 3:
        engine.step()
    engine.step()
    s.end(a, SeqState.ABORTED)  # cancelled between steps
    assert a.slot == -1 and [x.slot for x in s.running] == [0, 1] and c.slot == 0
    late = seq("late")
    engine.add(late, [5], new_tokens=3)
    holds = c.cached
    plan = engine.step()
    assert plan is not None and plan.moves == [(2, 0, holds)]  # c's whole cache, copied before the step
    assert plan.prefill is late and late.slot == 2  # the freed slot serves the newcomer at once
    engine.check()


def test_no_request_starts_unless_every_started_one_can_grow_to_its_full_need() -> None:
    # Rows come in powers of two: 4 rows x 512 tokens = 2048 token slots hold four requests that may reach 400
    # tokens each; a fifth would need 8 rows, so it waits.
    s = ChatScheduler(slots=8, kv_tokens=2048, context=1024)
    engine = Engine(s)
    big = [seq(f"r{i}") for i in range(5)]
    for x in big:
        engine.add(x, [1] * 100, new_tokens=300)
    for _ in range(20):
        engine.step()
        engine.check()
    started = [x for x in big if x.state is not SeqState.WAITING]
    assert len(started) == 4 and big[4].state is SeqState.WAITING
    finished_before_start = -1
    while big[4].state is SeqState.WAITING:
        finished_before_start = sum(x.state is SeqState.FINISHED for x in started)
        assert engine.step() is not None
        engine.check()
    assert finished_before_start == 1, "it started in the step after the first of the others ended, not before"


def test_a_request_that_can_never_fit_is_refused_with_what_to_do() -> None:
    s = ChatScheduler(slots=4, kv_tokens=1024, context=8192)
    assert s.max_need() == 1024
    x = seq()
    s.add(x)
    with pytest.raises(ValueError, match=r"holds at most 1024 .* --kv-cache"):
        s.prepared(x, [1] * 1000, need=1500)
    assert x.state is SeqState.FAILED and not s.busy()


def test_a_cache_too_small_for_one_short_request_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot hold even one short request"):
        ChatScheduler(slots=16, kv_tokens=100, context=2048)


def test_arrays_left_large_by_a_long_request_shrink_before_many_short_ones_start() -> None:
    s = ChatScheduler(slots=16, kv_tokens=4 * 4096, context=4096)
    engine = Engine(s)
    long = seq("long")
    engine.add(long, [1] * 3000, new_tokens=1000)
    while long.state is not SeqState.FINISHED:
        engine.step()
    shorts = [seq(f"s{i}") for i in range(8)]
    for x in shorts:
        engine.add(x, [2] * 50, new_tokens=100)
    for _ in range(40):
        engine.step()
        engine.check()  # 8 rows x 4096 would pass the cap: the arrays shrank first
    assert sum(x.state is not SeqState.WAITING for x in shorts) == 8


def test_state_changes_are_checked() -> None:
    x = seq()
    with pytest.raises(IllegalMove):
        x.move(SeqState.RUNNING)  # a request is prepared and read before it decodes
    x.move(SeqState.ABORTED)
    with pytest.raises(IllegalMove):
        x.move(SeqState.WAITING)  # an ended request stays ended


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 300), st.integers(1, 80)),
            st.tuples(st.just("step"), st.integers(1, 6), st.just(0)),
            st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0)),
        ),
        max_size=60,
    ),
    st.sampled_from([(4, 1 << 16, 1024), (3, 3 * 512, 512), (8, 4 * 1024, 2048), (2, 2 * 256, 256)]),
    st.sampled_from([0, 3, 40]),
)
def test_whatever_arrives_and_leaves_every_request_keeps_its_cache_and_the_cap_holds(
    events: list[tuple[str, int, int]], shape: tuple[int, int, int], cache_blocks: int
) -> None:
    slots, kv_tokens, context = shape
    s = ChatScheduler(slots, kv_tokens, context, prefill_chunk=64, cache_blocks=cache_blocks)
    engine = Engine(s)
    held: list[SchedSeq] = []
    for kind, a, b in events:
        if kind == "add" and s.room() > 0:
            x = seq()
            s.add(x)
            prompt, new = [a % 97] * min(a, context // 2), b
            if len(prompt) + new <= s.max_need():
                s.prepared(x, prompt, len(prompt) + new)
                engine.expected[id(x)], engine.left[id(x)], engine.prompts[id(x)] = [], new, prompt
                held.append(x)
            else:
                s.end(x, SeqState.ABORTED)
        elif kind == "step":
            for _ in range(a):
                engine.step()
                engine.check()
        elif kind == "cancel" and held:
            victim = held[a % len(held)]
            s.end(victim, SeqState.ABORTED)
        held = [x for x in held if not x.ended]
        assert [x.slot for x in s.running] == list(range(len(s.running)))
        assert s.room() >= 0
    for _ in range(2000):  # everything left runs to its end
        if engine.step() is None and not s.waiting:
            break
        engine.check()
    assert not s.has_work()
    if s.cache is not None:
        assert s.cache.pinned() == 0 and len(s.cache) <= cache_blocks


# ---------------------------------------------------------------- the prefix cache


def run_to_end(engine: Engine, *seqs: SchedSeq) -> None:
    while not all(x.ended for x in seqs):
        assert engine.step() is not None
        engine.check()


def test_a_prompt_that_starts_like_an_earlier_one_reads_only_what_is_new() -> None:
    s = ChatScheduler(slots=4, kv_tokens=1 << 16, context=2048, cache_blocks=64)
    engine = Engine(s)
    system = list(range(100, 180))  # 80 tokens: five full blocks
    first = seq("turn 1")
    engine.add(first, [*system, 1, 2, 3], new_tokens=20)
    run_to_end(engine, first)
    assert first.reused == 0
    # Turn 2 sends turn 1's prompt, the answer the engine wrote, and a new question.
    answer = engine.expected[id(first)][len(system) + 3 :]
    second = seq("turn 2")
    engine.add(second, [*system, 1, 2, 3, *answer, 4, 5, 6, 7], new_tokens=5)
    plan = engine.step()
    assert plan is not None and plan.prefill is second and plan.load
    # 83 prompt tokens + the 20 answer tokens fed back = 103 tokens in turn 1's row: six full blocks.
    assert second.reused == 96
    assert len(plan.chunk) == 83 + 20 + 4 - 96  # only the rest is read (the Engine checks the row's tokens)
    run_to_end(engine, second)
    counts = s.cache.counts if s.cache else None
    assert counts is not None and counts.hits == 1 and counts.reused_tokens == 96 and counts.lookups == 2


def test_the_last_prompt_token_is_always_read_again() -> None:
    s = ChatScheduler(slots=2, kv_tokens=1 << 14, context=1024, cache_blocks=16)
    engine = Engine(s)
    prompt = list(range(32))  # exactly two blocks
    a = seq()
    engine.add(a, prompt, new_tokens=3)
    run_to_end(engine, a)
    b = seq()
    engine.add(b, prompt, new_tokens=3)  # the same prompt again
    plan = engine.step()
    assert plan is not None and b.reused == 16 and plan.chunk == prompt[16:]  # its logits choose the first token
    run_to_end(engine, b)


def test_a_request_whose_prompt_is_in_shares_it_while_it_is_still_decoding() -> None:
    s = ChatScheduler(slots=4, kv_tokens=1 << 16, context=2048, cache_blocks=64)
    engine = Engine(s)
    shared = list(range(500, 564))  # one long system prompt, four blocks
    a = seq("a")
    engine.add(a, [*shared, 1], new_tokens=50)
    while a.state is not SeqState.RUNNING:
        engine.step()
    b = seq("b")
    engine.add(b, [*shared, 2], new_tokens=5)
    while b.state is SeqState.WAITING:
        engine.step()
    assert a.state is SeqState.RUNNING and b.reused == 64
    run_to_end(engine, a, b)


def test_the_pool_keeps_the_most_recently_used_blocks_and_never_grows_past_its_size() -> None:
    s = ChatScheduler(slots=2, kv_tokens=1 << 14, context=1024, cache_blocks=6)
    engine = Engine(s)
    a, b, c = ([i * 1000 + t for t in range(49)] for i in range(3))  # prompts of three blocks each

    def ask(prompt: list[int]) -> int:
        x = seq()
        engine.add(x, prompt, new_tokens=1)
        run_to_end(engine, x)
        return x.reused

    assert [ask(a), ask(b), ask(a)] == [0, 0, 48]  # the pool is full; a was used last
    assert ask(c) == 0  # c takes b's blocks, the least recently used
    assert s.cache is not None and s.cache.counts.evictions == 3 and len(s.cache) == 6
    assert [ask(a), ask(b)] == [48, 0]
    assert len(s.cache) == 6 and s.cache.pinned() == 0


def test_a_request_that_leaves_in_the_step_its_slot_is_taken_still_leaves_its_own_blocks() -> None:
    s = ChatScheduler(slots=3, kv_tokens=1 << 16, context=2048, cache_blocks=64)
    engine = Engine(s)
    a, b = seq("a"), seq("b")
    engine.add(a, list(range(40)), new_tokens=100)
    engine.add(b, list(range(200, 240)), new_tokens=100)
    while len(s.running) < 2:
        engine.step()
    s.end(a, SeqState.FINISHED)  # b moves into a's row in the next step: a's blocks are copied out first
    plan = engine.step()
    assert plan is not None and plan.saves and plan.moves
    c = seq("c")
    engine.add(c, [*list(range(40)), 7], new_tokens=2)  # starts like a
    run_to_end(engine, c)
    assert c.reused == 32  # the FakeRunner checked c's row holds exactly its own prompt's tokens


def test_a_request_moved_into_a_hole_and_ended_before_the_next_step_is_saved_from_where_its_keys_are() -> None:
    """Found by the random test: A (row 0) ends, B moves into its row (a move the next plan makes), then B ends too
    before that plan runs. B's blocks must be copied from row 1, where they still are, not from row 0 (A's)."""
    s = ChatScheduler(slots=2, kv_tokens=1 << 16, context=512, cache_blocks=8)
    engine = Engine(s)
    a, b = seq("a"), seq("b")
    engine.add(a, [1], new_tokens=50)
    engine.add(b, [15] * BLOCK_TOKENS, new_tokens=50)
    while len(b.tokens) < 2 * BLOCK_TOKENS:  # its prompt's block is saved as it is read; a second one at its end
        engine.step()
    assert (a.slot, b.slot) == (0, 1)
    s.end(a, SeqState.ABORTED)
    s.end(b, SeqState.ABORTED)
    plan = engine.step()  # the fake runner checks that every saved block is one the row holds
    assert plan is not None and plan.saves[-1][0] == 1  # b's (a's own is saved from row 0)
    assert engine.runner.pool[plan.saves[-1][1].slots[0]] == b.tokens[BLOCK_TOKENS : 2 * BLOCK_TOKENS]


def test_a_cancel_leaves_nothing_pinned_and_a_failure_leaves_nothing_behind() -> None:
    s = ChatScheduler(slots=2, kv_tokens=1 << 14, context=1024, prefill_chunk=16, cache_blocks=32)
    engine = Engine(s)
    prompt = list(range(80))
    first = seq()
    engine.add(first, prompt, new_tokens=2)
    run_to_end(engine, first)
    cancelled = seq("cancelled while its prompt is read")
    engine.add(cancelled, [*prompt, *range(900, 940)], new_tokens=5)
    engine.step()
    assert cancelled.state is SeqState.PREFILLING and cancelled.reused == 80  # its prompt and the token fed back
    s.end(cancelled, SeqState.ABORTED)
    assert s.cache is not None
    engine.step()  # its blocks are saved, its pins gone
    assert s.cache.pinned() == 0
    failed = seq("failed")
    engine.add(failed, list(range(3000, 3040)), new_tokens=5)
    while failed.state is not SeqState.RUNNING:
        engine.step()
    for _ in range(3):
        engine.step()
    held = len(s.cache)  # with its prompt's two blocks, kept once read
    s.end(failed, SeqState.FAILED)
    assert len(s.cache) == held  # nothing of what it wrote since


def test_what_the_last_request_leaves_reaches_the_pool_before_the_arrays_go() -> None:
    s = ChatScheduler(slots=2, kv_tokens=1 << 14, context=1024, cache_blocks=32)
    engine = Engine(s)
    x = seq()
    engine.add(x, list(range(40)), new_tokens=30)
    run_to_end(engine, x)
    plan = s.schedule()
    assert plan is not None and plan.saves and plan.prefill is None and not plan.decode
    engine.runner.run(plan, {})
    assert s.schedule() is None and s.idle()
