"""Cache-aware routing as a specification: chains of chat messages, the gossiped summaries of what each node's
prefix cache holds, and the policy that sends a conversation where its earlier turns are, within a load bound."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh import (
    SUMMARY_BYTES,
    CacheAwarePolicy,
    RoutingPolicy,
    bound_summaries,
    chat_chain,
    next_link,
    pack_summary,
    request_chain,
    summary_news,
    unpack_summary,
)
from nodes.models.backends.cache_summary import ConversationIndex
from nodes.models.backends.prefix_cache import BLOCK_TOKENS, PrefixIndex
from protocol import PREFIX_REPORT_BYTES as REPORT_BYTES
from protocol import DecodeError, LoadReport, PeerAddr, Request, Task, decode, encode

MODEL = "smollm2"
SYSTEM = {"role": "system", "content": "You are the office assistant."}
NOW = 1000.0


def turn(conversation: int, n: int) -> list[dict[str, str]]:
    """Turn `n` (1-based) of a conversation: the system prompt, n questions and the n - 1 answers between them."""
    messages = [SYSTEM]
    for i in range(1, n + 1):
        messages.append({"role": "user", "content": f"conversation {conversation}, question {i}"})
        if i < n:
            messages.append({"role": "assistant", "content": f"answer {i} of {conversation}"})
    return messages


def chat(messages: list[dict[str, str]], **params: object) -> Request:
    return Request(f"r{random.random()}", MODEL, Task.CHAT, messages, dict(params))


def holds(*messages_lists: list[dict[str, str]]) -> bytes:
    """A node's summary holding these prompts (each with all its prefixes' last link)."""
    return pack_summary(chat_chain(m)[-1] for m in messages_lists)


class Loads:
    """Exact loads of this node ("a") and what peers gossip, as the policy sees them."""

    def __init__(self, capacity: int = 16) -> None:
        self.local = 0
        self.capacity = capacity

    def __call__(self, model: str) -> tuple[int, int]:
        return self.local, self.capacity


def policy(seed: int = 0, local_summary: bytes = b"", loads: Loads | None = None) -> CacheAwarePolicy:
    loads = loads or Loads()
    p = CacheAwarePolicy("a", loads, rng=random.Random(seed), local_prefixes=lambda model: local_summary)
    for node in ("b", "c"):
        p.observe_gossip(node, MODEL, 0, 16, NOW)
    return p


# ---------------------------------------------------------------- chains


def test_turn_n_of_a_conversation_starts_with_turn_n_minus_one_and_its_answer() -> None:
    before, after = chat_chain(turn(7, 2)), chat_chain(turn(7, 3))
    assert after[: len(before)] == before
    answer = {"role": "assistant", "content": "answer 2 of 7"}
    assert after[len(before)] == next_link(before[-1], answer)  # what the serving node can compute on its own
    assert chat_chain(turn(8, 3))[0] == after[0] and chat_chain(turn(8, 3))[1] != after[1]  # a shared system prompt


def test_what_the_template_renders_changes_the_chain_and_nothing_else_does() -> None:
    messages = turn(1, 1)
    assert chat_chain(messages) != chat_chain(messages, tools=[{"type": "function", "function": {"name": "f"}}])
    reordered = [{"content": m["content"], "role": m["role"]} for m in messages]
    assert chat_chain(reordered) == chat_chain(messages)
    assert request_chain("complete", "a prompt", {}) == [] and request_chain("chat", [], {}) == []


# ---------------------------------------------------------------- the policy


def test_a_conversation_goes_to_the_node_that_holds_its_earlier_turns() -> None:
    p = policy()
    p.observe_prefixes("c", MODEL, holds(turn(1, 3)[:-1]))  # c served turn 2: its prompt and its answer
    p.observe_prefixes("b", MODEL, holds([SYSTEM]))
    choice = p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(1, 3)))
    assert choice.node == "c" and choice.reason == "prefix:c(5 msgs)"


def test_a_prompt_no_node_holds_goes_by_power_of_two_choices_as_without_summaries() -> None:
    cache_aware, plain = policy(seed=3), RoutingPolicy("a", Loads(), rng=random.Random(3))
    for node in ("b", "c"):
        plain.observe_gossip(node, MODEL, 0, 16, NOW)
    cache_aware.observe_prefixes("b", MODEL, holds(turn(9, 1)))
    for i in range(50):
        request = chat(turn(100 + i, 1), tools=[{"type": "function", "function": {"name": "f"}}])
        assert cache_aware.choose(MODEL, ["a", "b", "c"], NOW, request) == plain.choose(MODEL, ["a", "b", "c"], NOW)


def test_a_system_prompt_is_no_reason_to_pile_new_conversations_onto_the_node_that_holds_it() -> None:
    p = policy()
    p.observe_prefixes("b", MODEL, holds([SYSTEM]))  # only b has served a conversation yet
    served: Counter[str] = Counter()
    for i in range(300):
        choice = p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(i, 1)))
        assert choice.reason.startswith("p2c:"), choice  # placed by load: every node holds it after one request
        served[choice.node] += 1
        if choice.node == "a":
            p._local_load.local += 1  # type: ignore[attr-defined]
        else:
            p.dispatched(choice.node, MODEL)  # nothing finishes: the load grows where they go
    assert max(served.values()) - min(served.values()) <= 4, served


def test_one_hot_conversation_fills_its_node_only_up_to_the_bound_and_the_overflow_says_why() -> None:
    p = policy()
    hot = turn(5, 4)
    p.observe_prefixes("b", MODEL, holds(hot[:-1]))
    reasons = []
    for _ in range(40):
        choice = p.choose(MODEL, ["a", "b", "c"], NOW, chat(hot))
        reasons.append(choice.reason)
        if choice.node == "a":
            p._local_load.local += 1  # type: ignore[attr-defined]
        else:
            p.dispatched(choice.node, MODEL)
    assert reasons[0] == "prefix:b(7 msgs)"
    assert p.estimate("b", MODEL, NOW) <= 40 / 3 + p.balance_abs + 1
    busy = [r for r in reasons if r.endswith("(prefix:b busy)")]
    assert busy and all(r.startswith("p2c:") for r in busy)
    assert p.counts["routed_prefix_busy"] == len(busy)


def test_the_holder_wins_while_its_load_is_within_the_bound_of_the_least_loaded() -> None:
    p = policy()
    p.observe_prefixes("c", MODEL, holds(turn(2, 3)[:-1]))
    p.observe_gossip("c", MODEL, 3, 16, NOW)  # 3 more than the others: inside the bound (4)
    assert p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(2, 3))).node == "c"
    p.observe_gossip("c", MODEL, 8, 16, NOW)  # 8 more, and more than 1.5x the per-slot load: out of balance
    choice = p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(2, 3)))
    assert choice.node != "c" and choice.reason.endswith("(prefix:c busy)")


def test_this_nodes_own_cache_counts_like_a_peers_and_a_forgotten_peer_holds_nothing() -> None:
    p = policy(local_summary=holds(turn(3, 2)[:-1]))
    assert p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(3, 2))).reason == "prefix:a(3 msgs)"
    p.observe_prefixes("b", MODEL, holds(turn(4, 2)[:-1]))
    p.forget("b")
    assert not p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(4, 2))).reason.startswith("prefix:")
    p.observe_prefixes("c", MODEL, holds(turn(4, 2)[:-1]))
    p.observe_prefixes("c", MODEL, b"")  # its cache was emptied (or it restarted)
    assert not p.choose(MODEL, ["a", "b", "c"], NOW, chat(turn(4, 2))).reason.startswith("prefix:")


# ---------------------------------------------------------------- bounded summaries


def test_the_summary_stays_within_its_bound_with_ten_thousand_cached_conversations() -> None:
    cache = PrefixIndex(capacity=200_000)
    index = ConversationIndex()
    for conversation in range(10_000):
        tokens = [conversation * 1000 + t for t in range(3 * BLOCK_TOKENS)]
        chain, _ = cache.insert(tokens)
        links = chat_chain(turn(conversation, 2))
        index.record(chain, [(links[0], BLOCK_TOKENS), (links[-1], 3 * BLOCK_TOKENS)])
    summary = index.summary(cache.alive)
    assert 0 < len(summary) <= SUMMARY_BYTES
    assert chat_chain(turn(9_999, 2))[-1] in unpack_summary(summary)  # the most recent are the ones said
    report = LoadReport("n1", 1, 1, PeerAddr("n1", "10.0.0.1", 7000, 7001),
                        prefixes=bound_summaries({f"chat{i}": summary for i in range(8)}))  # fmt: skip
    assert sum(len(b) for b in report.prefixes.values()) <= REPORT_BYTES
    assert len(encode(report)) <= REPORT_BYTES + 512
    assert decode(encode(report)).prefixes == report.prefixes  # type: ignore[union-attr]


def test_a_summary_forgets_conversations_whose_blocks_were_evicted() -> None:
    cache = PrefixIndex(capacity=6)
    index = ConversationIndex()
    for conversation in range(3):
        chain, _ = cache.insert([conversation * 100 + t for t in range(3 * BLOCK_TOKENS)])
        index.record(chain, [(chat_chain(turn(conversation, 1))[-1], 3 * BLOCK_TOKENS)])
    held = unpack_summary(index.summary(cache.alive))
    assert held == {chat_chain(turn(c, 1))[-1] for c in (1, 2)}  # the first one's blocks made room for the third


def test_a_report_with_summaries_past_the_bound_or_of_the_wrong_shape_is_refused() -> None:
    addr = PeerAddr("n1", "10.0.0.1", 7000, 7001)
    with pytest.raises(DecodeError, match="at most 4096"):
        decode(encode(LoadReport("n1", 1, 1, addr, prefixes={"a": b"x" * 4096, "b": b"y" * 8})))
    with pytest.raises(DecodeError, match="8 per digest"):
        decode(encode(LoadReport("n1", 1, 1, addr, prefixes={"a": b"x" * 7})))
    old = encode(LoadReport("n1", 1, 1, addr))  # what an older peer sends decodes with no summaries
    assert decode(old).prefixes == {}  # type: ignore[union-attr]


def test_reports_carry_a_summary_when_it_changed_and_every_so_often_and_say_when_a_model_is_gone() -> None:
    held = holds(turn(1, 2))
    assert summary_news({MODEL: held}, {}, everything=False) == {MODEL: held}  # new
    assert summary_news({MODEL: held}, {MODEL: held}, everything=False) == {}  # no news
    assert summary_news({MODEL: held}, {MODEL: held}, everything=True) == {MODEL: held}  # the periodic full report
    assert summary_news({}, {MODEL: held}, everything=False) == {MODEL: b""}  # no longer served: nothing held
    big = {f"chat{i}": held * 256 for i in range(5)}  # 2048 bytes each, 10 KiB in all
    assert sum(len(b) for b in summary_news(big, {}, everything=True).values()) <= REPORT_BYTES
