"""The chat engine's prefix cache, as accounting: which blocks of tokens outlive the requests that read them, where
each lives in the runner's pool, and which goes first when the pool is full. Pure: no numpy, no clock. The runner
(`onnx_runner.OnnxRunner.save_blocks/load_blocks`) holds the blocks' keys and values; the scheduler
(`chat_scheduler`) asks this index what a new request may reuse and what a request leaves behind.

Rules:
- A block is BLOCK_TOKENS tokens, keyed by its parent's key and its own tokens (a hash chain), so a block stands for
  the whole prefix up to its end, and two prompts share exactly the blocks of their common prefix. Keys are exact
  (a block's id and its token tuple): no hash collision can ever hand a request someone else's cache.
- Only full blocks are kept, and a request reuses at most its prompt less one token (the last prompt token is read
  again: its logits choose the first new token).
- The pool holds `capacity` blocks. When it is full, the least recently used block goes, never one that is pinned
  (a request's prefix between its match and the copy into its slot) and never one whose children are still held
  (a parent is touched whenever a child is, so the oldest block is a leaf).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BLOCK_TOKENS = 16
_uids = itertools.count(1)  # block identities, never reused (pool slots are): a chain key names its parent by uid


@dataclass(eq=False, slots=True)
class CachedBlock:
    """One block of tokens whose keys and values sit in slot `slot` of the runner's pool."""

    uid: int
    slot: int
    key: tuple[int, tuple[int, ...]]  # (parent's uid or 0, its tokens)
    parent: CachedBlock | None
    children: int = 0
    pins: int = 0


@dataclass
class CacheCounts:
    """What the cache did, for /metrics (monotonic counters, except `blocks`)."""

    lookups: int = 0  # requests that asked
    hits: int = 0  # of those, requests that reused at least one block
    prompt_tokens: int = 0  # prompt tokens of the requests that asked
    reused_tokens: int = 0  # of those, tokens not read again
    saved_blocks: int = 0
    evictions: int = 0
    blocks: int = 0  # held now


@dataclass
class Saved:
    """Blocks a request leaves behind: copy tokens [start, start + len(slots) * BLOCK_TOKENS) of its row there."""

    start: int
    slots: list[int] = field(default_factory=list)


class PrefixIndex:
    """The blocks held in a pool of `capacity` blocks (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prefix cache needs room for at least one block, got {capacity}")
        self.capacity = capacity
        self.counts = CacheCounts()
        self._blocks: dict[tuple[int, tuple[int, ...]], CachedBlock] = {}
        self._lru: OrderedDict[int, CachedBlock] = OrderedDict()  # uid -> block, least recently used first
        self._free = list(range(capacity - 1, -1, -1))  # pool slots, popped from the end

    def __len__(self) -> int:
        return len(self._blocks)

    def alive(self, uid: int) -> bool:
        """Whether the block `uid` is still held."""
        return uid in self._lru

    def match(self, tokens: Sequence[int], limit: int) -> list[CachedBlock]:
        """The longest chain of held blocks that `tokens[:limit]` starts with (no side effects)."""
        chain: list[CachedBlock] = []
        parent = 0
        for start in range(0, limit - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            block = self._blocks.get((parent, tuple(tokens[start : start + BLOCK_TOKENS])))
            if block is None:
                break
            chain.append(block)
            parent = block.uid
        return chain

    def lookup(self, prompt: Sequence[int]) -> list[CachedBlock]:
        """What a new request with this prompt reuses (all but its last token at most), counted and touched."""
        chain = self.match(prompt, len(prompt) - 1)
        c = self.counts
        c.lookups += 1
        c.prompt_tokens += len(prompt)
        if chain:
            c.hits += 1
            c.reused_tokens += len(chain) * BLOCK_TOKENS
            self._touch(chain)
        return chain

    def pin(self, chain: Sequence[CachedBlock]) -> None:
        for block in chain:
            block.pins += 1

    def unpin(self, chain: Sequence[CachedBlock]) -> None:
        for block in chain:
            if block.pins <= 0:
                raise RuntimeError(f"block {block.uid} unpinned more often than pinned")
            block.pins -= 1

    def pinned(self) -> int:
        """Blocks pinned now (0 between steps: a pin lasts from a match to its copy)."""
        return sum(1 for block in self._lru.values() if block.pins)

    def insert(self, tokens: Sequence[int]) -> tuple[list[CachedBlock], Saved]:
        """Keep the full blocks of `tokens` (what a request's row holds): the chain that now stands for them, and the
        new blocks to copy out of the row. Stops early when the pool is full of blocks it may not evict."""
        chain: list[CachedBlock] = []
        saved = Saved(0)
        parent: CachedBlock | None = None
        for start in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
            key = (parent.uid if parent else 0, tuple(tokens[start : start + BLOCK_TOKENS]))
            block = self._blocks.get(key)
            if block is None:
                slot = self._take_slot(chain)
                if slot is None:
                    break
                block = CachedBlock(next(_uids), slot, key, parent)
                if parent is not None:
                    parent.children += 1
                self._blocks[key] = block
                self._lru[block.uid] = block
                if not saved.slots:
                    saved.start = start
                saved.slots.append(slot)
            chain.append(block)
            parent = block
        self._touch(chain)
        self.counts.saved_blocks += len(saved.slots)
        self.counts.blocks = len(self._blocks)
        return chain, saved

    def _take_slot(self, keep: list[CachedBlock]) -> int | None:
        if self._free:
            return self._free.pop()
        self.pin(keep)  # the chain being built must not be evicted from under itself
        try:
            victim = next((b for b in self._lru.values() if not b.pins and not b.children), None)
        finally:
            self.unpin(keep)
        if victim is None:
            return None
        self._evict(victim)
        return self._free.pop()

    def _evict(self, block: CachedBlock) -> None:
        del self._blocks[block.key]
        del self._lru[block.uid]
        if block.parent is not None:
            block.parent.children -= 1
        self._free.append(block.slot)
        self.counts.evictions += 1
        self.counts.blocks = len(self._blocks)

    def _touch(self, chain: Sequence[CachedBlock]) -> None:
        """Most recently used: the leaf first, then its parents, so a parent is always younger than its children."""
        for block in reversed(chain):
            self._lru.move_to_end(block.uid)
