"""The chat engine's scheduler: which requests run, in which slot of the key/value cache, and what one step does.

Pure: no numpy, no onnxruntime, no clock. The engine (`onnx_chat`) tells it what happened (a request arrived, its
prompt is ready, a step ran, a request ended) and asks it for the next step's plan; the runner (`onnx_runner`)
carries the plan out on the model. Unit-tested with a fake runner (tests/unit/test_chat_scheduler.py), as vLLM v1
separates its scheduler from its model runner.

Rules:
- A request is prepared (prompt tokenized, grammar compiled) off the engine thread: until then it is PREPARING and
  takes no slot, so a 256 KiB grammar never stalls the requests being decoded.
- Running requests sit in slots 0..n-1 (one contiguous slice feeds a decode step); the request whose prompt is
  being read sits in slot n. When a request leaves, the last running one moves into its hole (a KV copy the plan
  names), and the prompt being read follows.
- Each step decodes every running request by one token and reads at most one chunk of one prompt; the chunk is what
  is left of the step's token budget, at most `prefill_chunk`. The answer a failed node had already streamed (a
  taken-over stream's `replay` tokens, at the end of its input) is read one token a step, closer to how it was
  decoded there (usually bit for bit): a chunk computes the same keys and values in another order, they differ in
  the last bits, and a near tie later goes the other way (SmolLM2 int4, counting in words, taken over after 4
  pieces: a different answer). It holds the one prompt slot meanwhile, so the engine caps how long a replay is.
- Memory is reserved, never hoped for: the key/value arrays are `rows x length` token slots (rows a power of two,
  length a multiple of LENGTH_STEP, capped by the slots and the context) and grow as the requests do. A request
  starts only when the arrays that every started request may grow to (their full `need`: prompt, prefix and every
  token they may write) fit `kv_tokens` (shrinking first what long requests that left made large); so a running
  request can always grow, and the arrays never pass the cap. A request whose own need cannot fit is refused when it
  arrives.
- A request that ends (finished, cancelled, expired, failed) leaves between steps and frees its slot at once.
- Prefix cache (`prefix_cache.PrefixIndex`, when the engine has a pool): a request that gets a slot reuses the
  longest chain of cached blocks its prompt starts with (the plan's `load`: copied into its slot before its first
  chunk) and reads only the rest. A request whose prompt is in, and one that finishes or is cancelled, leaves its full
  blocks behind (the plan's `saves`, copied out of its row before anything moves). A failed request leaves nothing.
  The pool is its own share of the key/value budget (`kv_tokens` counts the arrays only), so the cache never takes
  room from a running request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .prefix_cache import BLOCK_TOKENS, CachedBlock, PrefixIndex, Saved

LENGTH_STEP = 256  # the arrays' length (tokens per slot) is a multiple of this


def array_rows(n: int, slots: int) -> int:
    """Rows the key/value arrays have for `n` requests: a power of two (each growth copies the cache), at most
    `slots`. The stage engine's scheduler sizes its arrays the same way."""
    if n <= 0:
        return 0
    rows = 1
    while rows < n:
        rows *= 2
    return min(rows, slots)


def array_length(tokens: int, context: int) -> int:
    """Tokens per row the arrays have for requests of up to `tokens`: the next multiple of LENGTH_STEP (a step
    costs more with a longer cache, and growing copies it), at most the context."""
    if tokens <= 0:
        return 0
    return min(-(-tokens // LENGTH_STEP) * LENGTH_STEP, context)


class SeqState(StrEnum):
    """Where one request is in the engine. Every change goes through `SchedSeq.move`, checked against `_MOVES`."""

    PREPARING = "preparing"  # its prompt is tokenized and its grammar compiled off the engine thread
    WAITING = "waiting"  # ready; waits for a slot and room in the key/value cache
    PREFILLING = "prefilling"  # holds a slot; its prompt is read a chunk per step
    RUNNING = "running"  # decoding, one token per step
    FINISHED = "finished"  # answered: end of text, a stop string, max_tokens or the end of its grammar
    ABORTED = "aborted"  # cancelled or expired: answered by someone else, its slot freed
    FAILED = "failed"  # failed alone (its caller got the error), its slot freed


_ENDED = frozenset({SeqState.FINISHED, SeqState.ABORTED, SeqState.FAILED})
_MOVES: dict[SeqState, frozenset[SeqState]] = {
    SeqState.PREPARING: frozenset({SeqState.WAITING, *_ENDED}),  # FINISHED: nothing left to write
    SeqState.WAITING: frozenset({SeqState.PREFILLING, SeqState.ABORTED, SeqState.FAILED}),
    SeqState.PREFILLING: frozenset({SeqState.RUNNING, *_ENDED}),
    SeqState.RUNNING: _ENDED,
    SeqState.FINISHED: frozenset(),
    SeqState.ABORTED: frozenset(),
    SeqState.FAILED: frozenset(),
}


class IllegalMove(RuntimeError):
    """The engine asked for a transition the state table does not allow: a bug, never a caller's input."""


@dataclass(eq=False)
class SchedSeq:
    """One request as the scheduler sees it. `owner` is the engine's own record of it (opaque here)."""

    owner: Any
    need: int  # tokens it may hold at most: prompt + prefix + the tokens it may still write
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet read (set when prepared)
    state: SeqState = SeqState.PREPARING
    slot: int = -1
    cached: int = 0  # tokens of it in its slot of the cache
    tokens: list[int] = field(default_factory=list)  # those tokens (len == cached): what its blocks are made of
    reused: int = 0  # tokens of its prompt taken from the prefix cache
    chain: list[CachedBlock] = field(default_factory=list)  # the cached blocks that stand for its tokens, root first
    replay: int = 0  # the last this many of its input tokens are an answer already streamed: read one a step

    def move(self, to: SeqState) -> None:
        if to not in _MOVES[self.state]:
            raise IllegalMove(f"{self.state} -> {to}")
        self.state = to

    @property
    def ended(self) -> bool:
        return self.state in _ENDED


@dataclass
class StepPlan:
    """What one step does, in order: blocks saved to the prefix cache, KV copies between slots, the arrays' shape, a
    cached prefix loaded, then one prompt chunk and one decode."""

    moves: list[tuple[int, int, int]]  # (from slot, to slot, tokens): copy before the step
    rows: int  # slots the key/value arrays must have
    length: int  # tokens per slot the arrays must have
    prefill: SchedSeq | None  # read `chunk` of its prompt, in its slot, after its `cached` tokens
    chunk: list[int]
    decode: list[SchedSeq]  # every running request, row i in slot i
    saves: list[tuple[int, Saved]] = field(default_factory=list)  # (row, blocks): copy into the pool, first of all
    load: list[int] = field(default_factory=list)  # pool slots to copy into the prefill's row (tokens 0..) first


class ChatScheduler:
    """Queues, slots and the key/value budget of one chat engine (see the module docstring)."""

    def __init__(
        self,
        slots: int,
        kv_tokens: int,
        context: int,
        prefill_chunk: int = 128,
        step_tokens: int | None = None,
        cache_blocks: int = 0,
    ) -> None:
        if slots < 1 or context < 2 or prefill_chunk < 1:
            raise ValueError(f"bad engine shape: slots {slots}, prefill chunk {prefill_chunk}, context {context}")
        self.slots = slots
        self.context = context
        self.kv_tokens = kv_tokens
        self.prefill_chunk = prefill_chunk
        self.step_tokens = step_tokens or prefill_chunk + slots
        if self.max_need() < 2:
            raise ValueError(f"a key/value cache of {kv_tokens} tokens cannot hold even one short request")
        self.preparing: list[SchedSeq] = []
        self.waiting: list[SchedSeq] = []  # FIFO
        self.prefilling: SchedSeq | None = None
        self.running: list[SchedSeq] = []  # running[i].slot == i
        self.alloc_rows = 0  # the arrays' shape as last planned (the runner holds exactly this)
        self.alloc_length = 0
        self._moves: list[tuple[int, int, SchedSeq]] = []  # slot copies owed, sized when the next step is planned
        self.cache = PrefixIndex(cache_blocks) if cache_blocks > 0 else None
        self._saves: list[tuple[int, Saved]] = []  # blocks owed to the pool, copied before the next step moves a row
        self._pinned: list[CachedBlock] = []  # the prefix the last plan loads; its copy is done by the next plan

    # ------------------------------------------------------------ sizes

    @staticmethod
    def rows_for(n: int, slots: int) -> int:
        return array_rows(n, slots)

    def length_for(self, tokens: int) -> int:
        return array_length(tokens, self.context)

    def footprint(self, rows: int, tokens: int) -> int:
        """Token slots the arrays take when `rows` requests of up to `tokens` tokens may be held."""
        return self.rows_for(rows, self.slots) * self.length_for(tokens)

    def max_need(self) -> int:
        """The most tokens one request may hold: alone, its arrays must fit the budget."""
        rows = self.rows_for(1, self.slots)
        return min(self.context, self.kv_tokens // rows // LENGTH_STEP * LENGTH_STEP)

    # ------------------------------------------------------------ requests in and out

    def add(self, seq: SchedSeq) -> None:
        """A new request (PREPARING); ValueError, for its caller, when it could never fit the cache."""
        limit = self.max_need()
        if seq.need > limit:
            raise ValueError(
                f"the request needs {seq.need} tokens of context; this node's key/value cache holds at most {limit} "
                f"per request (raise --kv-cache, or ask for fewer max_tokens)"
            )
        self.preparing.append(seq)

    def prepared(self, seq: SchedSeq, tokens: list[int], need: int, replay: int = 0) -> None:
        """Its prompt is tokenized (and grammar compiled): it waits for a slot."""
        limit = self.max_need()
        if need > limit:
            self.preparing.remove(seq)
            seq.move(SeqState.FAILED)
            raise ValueError(
                f"the request needs {need} tokens of context; this node's key/value cache holds at most {limit} "
                f"per request (raise --kv-cache, or ask for fewer max_tokens)"
            )
        self.preparing.remove(seq)
        seq.pending, seq.need, seq.replay = list(tokens), need, min(replay, len(tokens))
        seq.move(SeqState.WAITING)
        self.waiting.append(seq)

    def end(self, seq: SchedSeq, state: SeqState) -> None:
        """`seq` is over (FINISHED, ABORTED or FAILED): forget it and free its slot before the next step."""
        if state not in _ENDED:
            raise IllegalMove(f"end in {state}")
        if seq.ended:
            return
        was = seq.state
        seq.move(state)
        if state is not SeqState.FAILED and was in (SeqState.PREFILLING, SeqState.RUNNING):
            self._keep(seq)  # before its slot is given to another: the copy is made from it
        if was is SeqState.PREPARING:
            self.preparing.remove(seq)
        elif was is SeqState.WAITING:
            self.waiting.remove(seq)
        elif was is SeqState.PREFILLING:
            self.prefilling = None
            seq.slot = -1
        elif was is SeqState.RUNNING:
            self._leave(seq)

    def _leave(self, seq: SchedSeq) -> None:
        """A running request's slot frees: the last running request moves into its hole, the prompt being read
        after it."""
        hole = seq.slot
        self.running.remove(seq)  # keeps slot order
        seq.slot = -1
        if hole < len(self.running):
            last = self.running.pop()
            self.running.insert(hole, last)
            self._moves.append((last.slot, hole, last))
            last.slot = hole
        head = self.prefilling
        if head is not None and head.slot > len(self.running):
            self._moves.append((head.slot, len(self.running), head))
            head.slot = len(self.running)

    # ------------------------------------------------------------ one step

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting)

    def busy(self) -> bool:
        """Anything held at all (preparing included)."""
        return bool(self.preparing) or self.has_work()

    def room(self) -> int:
        """How many more requests may be taken in (prepared or not) before every slot is spoken for."""
        return self.slots - len(self.running) - len(self.waiting) - len(self.preparing) - (self.prefilling is not None)

    def _admit(self, extra: SchedSeq) -> bool:
        """Whether `extra` may start: the arrays every held request may grow to, with it, fit the budget. When they
        fit only once the arrays shrink to what is held now (long requests left them large), they shrink."""
        held = [*self.running, *([self.prefilling] if self.prefilling else [])]
        rows = self.rows_for(len(held) + 1, self.slots)
        length = self.length_for(max(s.need for s in [*held, extra]))
        if rows * length > self.kv_tokens:
            return False
        if max(self.alloc_rows, rows) * max(self.alloc_length, length) > self.kv_tokens:
            self.alloc_rows = self.rows_for(len(held), self.slots)
            self.alloc_length = self.length_for(max((s.cached + 1 for s in held), default=0))
        return True

    def schedule(self) -> StepPlan | None:
        """The next step, or None when nothing can run (all waiting for room, or nothing held) and no block is owed
        to the prefix cache."""
        if self._pinned and self.cache is not None:
            self.cache.unpin(self._pinned)  # the plan that loaded them has run
        self._pinned = []
        load: list[int] = []
        if self.prefilling is None and self.waiting and len(self.running) < self.slots and self._admit(self.waiting[0]):
            seq = self.waiting.pop(0)
            seq.move(SeqState.PREFILLING)
            seq.slot = len(self.running)
            self.prefilling = seq
            load = self._reuse(seq)
        saves, self._saves = self._saves, []
        if not self.running and self.prefilling is None:
            self._moves.clear()
            if saves:  # what the last requests left must reach the pool before the arrays may be given back
                return StepPlan([], self.alloc_rows, self.alloc_length, None, [], [], saves)
            return None
        chunk: list[int] = []
        length = max((s.cached + 1 for s in self.running), default=0)
        rows = len(self.running)
        if self.prefilling is not None:
            room = max(1, self.step_tokens - len(self.running))
            head = len(self.prefilling.pending) - self.prefilling.replay  # tokens before the replayed answer
            chunk = self.prefilling.pending[: min(self.prefill_chunk, room, head) if head > 0 else 1]
            length = max(length, self.prefilling.cached + len(chunk))
            rows += 1
        # Grow the arrays as the requests grow; admission made sure they fit however far the held requests go.
        self.alloc_rows = max(self.alloc_rows, self.rows_for(rows, self.slots))
        self.alloc_length = max(self.alloc_length, self.length_for(length))
        # A request moved after it left a step may have grown since: copy what it holds now.
        moves = [(src, dst, seq.cached) for src, dst, seq in self._moves if not seq.ended]
        self._moves = []
        return StepPlan(
            moves, self.alloc_rows, self.alloc_length, self.prefilling, chunk, list(self.running), saves, load
        )

    def _reuse(self, seq: SchedSeq) -> list[int]:
        """A request that just got its slot takes the longest cached prefix of its prompt: the pool slots to load."""
        if self.cache is None:
            return []
        chain = self.cache.lookup(seq.pending[: len(seq.pending) - seq.replay])  # a replay is read, not reused
        if not chain:
            return []
        n = len(chain) * BLOCK_TOKENS
        seq.tokens, seq.cached, seq.reused, seq.chain = seq.pending[:n], n, n, chain
        del seq.pending[:n]
        self.cache.pin(chain)  # until the copy is made (the next plan unpins)
        self._pinned = chain
        return [block.slot for block in chain]

    def _keep(self, seq: SchedSeq) -> None:
        """Leave `seq`'s full blocks in the prefix cache: those it does not share with one held already are copied
        out of its row at the start of the next step."""
        if self.cache is None or len(seq.tokens) < BLOCK_TOKENS:
            return
        seq.chain, saved = self.cache.insert(seq.tokens)
        if saved.slots:  # saves run before the plan's moves: from where its keys are now, not where it is going
            row = next((src for src, _, moved in self._moves if moved is seq), seq.slot)
            self._saves.append((row, saved))

    def prefilled(self, seq: SchedSeq, tokens: int) -> bool:
        """`tokens` of its prompt were read; True when the whole prompt is in (its first token is due)."""
        seq.cached += tokens
        seq.tokens += seq.pending[:tokens]
        del seq.pending[:tokens]
        return not seq.pending

    def start(self, seq: SchedSeq) -> None:
        """Its prompt is read and its first token taken: it decodes from the next step on."""
        seq.move(SeqState.RUNNING)
        self.prefilling = None
        self._keep(seq)  # its prompt is in: a request with the same prefix may use it while this one decodes
        seq.slot = len(self.running)
        self.running.append(seq)

    def decoded(self, seq: SchedSeq, token: int) -> None:
        """A decode step wrote `token` (the one it was fed) into `seq`'s row."""
        seq.cached += 1
        seq.tokens.append(token)

    def idle(self) -> bool:
        """Nothing held in the arrays: the runner may give their memory back (the shape starts from zero)."""
        if self.running or self.prefilling is not None:
            return False
        self.alloc_rows = self.alloc_length = 0
        self._moves.clear()
        return True

    def __iter__(self) -> Iterator[SchedSeq]:
        """Every request held, in any state."""
        yield from list(self.preparing)
        yield from list(self.waiting)
        if self.prefilling is not None:
            yield self.prefilling
        yield from list(self.running)
