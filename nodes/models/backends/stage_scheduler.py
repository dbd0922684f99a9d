"""A pipeline stage's scheduler: which sequences hold a row of the stage's key/value arrays, and what one step runs.

Pure: no numpy, no onnxruntime, no clock (unit-tested with a fake runner: tests/unit/test_stage_scheduler.py). The
stage engine (`onnx_stage`) tells it what arrived and what ran, and asks for the next step's plan.

Rules:
- A sequence's inputs arrive in order (a prompt's chunks, then one token per step once its prompt is read); they wait
  in the sequence's queue until it holds a row. A stage runs an input only when it is the next position
  (`start == cached`).
- Every active sequence holds a row 0..n-1 (compact: when one leaves, the last moves into its hole, a copy the plan
  names). One step runs at most one prompt chunk (the oldest waiting, at most `prefill_chunk` tokens and what the
  step's token budget leaves) and one decode batch: the `cap` sequences whose next token has waited longest, which
  must be contiguous rows. The batch runs in the window of `cap` rows holding the most of them; any outside it swap
  rows with sequences inside it (a copy the plan names). Groups of sequences that travel the pipeline together keep
  their rows, so the steady state swaps nothing.
- Memory is reserved as in the chat engine: the arrays are `rows x length` token slots (rows a power of two, length
  a multiple of LENGTH_STEP), grown as the sequences grow; a sequence is admitted only when the arrays every
  admitted sequence may grow to (its `need`) fit `kv_tokens`. A sequence whose own need cannot fit is refused.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .chat_scheduler import LENGTH_STEP, array_length, array_rows


class StageState(StrEnum):
    """Where one sequence is at this stage. Every change goes through `StageSeq.move`, checked against `_MOVES`."""

    PREPARING = "preparing"  # the first stage: its prompt is tokenized off the engine thread
    WAITING = "waiting"  # known; waits for a row and room in the key/value cache (its inputs are kept)
    ACTIVE = "active"  # holds a row; its inputs run as they come
    FINISHED = "finished"
    ABORTED = "aborted"  # cancelled, expired, or closed by another stage
    FAILED = "failed"


_ENDED = frozenset({StageState.FINISHED, StageState.ABORTED, StageState.FAILED})
_MOVES: dict[StageState, frozenset[StageState]] = {
    StageState.PREPARING: frozenset({StageState.WAITING, *_ENDED}),
    StageState.WAITING: frozenset({StageState.ACTIVE, StageState.ABORTED, StageState.FAILED}),
    StageState.ACTIVE: _ENDED,
    StageState.FINISHED: frozenset(),
    StageState.ABORTED: frozenset(),
    StageState.FAILED: frozenset(),
}


class IllegalMove(RuntimeError):
    """The engine asked for a transition the state table does not allow: a bug, never a caller's input."""


@dataclass(eq=False)
class StageInput:
    """Positions `start`.. of one sequence: their token ids, and (after the first stage) their hidden states."""

    start: int
    tokens: list[int]
    hidden: Any = None  # [len(tokens), hidden] rows, or None at the first stage
    last: bool = False  # the prompt is complete after these: each later input is one decode step
    due: bool = False  # a token is chosen after these (not while a failed chain's tokens are replayed)
    taken: int = 0  # how many of them ran
    arrived: int = 0  # the order inputs arrived in at this stage (the longest waiting run first)

    @property
    def left(self) -> int:
        return len(self.tokens) - self.taken


@dataclass(eq=False)
class StageSeq:
    """One sequence as this stage's scheduler sees it. `owner` is the engine's own record of it (opaque here)."""

    owner: Any
    need: int  # tokens it may hold at most
    state: StageState = StageState.PREPARING
    slot: int = -1
    cached: int = 0  # tokens of it in its row
    prompted: bool = False  # its prompt is read: from now on each input is one decode token
    inputs: deque[StageInput] = field(default_factory=deque)
    order: int = 0  # admission order (the oldest prompt chunk runs first)
    stages: int = 1  # how many stages its pipeline has (the first stage forms that many groups)

    def move(self, to: StageState) -> None:
        if to not in _MOVES[self.state]:
            raise IllegalMove(f"{self.state} -> {to}")
        self.state = to

    @property
    def ended(self) -> bool:
        return self.state in _ENDED

    def ready(self) -> bool:
        """Its next input is here and is the next position."""
        return bool(self.inputs) and self.inputs[0].start + self.inputs[0].taken == self.cached


@dataclass
class StagePlan:
    """What one step does, in order: row copies (moves, then swaps), the arrays' shape, a prompt chunk, a decode."""

    moves: list[tuple[int, int, int]]  # (from row, to row, tokens): copy before the step
    swaps: list[tuple[int, int, int]]  # (row a, row b, tokens to exchange: the longer of the two)
    rows: int
    length: int
    prefill: StageSeq | None  # run `chunk` positions of its head input, in its row
    chunk: int
    decode_start: int  # the decode batch is rows decode_start .. decode_start + len(decode) - 1
    decode: list[StageSeq]


class StageScheduler:
    """Rows, inputs and the key/value budget of one stage (see the module docstring)."""

    def __init__(
        self, slots: int, kv_tokens: int, context: int, prefill_chunk: int = 128, step_tokens: int | None = None
    ) -> None:
        if slots < 1 or context < 2 or prefill_chunk < 1:
            raise ValueError(f"bad stage shape: slots {slots}, prefill chunk {prefill_chunk}, context {context}")
        self.slots = slots
        self.context = context
        self.kv_tokens = kv_tokens
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens or prefill_chunk + slots
        if self.max_need() < 2:
            raise ValueError(f"a key/value cache of {kv_tokens} tokens cannot hold even one short request")
        self.preparing: list[StageSeq] = []
        self.waiting: list[StageSeq] = []  # FIFO
        self.active: list[StageSeq] = []  # active[i].slot == i
        self.alloc_rows = 0
        self.alloc_length = 0
        self._moves: list[tuple[int, int, StageSeq]] = []
        self._admitted = 0
        self._arrivals = 0

    # ------------------------------------------------------------ sizes

    def rows_for(self, n: int) -> int:
        return array_rows(n, self.slots)

    def length_for(self, tokens: int) -> int:
        return array_length(tokens, self.context)

    def max_need(self) -> int:
        """The most tokens one sequence may hold: alone, its arrays must fit the budget."""
        return min(self.context, self.kv_tokens // self.rows_for(1) // LENGTH_STEP * LENGTH_STEP)

    def check_need(self, need: int) -> None:
        limit = self.max_need()
        if need > limit:
            raise ValueError(
                f"the request needs {need} tokens of context; this stage's key/value cache holds at most {limit} "
                f"per request (raise --kv-cache on its node, or ask for fewer max_tokens)"
            )

    # ------------------------------------------------------------ sequences in and out

    def add(self, seq: StageSeq, *, preparing: bool = False) -> None:
        """A new sequence: PREPARING (the first stage tokenizes it), else WAITING; ValueError when it cannot fit."""
        if preparing:
            self.preparing.append(seq)
            return
        self.check_need(seq.need)
        seq.move(StageState.WAITING)
        self.waiting.append(seq)

    def prepared(self, seq: StageSeq, need: int) -> None:
        """The first stage knows its prompt: it waits for a row. ValueError (and FAILED) when it could never fit."""
        self.preparing.remove(seq)
        try:
            self.check_need(need)
        except ValueError:
            seq.move(StageState.FAILED)
            raise
        seq.need = need
        seq.move(StageState.WAITING)
        self.waiting.append(seq)

    def feed(self, seq: StageSeq, item: StageInput) -> None:
        """An input of `seq` arrived (in order)."""
        if not seq.ended:
            self._arrivals += 1
            item.arrived = self._arrivals
            seq.inputs.append(item)

    def end(self, seq: StageSeq, state: StageState) -> None:
        """`seq` is over here: forget it and free its row before the next step."""
        if state not in _ENDED:
            raise IllegalMove(f"end in {state}")
        if seq.ended:
            return
        was = seq.state
        seq.move(state)
        seq.inputs.clear()
        if was is StageState.PREPARING:
            self.preparing.remove(seq)
        elif was is StageState.WAITING:
            self.waiting.remove(seq)
        elif was is StageState.ACTIVE:
            hole = seq.slot
            self.active.remove(seq)
            seq.slot = -1
            if hole < len(self.active):  # the last moves into the hole: rows stay 0..n-1
                last = self.active.pop()
                self.active.insert(hole, last)
                self._moves.append((last.slot, hole, last))
                last.slot = hole

    # ------------------------------------------------------------ one step

    def busy(self) -> bool:
        return bool(self.preparing or self.waiting or self.active)

    def holds_rows(self) -> bool:
        return bool(self.active)

    def room(self) -> int:
        """How many more sequences may be taken in before every row is spoken for."""
        return self.slots - len(self.active) - len(self.waiting) - len(self.preparing)

    def _admit(self) -> None:
        """Admit waiting sequences (oldest first) while the arrays every admitted one may grow to fit the budget."""
        while self.waiting and len(self.active) < self.slots:
            seq = self.waiting[0]
            rows = self.rows_for(len(self.active) + 1)
            length = self.length_for(max(s.need for s in [*self.active, seq]))
            if rows * length > self.kv_tokens:
                return
            if max(self.alloc_rows, rows) * max(self.alloc_length, length) > self.kv_tokens:
                # Long sequences that left made the arrays large: shrink them to what is held now first.
                self.alloc_rows = self.rows_for(len(self.active))
                self.alloc_length = self.length_for(max((s.cached + 1 for s in self.active), default=0))
            self.waiting.pop(0)
            seq.move(StageState.ACTIVE)
            seq.slot = len(self.active)
            self._admitted += 1
            seq.order = self._admitted
            self.active.append(seq)

    def schedule(self, cap: int | None = None, groups: bool = False) -> StagePlan | None:
        """The next step, or None when nothing can run. `cap` bounds the decode batch (None: every ready row).
        `groups` (the first stage): at most 1/stages of the decoding sequences a step, so they fall into as many
        groups as their pipeline has stages and every stage has work (with one group the stages take turns)."""
        self._admit()
        prompts = [s for s in self.active if not s.prompted and s.ready()]
        ready = [s for s in self.active if s.prompted and s.ready()]
        if not prompts and not ready:
            return None
        if groups and cap is None:
            decoding = [s for s in self.active if s.prompted]
            cap = -(-len(decoding) // max(s.stages for s in decoding)) if decoding else None
        limit = len(ready) if cap is None else max(1, min(cap, len(ready)))
        swaps, start, batch = self._batch(ready, limit)
        prefill, chunk = None, 0
        if prompts:
            prefill = min(prompts, key=lambda s: s.order)
            room = max(1, self.step_tokens - len(batch))
            chunk = min(prefill.inputs[0].left, self.prefill_chunk, room)
        # Grow the arrays as the sequences grow; admission made sure they fit however far they may go.
        length = max((s.cached + 1 for s in batch), default=0)
        if prefill is not None:
            length = max(length, prefill.cached + chunk)
        self.alloc_rows = max(self.alloc_rows, self.rows_for(len(self.active)))
        self.alloc_length = max(self.alloc_length, self.length_for(length))
        moves = [(src, dst, seq.cached) for src, dst, seq in self._moves if not seq.ended]
        self._moves = []
        return StagePlan(moves, swaps, self.alloc_rows, self.alloc_length, prefill, chunk, start, batch)

    def _batch(self, ready: list[StageSeq], limit: int) -> tuple[list[tuple[int, int, int]], int, list[StageSeq]]:
        """The decode batch: the `limit` ready sequences waiting longest, in the window of `limit` rows holding the
        most of them; those outside it swap rows with ones inside it. Returns (swaps, first row, the batch)."""
        if not ready:
            return [], 0, []
        chosen = sorted(ready, key=lambda s: s.inputs[0].arrived)[:limit]
        rows = {s.slot for s in chosen}
        best, best_start = -1, 0
        for start in range(0, len(self.active) - limit + 1):
            inside = sum(1 for r in range(start, start + limit) if r in rows)
            if inside > best:
                best, best_start = inside, start
        window = range(best_start, best_start + limit)
        outside = sorted((s for s in chosen if s.slot not in window), key=lambda s: abs(s.slot - best_start))
        free = [r for r in window if r not in rows]
        swaps = []
        for seq, row in zip(outside, free, strict=True):
            other = self.active[row]
            swaps.append((seq.slot, row, max(seq.cached, other.cached)))
            self.active[seq.slot], self.active[row] = other, seq
            other.slot, seq.slot = seq.slot, row
        return swaps, best_start, [self.active[r] for r in window]

    def ran_prefill(self, seq: StageSeq, tokens: int) -> bool:
        """`tokens` positions of its head input ran; True when that completed its prompt."""
        head = seq.inputs[0]
        head.taken += tokens
        seq.cached += tokens
        if head.left:
            return False
        seq.inputs.popleft()
        if head.last:
            seq.prompted = True
            return True
        return False

    def ran_decode(self, seq: StageSeq) -> None:
        head = seq.inputs[0]
        head.taken += 1
        seq.cached += 1
        if not head.left:
            seq.inputs.popleft()

    def idle(self) -> bool:
        """No row is held: the runner may give the arrays back (the shape starts from zero)."""
        if self.active:
            return False
        self.alloc_rows = self.alloc_length = 0
        self._moves.clear()
        return True

    def __iter__(self) -> Iterator[StageSeq]:
        yield from list(self.preparing)
        yield from list(self.waiting)
        yield from list(self.active)
