"""What a node's prefix cache holds, as every entry can know it without a tokenizer: a hash chain over a chat's
messages, and the bounded summary of chains each node gossips.

A conversation's turn N sends turn N-1's messages, the answer, and a new question, so its chain starts with turn
N-1's chain: `chain[i]` stands for messages 0..i. A node that served turn N-1 holds the keys and values of that
prompt and of its answer; it gossips the digests of the chains it holds (`ChainSummary`), and an entry asks which
node holds the longest prefix of a new request's chain (`mesh._routing.CacheAwarePolicy`). Pure: stdlib + msgpack.

The digest of a message covers its role and content (what a chat template renders), and the first one also the
request's tools, which a template renders into the prompt. Digests are 8 bytes (blake2b): a collision could only
send a request to the wrong node, never give it another's cache (the engine keys its blocks on exact tokens).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack

from protocol import PREFIX_DIGEST_BYTES as DIGEST_BYTES
from protocol import PREFIX_REPORT_BYTES as REPORT_BYTES  # every model's summaries in one report, whatever they hold

SUMMARY_BYTES = 2048  # one model's summary in a report: the 256 most recent chains

__all__ = [
    "DIGEST_BYTES",
    "REPORT_BYTES",
    "SUMMARY_BYTES",
    "bound_summaries",
    "chat_chain",
    "next_link",
    "pack_summary",
    "request_chain",
    "summary_news",
    "unpack_summary",
]


def next_link(parent: bytes, message: Any) -> bytes:
    """The digest of the chain `parent` followed by `message` (a chat message map)."""
    if isinstance(message, dict):
        content = message.get("content")
        body: Any = [message.get("role"), content if isinstance(content, str) else _plain(content)]
    else:
        body = _plain(message)
    packed = msgpack.packb(body, use_bin_type=True)
    return hashlib.blake2b(parent + packed, digest_size=DIGEST_BYTES).digest()


def chat_chain(messages: Sequence[Any], tools: Any = None) -> list[bytes]:
    """`chain[i]`: the digest of messages 0..i (with the tools the prompt renders, if any)."""
    link = b""
    if tools:
        link = hashlib.blake2b(msgpack.packb(_plain(tools), use_bin_type=True), digest_size=DIGEST_BYTES).digest()
    out = []
    for message in messages:
        link = next_link(link, message)
        out.append(link)
    return out


def request_chain(task: str, input: Any, params: dict[str, Any]) -> list[bytes]:
    """A request's chain: a chat's messages; nothing for other tasks (or input that is not a list of messages)."""
    if task != "chat" or not isinstance(input, list) or not input:
        return []
    return chat_chain(input, params.get("tools"))


def pack_summary(digests: Iterable[bytes], limit: int = SUMMARY_BYTES) -> bytes:
    """Digests, most recent first, as one byte string of at most `limit` bytes (the oldest are left out)."""
    out = bytearray()
    for digest in digests:
        if len(digest) != DIGEST_BYTES:
            raise ValueError(f"a chain digest is {DIGEST_BYTES} bytes, got {len(digest)}")
        if len(out) + DIGEST_BYTES > limit:
            break
        out += digest
    return bytes(out)


def unpack_summary(blob: bytes) -> frozenset[bytes]:
    return frozenset(blob[i : i + DIGEST_BYTES] for i in range(0, len(blob) - DIGEST_BYTES + 1, DIGEST_BYTES))


def summary_news(current: dict[str, bytes], sent: dict[str, bytes], everything: bool) -> dict[str, bytes]:
    """What a report says of prefix caches: the summaries that changed since `sent` (all of them when
    `everything`), b"" for a model no longer served, bounded to one report's bytes."""
    news = {m: b for m, b in current.items() if everything or sent.get(m) != b}
    news |= {m: b"" for m in sent if m not in current}
    return bound_summaries(news)


def bound_summaries(summaries: dict[str, bytes], limit: int = REPORT_BYTES) -> dict[str, bytes]:
    """Summaries that fit one report: each cut to an equal share of `limit` when together they pass it (each is
    most recent first, so what is cut is the oldest)."""
    total = sum(len(b) for b in summaries.values())
    if total <= limit:
        return dict(summaries)
    share = limit // max(1, len(summaries)) // DIGEST_BYTES * DIGEST_BYTES
    return {model: blob[:share] for model, blob in summaries.items()}


def _plain(value: Any) -> Any:
    """A msgpack-able, order-stable form of a decoded value (maps sorted by key)."""
    if isinstance(value, dict):
        return [[str(k), _plain(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
