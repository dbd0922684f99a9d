"""Encoding: one message into one frame (a version byte, then a msgpack array `[type, field, ...]`), and re-stamping
a frame that is forwarded or relayed without packing its body again."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack

from ._messages import (
    Admin,
    Cancel,
    Chunk,
    Credentials,
    Data,
    Digest,
    Error,
    Fetch,
    Hello,
    Join,
    Leave,
    LoadReport,
    Message,
    PeerAddr,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    Revocations,
    Stage,
    Suspicion,
)
from ._wire import (
    T_ADMIN,
    T_CANCEL,
    T_CHUNK,
    T_CREDENTIALS,
    T_DATA,
    T_DIGEST,
    T_ERROR,
    T_FETCH,
    T_HELLO,
    T_JOIN,
    T_LEAVE,
    T_LOAD,
    T_PING,
    T_PONG,
    T_REJECT,
    T_REPLY,
    T_REQUEST,
    T_REVOCATIONS,
    T_STAGE,
    T_SUSPICION,
    VERSION,
)


def _addr(a: PeerAddr) -> list[Any]:
    return [a.node, a.host, a.port, a.pub_port, a.key] if a.key else [a.node, a.host, a.port, a.pub_port]


def _enc_request(m: Request) -> list[Any]:
    body = [
        T_REQUEST,
        m.id,
        m.model,
        m.task.value,
        m.input,
        m.params,
        m.deadline_ms,
        m.priority,
        m.hops,
        m.origin,
        m.stream,
        m.require,
        m.prefix,
    ]
    if m.stages or m.prefix_ids:  # a pipeline try: only then, so every other request keeps its 13 fields
        body += [[list(pair) for pair in m.stages], list(m.prefix_ids)]
    return body


def _load(v: Any) -> list[Any]:
    out = [v.inflight, v.queued, v.capacity, v.rate, v.version, list(v.tasks)]
    if v.layers:  # a stage's: sent only then
        out.append(v.layers)
    return out


def _enc_load(m: LoadReport) -> list[Any]:
    return [
        T_LOAD,
        m.node,
        m.incarnation,
        m.seq,
        _addr(m.addr),
        {k: _load(v) for k, v in m.models.items()},
        m.labels,
        [_addr(p) for p in m.peers],
        m.leaving,
        m.fingerprint,
        m.prefixes,
        m.revocations,
        {k: [w.version, w.budget, w.speed] for k, w in m.wants.items()},
        m.on_change,
    ]


def _enc_stage(m: Stage) -> list[Any]:
    return [T_STAGE, m.id, m.model, m.kind, m.first, m.start, list(m.tokens), list(m.shape), m.dtype, m.last,
            m.request, [list(pair) for pair in m.stages], m.need, m.deadline_ms, m.data, m.due]  # fmt: skip


def _enc_digest(m: Digest) -> list[Any]:
    members = [[_addr(e.addr), e.incarnation, e.seq, e.state] for e in m.members]
    return [T_DIGEST, m.node, m.count, m.checksum, members]


_ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    Request: _enc_request,
    Reply: lambda m: [T_REPLY, m.id, m.output, m.node, m.route, m.queue, m.meta],
    Chunk: lambda m: [T_CHUNK, m.id, m.seq, m.data, m.node, m.route],
    Error: lambda m: [T_ERROR, m.id, int(m.code), m.message, m.node, m.queue],
    Reject: lambda m: [T_REJECT, m.id, m.node, m.queue, m.reason],
    LoadReport: _enc_load,
    Hello: lambda m: [T_HELLO, _addr(m.addr), m.incarnation, m.fingerprint],
    Leave: lambda m: [T_LEAVE, m.node, m.incarnation],
    Ping: lambda m: [T_PING, m.id, m.node, m.want_status],
    Pong: lambda m: [T_PONG, m.id, m.node, m.status],
    Cancel: lambda m: [T_CANCEL, m.id, m.reason],
    Admin: lambda m: [T_ADMIN, m.id, m.action, m.args],
    Fetch: lambda m: [T_FETCH, m.id, m.name, m.version, m.path, m.offset, m.length],
    Data: lambda m: [T_DATA, m.id, m.node, m.offset, m.data],
    Suspicion: lambda m: [T_SUSPICION, m.node, m.incarnation, m.seq, m.by, m.dead],
    Digest: _enc_digest,
    Stage: _enc_stage,
    Credentials: lambda m: [T_CREDENTIALS, m.cert, m.revocations, m.reply],
    Join: lambda m: [T_JOIN, m.id, m.token, m.name],
    Revocations: lambda m: [T_REVOCATIONS, m.document],
}

_VERSION_BYTE = bytes([VERSION])


def encode(msg: Message) -> bytes:
    """Serialise one message into one frame."""
    try:
        body = _ENCODERS[type(msg)](msg)
    except KeyError:
        raise TypeError(f"not a lanmesh message: {type(msg).__name__}") from None
    return _VERSION_BYTE + _packer().pack(body)


_local = threading.local()
_ARRAY_HEADERS = [bytes([0x90 | n]) for n in range(16)]
_SPLICE_FROM = 256  # bytes: below this, packing the few fields of a small message again is the cheaper way


def _packer() -> msgpack.Packer:
    """This thread's Packer: packb() builds one per call, which costs ten times the packing of a small message."""
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _splice(
    frame: bytes, head: list[Any], keep: int, tail: list[Any], new_head: list[Any], new_tail: list[Any]
) -> bytes | None:
    """`frame` with its leading and trailing fields replaced, the `keep` fields between them copied as they are.

    `head`/`tail` are the decoded values of the frame's own leading/trailing fields: packed again they must give
    exactly the frame's bytes (they do for this codec's frames; a foreign encoder's longer forms do not), else
    None and the caller encodes from scratch. The kept middle (a prompt, an answer, vectors) is never unpacked or
    packed again: forwarding costs about the same for a long prompt as for a word.
    """
    n = len(head) + keep + len(tail)
    if not 0 < n <= 15 or len(new_head) != len(head) or len(new_tail) != len(tail):
        return None
    pack = _packer().pack
    header = _ARRAY_HEADERS[n]
    old_head = header + pack(head)[1:]  # a list of <16 items packs as 1 header byte + its items
    old_tail = pack(tail)[1:]
    end = len(frame) - len(old_tail)
    if end < 1 + len(old_head) or not frame.startswith(old_head, 1) or not frame.endswith(old_tail):
        return None
    return b"".join((_VERSION_BYTE, header, pack(new_head)[1:], frame[1 + len(old_head) : end], pack(new_tail)[1:]))


def restamp_request(frame: bytes, req: Request, *, id: str, deadline_ms: int, hops: int, origin: str,
                    prefix: str) -> bytes:  # fmt: skip
    """`frame` (which decoded to `req`) as a forwarded try: another id, what is left of the deadline, one more
    hop, the entry as origin, and the text already streamed as prefix. The input and params are not re-encoded."""
    if len(frame) < _SPLICE_FROM or req.stages or req.prefix_ids:
        return encode(replace(req, id=id, deadline_ms=deadline_ms, hops=hops, origin=origin, prefix=prefix))
    head = [T_REQUEST, req.id, req.model, req.task.value]
    tail = [req.deadline_ms, req.priority, req.hops, req.origin, req.stream, req.require, req.prefix]
    new_tail = [deadline_ms, req.priority, hops, origin, req.stream, req.require, prefix]
    out = _splice(frame, head, 2, tail, [T_REQUEST, id, req.model, req.task.value], new_tail)
    if out is not None:
        return out
    return encode(replace(req, id=id, deadline_ms=deadline_ms, hops=hops, origin=origin, prefix=prefix))


def restamp_reply(frame: bytes, reply: Reply, *, id: str, route: str) -> bytes:
    """`frame` (which decoded to `reply`) under the caller's id and with the route the entry chose; the output
    (an answer, vectors) is copied, not re-encoded."""
    if len(frame) < _SPLICE_FROM:
        return encode(Reply(id, reply.output, reply.node, route, reply.queue, reply.meta))
    tail = [reply.node, reply.route, reply.queue, reply.meta]
    out = _splice(frame, [T_REPLY, reply.id], 1, tail, [T_REPLY, id], [reply.node, route, reply.queue, reply.meta])
    if out is not None:
        return out
    return encode(Reply(id, reply.output, reply.node, route, reply.queue, reply.meta))
