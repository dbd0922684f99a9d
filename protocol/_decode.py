"""Decoding, defensively: the frame size and every msgpack container are bounded before anything is built, then
each field is checked against the message's schema. Any refusal is a `DecodeError`; nothing else escapes
`decode()`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack

from ._decode_stages import _dec_stage, _dec_wants, _stages, _token_ids
from ._errors import DecodeError, ErrorCode
from ._fields import _bool, _fail, _fields, _int, _label, _name, _or, _rid, _str, _strmap, _value, _version
from ._messages import (
    MEMBER_STATES,
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
    Member,
    Message,
    ModelLoad,
    PeerAddr,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    Revocations,
    Suspicion,
    Task,
)
from ._names import is_name
from ._wire import (
    DEFAULT_LIMITS,
    ID_LEN,
    MAX_CHUNK_BYTES,
    MAX_DEADLINE_MS,
    MAX_DOCUMENT_BYTES,
    MAX_HOPS,
    MAX_MODEL_TASKS,
    NAME_LEN,
    PREFIX_DIGEST_BYTES,
    PREFIX_REPORT_BYTES,
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
    Limits,
)

_TASKS = {t.value: t for t in Task}
_ROLES = frozenset({"system", "user", "assistant", "tool"})


def _chat_input(v: Any, rid: str | None) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise _fail("chat input must be a non-empty list of messages", rid)
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _fail(f"message {i} must be a map with role and content", rid)
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise _fail(f"message {i} has role {role!r}; expected one of {sorted(_ROLES)}", rid)
        if not isinstance(content, str):
            raise _fail(f"message {i} content must be a string", rid)
    return v


def _task_input(task: Task, v: Any, lim: Limits, rid: str | None) -> Any:
    if task is Task.CHAT:
        return _chat_input(v, rid)
    if task is Task.COMPLETE:
        return _str(v, "prompt", lim.max_str_len, rid)
    if task is Task.EMBED:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            return v
        raise _fail("embed input must be a string or a non-empty list of strings", rid)
    return _value(v, "input", lim, rid)


_SCALAR_TYPES = (str, int, float, bool, type(None))


def _dec_request(b: list[Any], lim: Limits) -> Request:
    # Fast path for the common shape (every field present, plain types); anything unusual
    # takes the full validation below, which also words the error.
    if len(b) == 13:
        _, rid, model, task, inp, params, dl, prio, hops, origin, stream, require, prefix = b
        t = _TASKS.get(task) if type(task) is str else None
        if (
            t is not None
            and t is not Task.CHAT
            and type(inp) is str
            and type(rid) is str
            and 0 < len(rid) <= ID_LEN
            and is_name(model)
            and type(params) is dict
            and all(type(v) in _SCALAR_TYPES for v in params.values())
            and type(dl) is int
            and 0 < dl <= MAX_DEADLINE_MS
            and type(prio) is int
            and 0 <= prio <= 9
            and type(hops) is int
            and 0 <= hops <= MAX_HOPS
            and type(origin) is str
            and len(origin) <= NAME_LEN
            and origin.isprintable()
            and type(stream) is bool
            and type(require) is dict
            and all(type(v) is str for v in require.values())
            and type(prefix) is str
        ):
            return Request(rid, model, t, inp, params, dl, prio, hops, origin, stream, require, prefix)
    return _dec_request_checked(b, lim)


def _dec_request_checked(b: list[Any], lim: Limits) -> Request:
    rid_raw = b[1] if len(b) > 1 else None
    rid = rid_raw if isinstance(rid_raw, str) and 0 < len(rid_raw) <= ID_LEN else None
    f = _fields(b, 4, 14, "request", rid)
    rid = _str(f[0], "id", ID_LEN, None, empty=False)
    model = _name(f[1], "model", rid)
    task = _TASKS.get(f[2]) if isinstance(f[2], str) else None
    if task is None:
        raise _fail(f"task must be one of {list(_TASKS)}, got {f[2]!r}", rid)
    return Request(
        id=rid,
        model=model,
        task=task,
        input=_task_input(task, f[3], lim, rid),
        params=_strmap(_or(f[4], {}), "params", rid, lim, str_values=False),
        deadline_ms=_int(_or(f[5], 60_000), "deadline_ms", 1, MAX_DEADLINE_MS, rid),
        priority=_int(_or(f[6], 0), "priority", 0, 9, rid),
        hops=_int(_or(f[7], 0), "hops", 0, MAX_HOPS, rid),
        origin=_label(_or(f[8], ""), "origin", rid),
        stream=_bool(_or(f[9], False), "stream", rid),
        require=_strmap(_or(f[10], {}), "require", rid, lim, str_values=True),
        prefix=_str(_or(f[11], ""), "prefix", lim.max_str_len, rid),
        stages=_stages(_or(f[12], []), rid),
        prefix_ids=_token_ids(_or(f[13], []), "prefix_ids", rid),
    )


def _dec_addr(v: Any) -> PeerAddr:
    if not isinstance(v, list) or len(v) < 4:
        raise _fail("peer address must be [node, host, port, pub_port]")
    return PeerAddr(
        node=_name(v[0], "node", None),
        host=_str(v[1], "host", NAME_LEN, None, empty=False),
        port=_int(v[2], "port", 1, 65535, None),
        pub_port=_int(v[3], "pub_port", 1, 65535, None),
        key=_key(v[4]) if len(v) > 4 else "",
    )


def _key(v: Any) -> str:
    """A CURVE public key as Z85 text (40 characters), or "" (none: a mesh of one shared key)."""
    if v == "" or (type(v) is str and len(v) == 40 and v.isascii() and v.isprintable() and " " not in v):
        return v
    raise _fail("key must be 40 characters of Z85 text")


def _dec_models(v: Any) -> dict[str, ModelLoad]:
    if not isinstance(v, dict):
        raise _fail("models must be a map")
    out = {}
    for name, load in v.items():
        if not isinstance(load, list) or len(load) < 3:
            raise _fail("model load must be [inflight, queued, capacity]")
        rate = load[3] if len(load) > 3 else 0.0  # absent from older peers
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1e9:
            raise _fail("model rate must be a number of requests per second >= 0")
        version = _version(load[4], "model version", None, empty=True) if len(load) > 4 else ""
        out[_name(name, "model", None)] = ModelLoad(
            _int(load[0], "inflight", 0, 2**31, None),
            _int(load[1], "queued", 0, 2**31, None),
            _int(load[2], "capacity", 0, 2**31, None),
            float(rate),
            version,
            _dec_tasks(load[5]) if len(load) > 5 else (),
            _int(load[6], "model layers", 0, 2**20, None) if len(load) > 6 else 0,
        )
    return out


def _dec_tasks(v: Any) -> tuple[str, ...]:
    """The tasks a model serves: a short list of short names (kept as strings, so a newer peer's new task passes)."""
    if not isinstance(v, list) or len(v) > MAX_MODEL_TASKS:
        raise _fail(f"model tasks must be a list of at most {MAX_MODEL_TASKS} names")
    return tuple(_str(t, "model task", 32, None, empty=False) for t in v)


def _dec_prefixes(v: Any) -> dict[str, bytes]:
    if not isinstance(v, dict):
        raise _fail("prefixes must be a map")
    out, total = {}, 0
    for name, blob in v.items():
        if not isinstance(blob, bytes) or len(blob) % PREFIX_DIGEST_BYTES:
            raise _fail(f"a prefix summary must be bytes, {PREFIX_DIGEST_BYTES} per digest")
        total += len(blob)
        out[_name(name, "model", None)] = blob
    if total > PREFIX_REPORT_BYTES:
        raise _fail(f"prefix summaries hold {total} bytes; at most {PREFIX_REPORT_BYTES} in one report")
    return out


def _dec_load(b: list[Any], lim: Limits) -> LoadReport:
    f = _fields(b, 4, 13, "load report", None)
    peers = _or(f[6], [])
    if not isinstance(peers, list):
        raise _fail("peers must be a list")
    return LoadReport(
        node=_name(f[0], "node", None),
        incarnation=_int(f[1], "incarnation", 0, 2**63 - 1, None),
        seq=_int(f[2], "seq", 0, 2**63 - 1, None),
        addr=_dec_addr(f[3]),
        models=_dec_models(_or(f[4], {})),
        labels=_strmap(_or(f[5], {}), "labels", None, lim, str_values=True),
        peers=tuple(_dec_addr(p) for p in peers),
        leaving=_bool(_or(f[7], False), "leaving", None),
        fingerprint=_str(_or(f[8], ""), "fingerprint", NAME_LEN, None),
        prefixes=_dec_prefixes(_or(f[9], {})),
        revocations=_int(_or(f[10], 0), "revocations", 0, 2**63 - 1, None),
        wants=_dec_wants(_or(f[11], {})),
        on_change=_bool(_or(f[12], False), "on_change", None),
    )


def _dec_suspicion(b: list[Any], lim: Limits) -> Suspicion:
    f = _fields(b, 4, 5, "suspicion", None)
    return Suspicion(
        node=_name(f[0], "node", None),
        incarnation=_int(f[1], "incarnation", 0, 2**63 - 1, None),
        seq=_int(f[2], "seq", 0, 2**63 - 1, None),
        by=_name(f[3], "by", None),
        dead=_bool(_or(f[4], False), "dead", None),
    )


_STATES = frozenset(MEMBER_STATES)


def _dec_member(v: Any) -> Member:
    if not isinstance(v, list) or len(v) < 4:
        raise _fail("digest member must be [[node, host, port, pub_port, key?], incarnation, seq, state]")
    state = v[3]
    if state not in _STATES:
        raise _fail(f"digest member state must be one of {list(MEMBER_STATES)}, got {state!r}")
    return Member(
        addr=_dec_addr(v[0]),
        incarnation=_int(v[1], "incarnation", 0, 2**63 - 1, None),
        seq=_int(v[2], "seq", 0, 2**63 - 1, None),
        state=state,
    )


def _dec_digest(b: list[Any], lim: Limits) -> Digest:
    f = _fields(b, 3, 4, "digest", None)
    members = _or(f[3], [])
    if not isinstance(members, list):
        raise _fail("digest members must be a list")
    return Digest(
        node=_name(f[0], "node", None),
        count=_int(f[1], "count", 0, 2**31, None),
        checksum=_int(f[2], "checksum", 0, 2**64 - 1, None),
        members=tuple(_dec_member(m) for m in members),
    )


def _flat(v: Any) -> bool:
    """A scalar, or a map/list of scalars: shallow enough to need no depth walk."""
    t = type(v)
    if t in _SCALAR_TYPES:
        return True
    if t is dict:
        return all(type(x) in _SCALAR_TYPES for x in v.values())
    if t is list:
        return all(type(x) in _SCALAR_TYPES for x in v)
    return False


def _dec_reply(b: list[Any], lim: Limits) -> Reply:
    if len(b) == 7:  # fast path, as for requests: plain shapes skip the generic checks
        _, rid, output, node, route, queue, meta = b
        if (
            type(rid) is str
            and 0 < len(rid) <= ID_LEN
            and (is_name(node) or node == "")
            and type(route) is str
            and len(route) <= NAME_LEN
            and type(queue) is int
            and 0 <= queue <= 2**31
            and type(meta) is dict
            and _flat(output)
            and all(_flat(x) for x in meta.values())
        ):
            return Reply(rid, output, node, route, queue, meta)
    f = _fields(b, 3, 6, "reply", None)
    rid = _rid(b)
    return Reply(
        id=rid,
        output=_value(f[1], "output", lim, rid),
        node=_name(f[2], "node", rid, empty=True),
        route=_str(_or(f[3], ""), "route", NAME_LEN, rid),
        queue=_int(_or(f[4], 0), "queue", 0, 2**31, rid),
        meta=_strmap(_or(f[5], {}), "meta", rid, lim, str_values=False),
    )


def _dec_chunk(b: list[Any], lim: Limits) -> Chunk:
    f = _fields(b, 4, 5, "chunk", None)
    rid = _rid(b)
    return Chunk(
        id=rid,
        seq=_int(f[1], "seq", 0, 2**31, rid),
        data=_value(f[2], "data", lim, rid),
        node=_name(f[3], "node", rid, empty=True),
        route=_str(_or(f[4], ""), "route", NAME_LEN, rid),
    )


def _dec_error(b: list[Any], lim: Limits) -> Error:
    f = _fields(b, 3, 5, "error", None)
    rid = _str(f[0], "id", ID_LEN, None)
    try:
        code = ErrorCode(f[1])
    except ValueError:
        raise _fail(f"unknown error code {f[1]!r}", rid) from None
    return Error(
        id=rid,
        code=code,
        message=_str(f[2], "message", 64 * 1024, rid),
        node=_name(_or(f[3], ""), "node", rid, empty=True),
        queue=_int(_or(f[4], 0), "queue", 0, 2**31, rid),
    )


def _dec_reject(b: list[Any], lim: Limits) -> Reject:
    f = _fields(b, 3, 4, "reject", None)
    rid = _rid(b)
    return Reject(
        id=rid,
        node=_name(f[1], "node", rid, empty=True),
        queue=_int(f[2], "queue", 0, 2**31, rid),
        reason=_str(_or(f[3], ""), "reason", 4096, rid),
    )


def _dec_hello(b: list[Any], lim: Limits) -> Hello:
    f = _fields(b, 2, 3, "hello", None)
    return Hello(
        addr=_dec_addr(f[0]),
        incarnation=_int(f[1], "incarnation", 0, 2**63 - 1, None),
        fingerprint=_str(_or(f[2], ""), "fingerprint", NAME_LEN, None),
    )


def _dec_leave(b: list[Any], lim: Limits) -> Leave:
    f = _fields(b, 2, 2, "leave", None)
    return Leave(
        node=_name(f[0], "node", None),
        incarnation=_int(f[1], "incarnation", 0, 2**63 - 1, None),
    )


def _dec_ping(b: list[Any], lim: Limits) -> Ping:
    f = _fields(b, 1, 3, "ping", None)
    return Ping(
        id=_rid(b),
        node=_label(_or(f[1], ""), "node", None),  # a node's, or a client's own id
        want_status=_bool(_or(f[2], False), "want_status", None),
    )


def _dec_pong(b: list[Any], lim: Limits) -> Pong:
    f = _fields(b, 2, 3, "pong", None)
    status = f[2]
    if status is not None and not (isinstance(status, list) and all(isinstance(x, dict) for x in status)):
        raise _fail("pong status must be a list of maps")
    return Pong(
        id=_rid(b),
        node=_name(f[1], "node", None, empty=True),
        status=_value(status, "status", lim, None),
    )


def _dec_cancel(b: list[Any], lim: Limits) -> Cancel:
    f = _fields(b, 1, 2, "cancel", None)
    return Cancel(id=_rid(b), reason=_str(_or(f[1], ""), "reason", 4096, None))


_ACTIONS = frozenset({"models", "load", "unload", "switch", "pull", "invite", "revoke", "members"})


def _dec_admin(b: list[Any], lim: Limits) -> Admin:
    f = _fields(b, 2, 3, "admin", None)
    rid = _rid(b)
    action = _str(f[1], "action", 32, rid, empty=False)
    if action not in _ACTIONS:
        raise _fail(f"admin action must be one of {sorted(_ACTIONS)}, got {action!r}", rid)
    args = _strmap(_or(f[2], {}), "args", rid, lim, str_values=False)
    if "name" in args:  # every action naming a model: it may become a folder name (pull) and a lane name
        _name(args["name"], "model", rid)
    if args.get("version"):
        _version(args["version"], "version", rid, empty=False)
    return Admin(rid, action, args)


def _dec_fetch(b: list[Any], lim: Limits) -> Fetch:
    f = _fields(b, 3, 6, "fetch", None)
    rid = _rid(b)
    return Fetch(
        id=rid,
        name=_name(f[1], "model", rid),
        version=_version(f[2], "version", rid, empty=False),
        path=_str(_or(f[3], ""), "path", 4096, rid),
        offset=_int(_or(f[4], 0), "offset", 0, 2**62, rid),
        length=_int(_or(f[5], 0), "length", 0, MAX_CHUNK_BYTES, rid),
    )


def _dec_data(b: list[Any], lim: Limits) -> Data:
    f = _fields(b, 4, 4, "data", None)
    rid = _rid(b)
    if not isinstance(f[3], bytes):
        raise _fail("data must be bytes", rid)
    return Data(rid, _name(f[1], "node", rid, empty=True), _int(f[2], "offset", 0, 2**62, rid), f[3])


def _bytes(v: Any, what: str, max_len: int, rid: str | None) -> bytes:
    if isinstance(v, bytes) and len(v) <= max_len:
        return v
    raise _fail(f"{what} must be bytes (at most {max_len})", rid)


def _dec_credentials(b: list[Any], lim: Limits) -> Credentials:
    f = _fields(b, 1, 3, "credentials", None)
    return Credentials(
        _bytes(f[0], "certificate", 4096, None),
        _int(_or(f[1], 0), "revocations", 0, 2**63 - 1, None),
        _bool(_or(f[2], False), "reply", None),
    )


def _dec_join(b: list[Any], lim: Limits) -> Join:
    f = _fields(b, 2, 3, "join", None)
    rid = _rid(b)
    name = _or(f[2], "")
    return Join(rid, _bytes(f[1], "token", 64, rid), _name(name, "member name", rid) if name else "")


def _dec_revocations(b: list[Any], lim: Limits) -> Revocations:
    f = _fields(b, 1, 1, "revocations", None)
    return Revocations(_bytes(f[0], "revocation list", MAX_DOCUMENT_BYTES, None))


_DECODERS: dict[int, Callable[[list[Any], Limits], Message]] = {
    T_REQUEST: _dec_request,
    T_REPLY: _dec_reply,
    T_CHUNK: _dec_chunk,
    T_ERROR: _dec_error,
    T_REJECT: _dec_reject,
    T_LOAD: _dec_load,
    T_HELLO: _dec_hello,
    T_LEAVE: _dec_leave,
    T_PING: _dec_ping,
    T_PONG: _dec_pong,
    T_CANCEL: _dec_cancel,
    T_ADMIN: _dec_admin,
    T_FETCH: _dec_fetch,
    T_DATA: _dec_data,
    T_SUSPICION: _dec_suspicion,
    T_DIGEST: _dec_digest,
    T_STAGE: _dec_stage,
    T_CREDENTIALS: _dec_credentials,
    T_JOIN: _dec_join,
    T_REVOCATIONS: _dec_revocations,
}


def decode(frame: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one frame. Raises `DecodeError` and nothing else."""
    if len(frame) > limits.max_frame_bytes:
        raise DecodeError(f"frame of {len(frame)} bytes exceeds the {limits.max_frame_bytes}-byte limit")
    if not frame:
        raise DecodeError("empty frame")
    if frame[0] != VERSION:
        raise DecodeError(f"protocol version {frame[0]} is not supported (this node speaks {VERSION})")
    try:
        body = msgpack.unpackb(
            memoryview(frame)[1:],
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_str_len,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, list) or not body:
        raise DecodeError("frame body must be a non-empty msgpack array")
    tag = body[0]
    decoder = _DECODERS.get(tag) if isinstance(tag, int) and not isinstance(tag, bool) else None
    if decoder is None:
        raise DecodeError(f"unknown message type {tag!r}")
    try:
        return decoder(body, limits)
    except DecodeError:
        raise
    except (TypeError, ValueError, KeyError, RecursionError) as exc:
        raise DecodeError(f"invalid message: {exc}") from None


def error_code_name(code: int) -> str:
    """The readable name of a wire error code (for logs and CLIs)."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code-{code}"
