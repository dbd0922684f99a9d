"""What a chat engine's prefix cache holds, said the way entry nodes can use it: chains of chat messages
(`mesh.chat_chain`), each tied to the cached block that ends it, and a bounded summary of those still held.

An entry has no tokenizer, so it cannot ask which token blocks a node holds; it can compute a chat's chain of
message digests. When a request ends, the engine ties three links of its chain to blocks of its row: the first
message (a system prompt many conversations share), the whole prompt, and the prompt with the answer (what the next
turn of the conversation starts with). A link stays in the summary while its block is held.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from mesh import SUMMARY_BYTES, next_link, pack_summary, request_chain
from protocol import Request

from .prefix_cache import BLOCK_TOKENS, CachedBlock, PrefixIndex

MAX_LINKS = 4096  # links remembered; the summary gossips the most recent of those still held


class ConversationIndex:
    """Chain digest -> the uid of the cached block that ends it, most recent last."""

    def __init__(self, max_links: int = MAX_LINKS) -> None:
        self.max_links = max_links
        self._links: OrderedDict[bytes, int] = OrderedDict()
        self._recorded = 0
        self._made_at: tuple[int, int, int] = (-1, -1, -1)  # (recorded, evictions, saved blocks) at the last summary

    def remember(
        self, request: Request, answer: str, chain: Sequence[CachedBlock], first: int, prompt: int, row: int
    ) -> None:
        """A chat finished leaving `chain` in the cache: its first message took `first` tokens, its prompt `prompt`,
        and its row held `row` (prompt and answer) when it ended."""
        links = request_chain(request.task, request.input, request.params)
        if not links:
            return
        with_answer = next_link(links[-1], {"role": "assistant", "content": request.prefix + answer})
        self.record(chain, [(links[0], first), (links[-1], prompt), (with_answer, row)])

    def summary_now(self, cache: PrefixIndex, last: bytes) -> bytes:
        """The summary, made again only when a chat was recorded or the cache saved or evicted blocks since."""
        state = (self._recorded, cache.counts.evictions, cache.counts.saved_blocks)
        if state == self._made_at:
            return last
        self._made_at = state
        return self.summary(cache.alive)

    def __len__(self) -> int:
        return len(self._links)

    def record(self, chain: Sequence[CachedBlock], links: Sequence[tuple[bytes, int]]) -> bool:
        """A request ended holding `chain` (its blocks, root first); `links` are (digest, tokens it covers). A link
        whose tokens fill no block, or more blocks than the chain holds (the pool was full), is left out. True when
        anything was recorded."""
        recorded = False
        for digest, tokens in links:
            i = tokens // BLOCK_TOKENS - 1
            if not 0 <= i < len(chain):
                continue
            self._links[digest] = chain[i].uid
            self._links.move_to_end(digest)
            recorded = True
            self._recorded += 1
        while len(self._links) > self.max_links:
            self._links.popitem(last=False)
        return recorded

    def summary(self, held: Callable[[int], bool], limit: int = SUMMARY_BYTES) -> bytes:
        """The most recent links whose block is still held, packed (`mesh.pack_summary`); forgets the others."""
        out: list[bytes] = []
        gone: list[bytes] = []
        for digest, uid in reversed(self._links.items()):
            if not held(uid):
                gone.append(digest)
            elif (len(out) + 1) * len(digest) <= limit:
                out.append(digest)
            else:
                break
        for digest in gone:
            del self._links[digest]
        return pack_summary(out, limit)

    def clear(self) -> None:
        self._links.clear()
        self._made_at = (-1, -1, -1)


def cache_counters(cache: PrefixIndex, bytes_per_token: int) -> dict[str, int]:
    """A prefix cache's counters as the executor's stats (and /metrics) carry them."""
    c, block = cache.counts, BLOCK_TOKENS * bytes_per_token
    return {
        "prefix_lookups": c.lookups,
        "prefix_hits": c.hits,
        "prefix_prompt_tokens": c.prompt_tokens,
        "prefix_reused_tokens": c.reused_tokens,
        "prefix_evictions": c.evictions,
        "prefix_cache_bytes": c.blocks * block,
        "prefix_cache_capacity_bytes": cache.capacity * block,
    }
