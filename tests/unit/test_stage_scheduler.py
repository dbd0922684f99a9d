"""A pipeline stage's scheduler, driven with a fake runner whose rows keep each sequence's positions: whatever the
plans do (prompt chunks, decode batches, moves, swaps), every sequence's row holds exactly its own positions, the
arrays never pass the cap, and groups of sequences keep their rows."""

from __future__ import annotations

import pytest

from nodes.models.backends.stage_scheduler import StageInput, StagePlan, StageScheduler, StageSeq, StageState


class FakeRunner:
    """Rows of token ids, as the real runner holds keys and values: carries out plans and checks them."""

    def __init__(self, kv_tokens: int) -> None:
        self.kv_tokens = kv_tokens
        self.rows: list[list[int]] = []
        self.length = 0
        self.swapped = 0

    def step(self, plan: StagePlan) -> None:
        for src, dst, n in plan.moves:
            self.rows[dst][:n] = self.rows[src][:n]
            del self.rows[dst][n:]
        for a, b, _ in plan.swaps:
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            self.swapped += 1
        assert plan.rows * plan.length <= self.kv_tokens, "the arrays passed the cap"
        while len(self.rows) < plan.rows:
            self.rows.append([])
        self.length = plan.length
        if plan.prefill is not None:
            seq, head = plan.prefill, plan.prefill.inputs[0]
            row = self.rows[seq.slot]
            assert len(row) >= seq.cached == head.start + head.taken
            del row[seq.cached :]  # what lies past a row's positions is stale (a sequence that left) and overwritten
            row.extend(head.tokens[head.taken : head.taken + plan.chunk])
            assert len(row) <= self.length
        for i, seq in enumerate(plan.decode):
            assert seq.slot == plan.decode_start + i, "a decode batch is contiguous rows"
            row, head = self.rows[seq.slot], seq.inputs[0]
            assert len(row) >= seq.cached
            del row[seq.cached :]
            row.append(head.tokens[head.taken])
            assert len(row) <= self.length


def token(seq: int, pos: int) -> int:
    return seq * 10_000 + pos


class Pipeline:
    """One stage and its sequences; `feed_prompt`/`feed_token` play the stage before it."""

    def __init__(self, slots: int = 8, kv_tokens: int = 8 * 1024, context: int = 1024, chunk: int = 16) -> None:
        self.sched = StageScheduler(slots, kv_tokens, context, prefill_chunk=chunk)
        self.runner = FakeRunner(kv_tokens)
        self.seqs: dict[int, StageSeq] = {}
        self.due: list[int] = []  # sequences whose token is due (their prompt is read, or they decoded)

    def open(self, n: int, need: int = 200) -> StageSeq:
        seq = StageSeq(owner=n, need=need)
        self.sched.add(seq)
        self.seqs[n] = seq
        return seq

    def feed_prompt(self, n: int, length: int, chunk: int = 16) -> None:
        for start in range(0, length, chunk):
            end = min(length, start + chunk)
            tokens = [token(n, p) for p in range(start, end)]
            self.sched.feed(self.seqs[n], StageInput(start, tokens, last=end == length, due=end == length))

    def feed_token(self, n: int) -> None:
        seq = self.seqs[n]
        pos = seq.cached + sum(i.left for i in seq.inputs)
        self.sched.feed(seq, StageInput(pos, [token(n, pos)], last=True, due=True))

    def step(self, cap: int | None = None) -> StagePlan | None:
        plan = self.sched.schedule(cap)
        if plan is None:
            return None
        self.runner.step(plan)
        if plan.prefill is not None and self.sched.ran_prefill(plan.prefill, plan.chunk):
            self.due.append(plan.prefill.owner)
        for seq in plan.decode:
            self.sched.ran_decode(seq)
            self.due.append(seq.owner)
        return plan

    def check_rows(self) -> None:
        for n, seq in self.seqs.items():
            if seq.state is StageState.ACTIVE:
                assert self.runner.rows[seq.slot][: seq.cached] == [token(n, p) for p in range(seq.cached)], n


def test_a_prompt_runs_a_chunk_a_step_then_its_tokens_one_a_step() -> None:
    p = Pipeline(chunk=16)
    p.open(1)
    p.feed_prompt(1, 40, chunk=40)  # one input longer than the chunk: read 16, 16, 8
    chunks = []
    while (plan := p.step()) is not None:
        chunks.append(plan.chunk)
    assert chunks == [16, 16, 8] and p.due == [1]
    for _ in range(3):
        p.feed_token(1)
        plan = p.step()
        assert plan is not None and [s.owner for s in plan.decode] == [1] and plan.prefill is None
    assert p.seqs[1].cached == 43
    p.check_rows()


def test_inputs_that_arrive_before_a_row_is_free_wait_and_run_in_order() -> None:
    p = Pipeline(slots=1)
    p.open(1)
    p.open(2)
    p.feed_prompt(2, 10)  # 2 waits: the only row is 1's
    p.feed_prompt(1, 5)
    assert p.step() is not None and p.seqs[2].state is StageState.WAITING
    p.sched.end(p.seqs[1], StageState.FINISHED)
    while p.step() is not None:
        pass
    assert p.seqs[2].state is StageState.ACTIVE and p.seqs[2].cached == 10
    p.check_rows()


def test_ready_sequences_outside_the_batch_window_swap_rows_and_keep_their_positions() -> None:
    p = Pipeline()
    for n in range(6):
        p.open(n)
        p.feed_prompt(n, 8)
    while p.step() is not None:
        pass
    # Tokens come back for rows 0, 2, 4 only: to be one batch they must be neighbours.
    for n in (0, 2, 4):
        p.feed_token(n)
    plan = p.step()
    assert plan is not None and len(plan.decode) == 3 and plan.swaps
    assert sorted(s.owner for s in plan.decode) == [0, 2, 4]
    p.check_rows()


def test_two_groups_of_sequences_take_turns_without_any_swap_once_settled() -> None:
    p = Pipeline()
    for n in range(8):
        p.open(n)
        p.feed_prompt(n, 8)
    while p.step() is not None:
        pass
    p.due.clear()
    for n in range(8):
        p.feed_token(n)
    batches = []
    for _ in range(12):
        plan = p.step(cap=4)  # a two-stage pipeline: half the sequences a step
        assert plan is not None
        batches.append(tuple(sorted(s.owner for s in plan.decode)))
        for seq in plan.decode:  # the next stage sends their tokens back before the other half is done
            p.feed_token(seq.owner)
    assert set(batches) == {(0, 1, 2, 3), (4, 5, 6, 7)} and p.runner.swapped == 0
    p.check_rows()


def test_a_sequence_that_leaves_frees_its_row_and_the_last_takes_its_place() -> None:
    p = Pipeline()
    for n in range(4):
        p.open(n)
        p.feed_prompt(n, 8)
    while p.step() is not None:
        pass
    p.sched.end(p.seqs[1], StageState.ABORTED)
    assert p.seqs[3].slot == 1
    for n in (0, 2, 3):
        p.feed_token(n)
    plan = p.step()
    assert plan is not None and plan.moves == [(3, 1, 8)]
    p.check_rows()


def test_the_arrays_never_pass_the_cap_and_a_sequence_too_long_for_it_is_refused() -> None:
    p = Pipeline(slots=4, kv_tokens=1024, context=1024)
    assert p.sched.max_need() == 1024
    with pytest.raises(ValueError, match="holds at most 1024"):
        p.open(9, need=2000)
    for n in range(4):
        p.open(n, need=300)  # each may grow to 512 tokens of row: two fit 1024, four do not
        p.feed_prompt(n, 20)
    for _ in range(20):
        p.step()
    active = [s for s in p.seqs.values() if s.state is StageState.ACTIVE]
    assert len(active) == 2
    p.check_rows()


def test_a_sequence_whose_next_position_is_missing_does_not_run() -> None:
    p = Pipeline()
    p.open(1)
    p.sched.feed(p.seqs[1], StageInput(3, [token(1, 3)], last=True))  # positions 0..2 never came
    assert p.step() is None and p.seqs[1].cached == 0


@pytest.mark.parametrize("seed", range(20))
def test_under_random_churn_every_row_holds_exactly_its_own_positions(seed: int) -> None:
    import random

    rng = random.Random(seed)
    p = Pipeline(slots=8, kv_tokens=8 * 512, context=512, chunk=16)
    opened = 0
    for _ in range(400):
        action = rng.random()
        live = [n for n, s in p.seqs.items() if not s.ended]
        if action < 0.1 and len(live) < 12:
            p.open(opened, need=rng.randint(40, 300))
            p.feed_prompt(opened, rng.randint(1, 40), chunk=rng.choice([1, 7, 16]))
            opened += 1
        elif action < 0.15 and live:
            seq = p.seqs[rng.choice(live)]
            active = seq.state is StageState.ACTIVE
            p.sched.end(seq, rng.choice([StageState.FINISHED, StageState.ABORTED]) if active else StageState.ABORTED)
        for n in list(p.due):  # tokens come back, some late
            seq = p.seqs[n]
            if seq.ended or seq.cached >= seq.need - 1:
                p.due.remove(n)
            elif rng.random() < 0.6:
                p.due.remove(n)
                p.feed_token(n)
        if p.step(cap=rng.choice([None, 1, 2, 4])) is not None:  # else copies may be owed until the next step
            p.check_rows()
        assert [s.slot for s in p.sched.active] == list(range(len(p.sched.active)))


def test_a_first_stage_forms_as_many_groups_as_its_pipeline_has_stages() -> None:
    p = Pipeline()
    for n in range(6):
        p.open(n).stages = 3
        p.feed_prompt(n, 8)
    while p.step() is not None:
        pass
    for n in range(6):
        p.feed_token(n)
    plan = p.sched.schedule(groups=True)
    assert plan is not None and len(plan.decode) == 2  # 6 sequences over 3 stages: groups of 2
    assert p.sched.schedule(groups=False) is not None  # a later stage runs whatever is here
