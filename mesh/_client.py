"""The embeddable client: `Client` (caller threads + one I/O thread) and `CallTable`, the failover logic it shares
with `AsyncClient`.

`CallTable` is sans-IO: it is told what happened (a node connected or dropped, a frame arrived, time passed) and
sends frames through the `transmit` callable it was given. Each runtime only moves bytes and events to it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import queue
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, overload

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import (
    Chunk,
    DecodeError,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    Task,
    decode,
    encode,
)

from .errors import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    LanmeshError,
    MeshUnavailable,
    Overloaded,
    ProtocolError,
    error_from_wire,
)

log = logging.getLogger(__name__)

# After a Reject/OVERLOADED the next node is tried after this pause, doubling per refusal (a full mesh needs a
# moment to drain, and an instant retry storm would only refill it).
_DECLINED_BACKOFF_S, _DECLINED_BACKOFF_MAX_S = 0.005, 0.1
# When every reachable node answered UNAVAILABLE (e.g. shutting down), wait longer before asking again.
_UNAVAILABLE_BACKOFF_S, _UNAVAILABLE_BACKOFF_MAX_S = 0.05, 0.5
# A send refused by the socket (no live pipe yet, or the HWM is full) is retried after this pause.
_SEND_RETRY_S = 0.002
# Below this budget a request cannot be stamped (deadline_ms must be >= 1) and has expired.
_MIN_BUDGET_S = 0.001
_HWM = 100_000
_MAX_FRAME = 16 * 1024 * 1024
_RECONNECT_MS = 100
_RECONNECT_MAX_MS = 1000
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_DRAIN_BATCH = 512  # frames read from one socket before the others get a turn
_CLOSE_JOIN_S = 2.0

_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.%A-Za-z]+")


# ----------------------------------------------------------------- addresses


def parse_endpoints(nodes: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise node addresses (`host:port`, `tcp://host:port`, `[v6]:port`, comma-separated) to zmq endpoints."""
    if isinstance(nodes, str):
        items = nodes.split(",")
    elif isinstance(nodes, Sequence) and all(isinstance(n, str) for n in nodes):
        items = list(nodes)
    else:
        raise ValueError(f"nodes must be 'host:port' or a list of them, got {type(nodes).__name__}")
    endpoints: list[str] = []
    for raw in items:
        ep = _endpoint(raw)
        if ep not in endpoints:
            endpoints.append(ep)
    if not endpoints:
        raise ValueError("no node address given; expected 'host:port' (e.g. '192.168.1.20:7700')")
    return tuple(endpoints)


def _endpoint(raw: str) -> str:
    text = raw.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    elif "://" in text:
        raise ValueError(f"node address {raw!r}: only tcp:// addresses are supported")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        ok_host = bool(sep) and _IPV6_RE.fullmatch(host) is not None and ":" in host
        shown = f"[{host}]"
    else:
        host, sep, port = text.rpartition(":")
        ok_host = bool(sep) and _HOST_RE.fullmatch(host) is not None
        shown = host
    if not ok_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"node address {raw!r} is not 'host:port' with a port in 1..65535 (e.g. '10.0.0.5:7700')")
    return f"tcp://{shown}:{int(port)}"


def discover_endpoints(timeout: float, interfaces: list[str] | None) -> tuple[str, ...]:
    """Browse mDNS for `timeout` seconds and return the ROUTER endpoints of the nodes that answered."""
    from . import _discovery  # zeroconf is only needed by callers that discover

    found = _discovery.browse(timeout, interfaces)
    hosts = [f"[{a.addr.host}]:{a.addr.port}" if ":" in a.addr.host else f"{a.addr.host}:{a.addr.port}" for a in found]
    if not hosts:
        raise MeshUnavailable(f"no lanmesh node answered mDNS within {timeout:g}s")
    return parse_endpoints(hosts)


# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """A served request: the model's `output`, which `node` served it and why it went there (`route`).

    `id` is the wire id of the try that was answered (what that node's logs show); `tries` counts the sends the
    client needed (more than one after a failover or a refusal).
    """

    output: Any
    node: str
    route: str
    meta: dict[str, Any]
    id: str
    tries: int = 1

    @property
    def text(self) -> str:
        """The generated text of a chat or completion result."""
        text = text_of(self.output)
        if text is None:
            raise TypeError(f"this result carries no text (its output is a {type(self.output).__name__})")
        return text

    @property
    def usage(self) -> dict[str, Any]:
        """Token counts as the serving node reported them (empty when it did not)."""
        usage = self.meta.get("usage")
        return dict(usage) if isinstance(usage, dict) else {}


def text_of(output: Any) -> str | None:
    """The text in a chat/completion output: a string, or a map with `content`, `text` or `message.content`."""
    if isinstance(output, str):
        return output
    if isinstance(output, dict):
        for key in ("content", "text"):
            if isinstance(output.get(key), str):
                return str(output[key])
        message = output.get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    return None


@dataclass(frozen=True)
class PingReply:
    """A node's answer to a ping: the Pong and the round trip measured at the socket."""

    pong: Pong
    rtt: float


class Sink(Protocol):
    """Where a call's outcome goes: a future, or a stream's queue. Called on the runtime's I/O thread or loop."""

    def chunk(self, data: str, node: str) -> None: ...

    def done(self, value: Any) -> None: ...

    def fail(self, exc: LanmeshError) -> None: ...


# ----------------------------------------------------------------- the failover logic


@dataclass(eq=False, slots=True)
class Call:
    """One logical request and where its current try stands. Built by a client, then owned by the CallTable."""

    key: int
    kind: Literal["request", "ping", "status"]
    timeout: float
    deadline: float
    sink: Sink
    model: str = ""
    task: Task = Task.INFER
    input: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    require: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    # The current try; `node` is None while the call waits (for a node, or out a backoff).
    node: str | None = None
    wire: str = ""
    sent_at: float = 0.0
    tries: int = 0
    seen: set[int] = field(default_factory=set)
    # Text the caller has been given, and how much of it the current try was given as its prefix.
    text: list[str] = field(default_factory=list)
    prefix_parts: int = 0
    declined: dict[str, int] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    unavailable_rounds: int = 0
    not_before: float = 0.0
    wake: float = 0.0
    last_error: LanmeshError | None = None


class CallTable:
    """Every call in flight, which node each is on, and what to do when something happens to a node.

    Not thread-safe: one thread (or one event loop) drives it. `transmit(endpoint, frame)` must not block and
    returns False when the socket cannot take the frame now.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        client_id: str,
        transmit: Callable[[str, bytes], bool],
        try_timeout: float | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.client_id = client_id
        self._transmit = transmit
        self._try_timeout = try_timeout
        self._up: list[str] = []
        self._rr = 0
        self._calls: dict[int, Call] = {}
        self._waiting: dict[int, Call] = {}
        self._by_wire: dict[str, Call] = {}
        self._on_node: dict[str, set[int]] = {ep: set() for ep in self.endpoints}
        self._timers: list[tuple[float, int]] = []
        self._wire_prefix = os.urandom(6).hex()
        self._wire_seq = itertools.count(1)
        self._keys = itertools.count(1)
        self.stale_replies = 0  # answers to tries that were abandoned (failover, cancel, deadline)
        self.protocol_errors = 0  # frames that could not be decoded or matched to any call

    # ------------------------------------------------------------- inputs

    def new_key(self) -> int:
        """A key for a call about to be started (safe from any thread: `next` on a count is atomic)."""
        return next(self._keys)

    @property
    def connected(self) -> tuple[str, ...]:
        return tuple(self._up)

    @property
    def pending(self) -> int:
        return len(self._calls)

    def start(self, call: Call, now: float) -> None:
        self._calls[call.key] = call
        self._dispatch(call, now)

    def cancel(self, key: int) -> None:
        call = self._calls.get(key)
        if call is not None:
            self._finish(call)

    def node_up(self, endpoint: str, now: float) -> None:
        if endpoint in self._up:
            return
        self._up.append(endpoint)
        log.debug("connected to %s", endpoint)
        for call in list(self._waiting.values()):
            if call.not_before <= now:
                self._dispatch(call, now)

    def node_down(self, endpoint: str, now: float) -> None:
        if endpoint not in self._up:
            return
        self._up.remove(endpoint)
        moved = [self._calls[key] for key in self._on_node[endpoint]]
        if moved:
            log.info("lost %s with %d requests in flight; re-sending them", endpoint, len(moved))
        for call in moved:
            self._drop_try(call)
            self._dispatch(call, now)

    def receive(self, endpoint: str, frame: bytes, now: float) -> None:
        try:
            msg = decode(frame)
        except DecodeError as exc:
            call = self._by_wire.get(exc.request_id) if exc.request_id else None
            if call is None:
                self.protocol_errors += 1
                log.warning("dropped an undecodable frame from %s: %s", endpoint, exc)
                return
            self._fail(call, ProtocolError(f"undecodable reply from {endpoint}: {exc}"))
            return
        wire = getattr(msg, "id", None)
        call = self._by_wire.get(wire) if isinstance(wire, str) else None
        if call is None:
            if isinstance(msg, (Reply, Chunk, Error, Reject, Pong)):
                self.stale_replies += 1  # normal after a failover: the abandoned try answered late
            else:
                self.protocol_errors += 1
                log.warning("ignored a %s from %s: a client expects only replies", type(msg).__name__, endpoint)
            return
        if isinstance(msg, Chunk):
            self._on_chunk(call, msg, endpoint)
        elif isinstance(msg, Reply):
            self._on_reply(call, msg)
        elif isinstance(msg, Error):
            self._on_error(call, msg, endpoint, now)
        elif isinstance(msg, Reject):
            reason = msg.reason or "queue full"
            refusal = Overloaded(
                f"cannot queue the request: {reason} (queue {msg.queue})", node=msg.node, queue=msg.queue
            )
            self._declined(call, endpoint, msg.queue, refusal, now)
        elif isinstance(msg, Pong) and call.kind != "request":
            self._finish(call)
            call.sink.done(PingReply(msg, now - call.sent_at))
        else:
            self._fail(call, ProtocolError(f"{endpoint} answered a {call.kind} with a {type(msg).__name__}"))

    def expire(self, now: float) -> None:
        """Act on every timer that is due: deadlines, backoffs, per-try timeouts."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, key = heapq.heappop(timers)
            call = self._calls.get(key)
            if call is None or call.wake != when:
                continue
            if now >= call.deadline - _MIN_BUDGET_S:
                self._expire(call)
            elif call.node is None:
                self._dispatch(call, now)
            elif self._try_timeout is not None and now >= call.sent_at + self._try_timeout:
                log.info("no answer from %s within the %gs try timeout; re-sending", call.node, self._try_timeout)
                avoid = call.node
                self._drop_try(call)
                self._dispatch(call, now, avoid=avoid)

    def next_wake(self) -> float | None:
        """When `expire` next has work (None: nothing timed is pending)."""
        timers = self._timers
        while timers:
            when, key = timers[0]
            call = self._calls.get(key)
            if call is not None and call.wake == when:
                return when
            heapq.heappop(timers)
        return None

    def fail_all(self, exc: LanmeshError) -> None:
        for call in list(self._calls.values()):
            self._fail(call, exc)

    # ------------------------------------------------------------- replies

    def _on_chunk(self, call: Call, chunk: Chunk, endpoint: str) -> None:
        if not call.stream:
            self.protocol_errors += 1
            log.warning("ignored a stream chunk from %s for a request that did not ask to stream", endpoint)
            return
        if chunk.seq in call.seen:
            return  # a duplicate within this try
        if not isinstance(chunk.data, str):
            what = type(chunk.data).__name__
            self._fail(call, ProtocolError(f"stream chunk carries {what}, not text", node=chunk.node))
            return
        call.seen.add(chunk.seq)
        call.text.append(chunk.data)
        call.sink.chunk(chunk.data, chunk.node)

    def _on_reply(self, call: Call, reply: Reply) -> None:
        if call.kind != "request":
            self._fail(call, ProtocolError(f"a ping was answered with a Reply by {reply.node}", node=reply.node))
            return
        output = reply.output
        if call.stream:
            output = self._finish_text(call, reply)
        self._finish(call)
        call.sink.done(Result(output, reply.node, reply.route, reply.meta, reply.id, call.tries))

    def _finish_text(self, call: Call, reply: Reply) -> str:
        """The stream's full text; any tail the node put in its Reply but never chunked is sent on first."""
        given = "".join(call.text)
        this_try = "".join(call.text[call.prefix_parts :])
        out = text_of(reply.output)
        tail = ""
        if out is not None:
            if out.startswith(given):
                tail = out[len(given) :]  # the node reported the full text, prefix included
            elif call.prefix_parts and out.startswith(this_try):
                tail = out[len(this_try) :]  # the node reported only what it generated after the prefix
        if tail:
            call.text.append(tail)
            call.sink.chunk(tail, reply.node)
        return given + tail

    def _on_error(self, call: Call, err: Error, endpoint: str, now: float) -> None:
        exc = error_from_wire(err)
        if err.code is ErrorCode.OVERLOADED:
            self._declined(call, endpoint, err.queue, exc, now)
        elif err.code is ErrorCode.UNAVAILABLE:
            call.unavailable.add(endpoint)
            call.last_error = exc
            self._drop_try(call)
            self._dispatch(call, now)
        else:
            self._fail(call, exc)  # a retry elsewhere cannot fix these

    def _declined(self, call: Call, endpoint: str, queue: int, exc: LanmeshError, now: float) -> None:
        call.declined[endpoint] = queue
        call.last_error = exc
        self._drop_try(call)
        if all(ep in call.declined for ep in self._up):
            self._fail(call, exc)
            return
        pause = min(_DECLINED_BACKOFF_S * 2 ** (len(call.declined) - 1), _DECLINED_BACKOFF_MAX_S)
        self._park(call, now + pause)

    # ------------------------------------------------------------- sending

    def _dispatch(self, call: Call, now: float, *, avoid: str | None = None) -> None:
        self._waiting.pop(call.key, None)
        if now >= call.deadline - _MIN_BUDGET_S:
            self._expire(call)
            return
        if now < call.not_before:
            self._park(call, call.not_before)
            return
        endpoint = self._pick(call, avoid)
        if endpoint is None:
            if self._up and all(ep in call.declined for ep in self._up) and call.last_error is not None:
                self._fail(call, call.last_error)
            elif self._up and call.unavailable:
                # Every reachable node said it cannot serve now; ask them all again after a pause.
                call.unavailable.clear()
                pause = min(_UNAVAILABLE_BACKOFF_S * 2**call.unavailable_rounds, _UNAVAILABLE_BACKOFF_MAX_S)
                call.unavailable_rounds += 1
                self._park(call, now + pause)
            else:
                self._park(call, 0.0)  # no node connected: wait for one, until the deadline
            return
        wire = f"{self._wire_prefix}.{next(self._wire_seq)}"
        call.prefix_parts = len(call.text)
        try:
            frame = encode(self._message(call, wire, now))
        except (TypeError, ValueError, OverflowError) as exc:
            self._fail(call, BadRequest(f"the request cannot be encoded: {exc}"))
            return
        if not self._transmit(endpoint, frame):
            self._park(call, now + _SEND_RETRY_S)
            return
        call.node, call.wire, call.sent_at = endpoint, wire, now
        call.tries += 1
        call.seen.clear()
        self._by_wire[wire] = call
        self._on_node[endpoint].add(call.key)
        wake = call.deadline if self._try_timeout is None else min(call.deadline, now + self._try_timeout)
        self._set_wake(call, wake)

    def _message(self, call: Call, wire: str, now: float) -> Request | Ping:
        if call.kind != "request":
            return Ping(id=wire, node=self.client_id, want_status=call.kind == "status")
        return Request(
            id=wire,
            model=call.model,
            task=call.task,
            input=call.input,
            params=call.params,
            deadline_ms=max(1, int((call.deadline - now) * 1000)),
            priority=call.priority,
            origin=self.client_id,
            stream=call.stream,
            require=call.require,
            prefix="".join(call.text),
        )

    def _pick(self, call: Call, avoid: str | None) -> str | None:
        """Round-robin over connected nodes that have not refused this call (any node routes inside the mesh)."""
        up = self._up
        fallback = None
        for i in range(len(up)):
            ep = up[(self._rr + i) % len(up)]
            if ep in call.declined or ep in call.unavailable:
                continue
            if ep == avoid:
                fallback = ep
                continue
            self._rr = (self._rr + i + 1) % len(up)
            return ep
        return fallback

    # ------------------------------------------------------------- bookkeeping

    def _park(self, call: Call, not_before: float) -> None:
        call.node = None
        call.not_before = not_before
        self._waiting[call.key] = call
        self._set_wake(call, min(call.deadline, not_before) if not_before > 0 else call.deadline)

    def _set_wake(self, call: Call, when: float) -> None:
        call.wake = when
        heapq.heappush(self._timers, (when, call.key))
        if len(self._timers) > 64 + 4 * len(self._calls):
            # Finished calls leave their timers behind; rebuild so the heap stays as small as the live set.
            self._timers = [(c.wake, c.key) for c in self._calls.values()]
            heapq.heapify(self._timers)

    def _drop_try(self, call: Call) -> None:
        if call.node is not None:
            self._on_node[call.node].discard(call.key)
            call.node = None
        self._by_wire.pop(call.wire, None)

    def _finish(self, call: Call) -> None:
        self._drop_try(call)
        self._waiting.pop(call.key, None)
        self._calls.pop(call.key, None)

    def _fail(self, call: Call, exc: LanmeshError) -> None:
        self._finish(call)
        call.sink.fail(exc)

    def _expire(self, call: Call) -> None:
        node = call.node
        if node is not None:
            exc: LanmeshError = DeadlineExceeded(f"no answer within {call.timeout:g}s", node=node)
        elif isinstance(call.last_error, MeshUnavailable):
            exc = MeshUnavailable(f"no node could serve the request within {call.timeout:g}s: {call.last_error}")
        elif not self._up:
            where = ", ".join(self.endpoints)
            exc = MeshUnavailable(f"no lanmesh node reachable at {where} within {call.timeout:g}s")
        else:
            exc = DeadlineExceeded(f"the request was not served within {call.timeout:g}s")
        self._fail(call, exc)


# ----------------------------------------------------------------- sockets (shared with the asyncio client)


class ClientSecurity(Protocol):
    """What `security=` takes: something that configures a client DEALER before it connects (e.g. CURVE keys)."""

    def configure_client(self, sock: zmq.Socket[Any]) -> None: ...


def configure_dealer(
    sock: zmq.Socket[Any], endpoint: str, *, heartbeat: float, dead_after: float, security: ClientSecurity | None
) -> None:
    """Options for a DEALER to one node: fast failure detection and no queueing towards a dead peer."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # no pipe until the handshake completes: a send to a dead node fails at once
    sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(dead_after * 1000)))
    # The node may keep our connection through pauses of ours longer than we tolerate of it: a client that
    # stalls (GC, suspend) loses nothing by being dropped, but needs no hurry either.
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(dead_after * 3000)))
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    if security is not None:
        security.configure_client(sock)


def check_client_options(timeout: float, heartbeat: float, dead_after: float, try_timeout: float | None) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not 0 < heartbeat < dead_after:
        raise ValueError(f"need 0 < heartbeat < dead_after, got heartbeat={heartbeat}, dead_after={dead_after}")
    if try_timeout is not None and not try_timeout > 0:
        raise ValueError(f"try_timeout must be positive or None, got {try_timeout}")


def request_call(
    key: int,
    sink: Sink,
    model: str,
    task: str | Task,
    input: Any,
    *,
    params: dict[str, Any] | None,
    timeout: float,
    priority: int,
    require: dict[str, str] | None,
    stream: bool,
    now: float,
) -> Call:
    """A request Call, with the checks a caller should hear about at once rather than from a node."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer 0..9, got {priority!r}")
    return Call(
        key=key,
        kind="request",
        timeout=timeout,
        deadline=now + timeout,
        sink=sink,
        model=model,
        task=Task(task),
        input=input,
        params=dict(params or {}),
        priority=priority,
        require=dict(require or {}),
        stream=stream,
    )


def generation_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    """The sampling parameters a caller set (unset ones are left to the node's defaults)."""
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return params


def embeddings_of(result: Result) -> list[list[float]]:
    """The vectors in an embed result (a list of vectors, or a map holding them under `embeddings`)."""
    out = result.output
    if isinstance(out, dict):
        out = out.get("embeddings")
    if isinstance(out, list) and all(isinstance(v, list) for v in out):
        return out
    raise ProtocolError(f"an embed result must hold a list of vectors, got {type(out).__name__}", node=result.node)


# ----------------------------------------------------------------- the threaded client


class _FutureSink:
    __slots__ = ("future",)

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a future sink never streams")

    def done(self, value: Any) -> None:
        try:
            self.future.set_result(value)
        except InvalidStateError:
            pass  # the caller cancelled the future meanwhile; nobody is waiting for the value

    def fail(self, exc: LanmeshError) -> None:
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            pass  # as above: cancelled by the caller


class _Waiter:
    """A one-shot slot one caller thread blocks on; a bare lock is CPython's cheapest cross-thread signal."""

    __slots__ = ("_lock", "value", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.value: Any = None
        self.error: LanmeshError | None = None

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a waiter never streams")

    def done(self, value: Any) -> None:
        self.value = value
        self._lock.release()

    def fail(self, exc: LanmeshError) -> None:
        self.error = exc
        self._lock.release()

    def wait(self) -> Any:
        self._lock.acquire()
        if self.error is not None:
            raise self.error
        return self.value


class _End:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _QueueSink:
    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, str] | _End | LanmeshError] = queue.SimpleQueue()

    def chunk(self, data: str, node: str) -> None:
        self.events.put((data, node))

    def done(self, value: Any) -> None:
        self.events.put(_End(value))

    def fail(self, exc: LanmeshError) -> None:
        self.events.put(exc)


class Stream(Iterator[str]):
    """A streamed answer: iterate for text deltas, in order, across node failovers.

    `node` names the node that sent the latest delta; `result` is set once the stream has ended.
    Breaking out early? Call `close()` (or use `with`) so the request stops counting as in flight.
    """

    def __init__(self, sink: _QueueSink, cancel: Callable[[], None]) -> None:
        self._sink = sink
        self._cancel: Callable[[], None] | None = cancel
        self.node = ""
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if self._cancel is None:
            raise StopIteration
        event = self._sink.events.get()
        if isinstance(event, tuple):
            self.node = event[1]
            return event[0]
        self._cancel = None
        if isinstance(event, _End):
            self.result = event.value
            if self.result is not None:
                self.node = self.result.node
            raise StopIteration
        raise event

    def close(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_cancel", None) is not None:
            self.close()


_Command = tuple[Literal["start"], Call] | tuple[Literal["cancel"], int] | tuple[Literal["close"], None]


class Client:
    """A thread-safe client for a lanmesh mesh: many requests may be in flight from many threads at once.

    One I/O thread owns every ZeroMQ socket; callers hand it calls and wait on futures. When the node carrying a
    request drops (crash, hang caught by heartbeats), the request is re-sent to another node, so a caller sees an
    error only when its deadline passes, no node is reachable, or the mesh gives an answer a retry cannot change.
    """

    def __init__(
        self,
        nodes: str | Sequence[str],
        *,
        timeout: float = 60.0,
        heartbeat: float = 0.25,
        dead_after: float = 1.0,
        try_timeout: float | None = None,
        security: ClientSecurity | None = None,
        client_id: str | None = None,
    ) -> None:
        endpoints = parse_endpoints(nodes)
        check_client_options(timeout, heartbeat, dead_after, try_timeout)
        self.timeout = timeout
        self.client_id = client_id or f"client-{os.urandom(4).hex()}"
        self._ctx = zmq.Context()
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._monitors: dict[str, zmq.Socket[bytes]] = {}
        try:
            for ep in endpoints:
                dealer = self._ctx.socket(zmq.DEALER)
                self._dealers[ep] = dealer
                configure_dealer(dealer, ep, heartbeat=heartbeat, dead_after=dead_after, security=security)
                self._monitors[ep] = dealer.get_monitor_socket(_MONITOR_EVENTS)
                dealer.connect(ep)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ValueError(f"cannot connect to {ep}: {exc}") from exc
        self._table = CallTable(endpoints, client_id=self.client_id, transmit=self._transmit, try_timeout=try_timeout)
        self._commands: deque[_Command] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"lanmesh-{self.client_id}", daemon=True)
        self._thread.start()

    @classmethod
    def discover(cls, timeout: float = 2.0, *, interfaces: list[str] | None = None, **kwargs: Any) -> Client:
        """A client for the nodes that answer mDNS within `timeout` seconds (raises MeshUnavailable if none)."""
        return cls(discover_endpoints(timeout, interfaces), **kwargs)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._table.endpoints

    @property
    def connected(self) -> tuple[str, ...]:
        """The node endpoints this client has a live connection to right now."""
        return self._table.connected

    # ------------------------------------------------------------- requests

    def submit(
        self,
        model: str,
        task: str | Task,
        input: Any,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        priority: int = 0,
        require: dict[str, str] | None = None,
    ) -> Future[Result]:
        """Start a request and return at once; the future resolves to its Result or a LanmeshError."""
        future: Future[Result] = Future()
        call = request_call(
            self._table.new_key(), _FutureSink(future), model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        self._start(call, future)
        return future

    def request(
        self,
        model: str,
        task: str | Task,
        input: Any,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        priority: int = 0,
        require: dict[str, str] | None = None,
    ) -> Result:
        """Send a request and wait for its Result."""
        waiter = _Waiter()
        call = request_call(
            self._table.new_key(), waiter, model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        return cast(Result, self._run_call(call, waiter))

    @overload
    def chat(
        self, model: str, messages: list[dict[str, str]], *, stream: Literal[False] = ..., max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Result: ...  # fmt: skip
    @overload
    def chat(
        self, model: str, messages: list[dict[str, str]], *, stream: Literal[True], max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Stream: ...  # fmt: skip
    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        require: dict[str, str] | None = None,
    ) -> Result | Stream:
        """Chat with a model; `stream=True` returns an iterator of text deltas (a `Stream`)."""
        params = generation_params(max_tokens, temperature, top_p, seed, stop)
        return self._generate(model, Task.CHAT, messages, params, stream, timeout, require)

    @overload
    def complete(
        self, model: str, prompt: str, *, stream: Literal[False] = ..., max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Result: ...  # fmt: skip
    @overload
    def complete(
        self, model: str, prompt: str, *, stream: Literal[True], max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Stream: ...  # fmt: skip
    def complete(
        self,
        model: str,
        prompt: str,
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        require: dict[str, str] | None = None,
    ) -> Result | Stream:
        """Continue a prompt; `stream=True` returns an iterator of text deltas (a `Stream`)."""
        params = generation_params(max_tokens, temperature, top_p, seed, stop)
        return self._generate(model, Task.COMPLETE, prompt, params, stream, timeout, require)

    def embed(self, model: str, texts: str | list[str], *, timeout: float | None = None) -> list[list[float]]:
        """One embedding vector per text (a single string gives a list of one vector)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return embeddings_of(self.request(model, Task.EMBED, batch, timeout=timeout))

    def status(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The mesh as a node sees it: one map per node it knows."""
        reply = self._probe("status", timeout)
        return list(reply.pong.status or [])

    def ping(self, timeout: float = 1.0) -> float:
        """Round-trip seconds to the first node that answers (measured at the socket)."""
        return self._probe("ping", timeout).rtt

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the I/O thread; requests still pending fail with MeshUnavailable('client closed')."""
        with self._lock:
            first = not self._closed  # False also when the I/O thread already stopped after a crash
            self._closed = True
            if first:
                self._commands.append(("close", None))
        if first:
            self._wake()
        if threading.current_thread() is self._thread:
            return  # close() from a done-callback: the I/O thread stops once this callback returns
        self._thread.join(_CLOSE_JOIN_S)
        if self._thread.is_alive():
            log.error("the client I/O thread did not stop within %gs", _CLOSE_JOIN_S)
            return
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- caller side

    def _generate(
        self,
        model: str,
        task: Task,
        input: Any,
        params: dict[str, Any],
        stream: bool,
        timeout: float | None,
        require: dict[str, str] | None,
    ) -> Result | Stream:
        if not stream:
            return self.request(model, task, input, params=params, timeout=timeout, require=require)
        sink = _QueueSink()
        key = self._table.new_key()
        call = request_call(
            key, sink, model, task, input, params=params, timeout=self.timeout if timeout is None else timeout,
            priority=0, require=require, stream=True, now=time.monotonic(),
        )  # fmt: skip
        self._send_command(("start", call))
        return Stream(sink, lambda: self._cancel(key))

    def _probe(self, kind: Literal["ping", "status"], timeout: float) -> PingReply:
        waiter = _Waiter()
        now = time.monotonic()
        call = Call(self._table.new_key(), kind, timeout, now + timeout, waiter)
        return cast(PingReply, self._run_call(call, waiter))

    def _start(self, call: Call, future: Future[Any]) -> None:
        self._send_command(("start", call))
        key = call.key
        future.add_done_callback(lambda f: self._cancel(key) if f.cancelled() else None)

    def _run_call(self, call: Call, waiter: _Waiter) -> Any:
        self._send_command(("start", call))
        try:
            return waiter.wait()
        except LanmeshError:
            raise
        except BaseException:
            self._cancel(call.key)  # e.g. KeyboardInterrupt while waiting: stop tracking the request
            raise

    def _cancel(self, key: int) -> None:
        # No lock: this also runs from Stream.__del__, which the GC may call while this thread holds the lock.
        # A cancel that races with close() is harmless: close fails every pending call anyway.
        if self._closed:
            return
        self._commands.append(("cancel", key))
        self._wake()

    def _send_command(self, command: _Command) -> None:
        with self._lock:
            if self._closed:
                raise MeshUnavailable("client closed")
            self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        # One pending wake-up byte is enough: the I/O thread clears the flag before it drains the commands.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the socket buffer is full of wake-ups already; the I/O thread will wake
        except OSError:
            if not self._closed:
                raise
            # a cancel that raced with close(): the wake-up socket is gone along with the I/O thread

    # ------------------------------------------------------------- the I/O thread

    def _transmit(self, endpoint: str, frame: bytes) -> bool:
        try:
            self._dealers[endpoint].send(frame, zmq.DONTWAIT)
        except zmq.Again:
            return False
        return True

    def _run(self) -> None:
        table = self._table
        poller = zmq.Poller()
        readers: dict[Any, str] = {}
        watchers: dict[Any, str] = {}
        for ep, dealer in self._dealers.items():
            poller.register(dealer, zmq.POLLIN)
            readers[dealer] = ep
        for ep, monitor in self._monitors.items():
            poller.register(monitor, zmq.POLLIN)
            watchers[monitor] = ep
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        try:
            while True:
                wake = table.next_wake()
                timeout = None if wake is None else max(0, math.ceil((wake - time.monotonic()) * 1000.0))
                ready = poller.poll(timeout)
                now = time.monotonic()
                # Replies first: an answer that arrived just before its node dropped is still an answer.
                for sock, _ in ready:
                    source = readers.get(sock)
                    if source is not None:
                        self._drain_replies(sock, source, now)
                for sock, _ in ready:
                    source = watchers.get(sock)
                    if source is not None:
                        self._drain_events(sock, source, now)
                if any(sock == wake_fd for sock, _ in ready):
                    # Drain before clearing the flag: a byte sent after the clear must stay in the socket, or a
                    # caller that then finds the flag set would skip its wake-up and its command would wait forever.
                    self._drain_wakeups()
                    self._wake_pending = False
                if self._commands and self._run_commands(now):
                    break
                table.expire(time.monotonic())
        except Exception as exc:  # a bug in this client: fail every caller loudly instead of leaving them hanging
            log.exception("lanmesh client I/O thread crashed")
            table.fail_all(InternalError(f"client I/O thread crashed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._closed = True  # also after a crash: later calls must fail, not wait for a dead thread
            closed = MeshUnavailable("client closed")
            table.fail_all(closed)
            for command in self._commands:
                if command[0] == "start":
                    command[1].sink.fail(closed)
            self._commands.clear()
            self._close_sockets()

    def _drain_replies(self, sock: zmq.Socket[bytes], ep: str, now: float) -> None:
        receive = self._table.receive
        # Ask EVENTS rather than recv until zmq.Again: raising and catching that costs more than the check.
        for _ in range(_DRAIN_BATCH):
            if not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            receive(ep, sock.recv(zmq.DONTWAIT), now)

    def _drain_events(self, sock: zmq.Socket[bytes], ep: str, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(sock, zmq.DONTWAIT)
            except zmq.Again:
                return
            apply_monitor_event(self._table, ep, int(event["event"]), now)

    def _drain_wakeups(self) -> None:
        while True:
            try:
                if not self._wake_r.recv(4096):
                    return
            except BlockingIOError:
                return

    def _run_commands(self, now: float) -> bool:
        """Run queued caller commands; True when one of them was `close`."""
        table = self._table
        commands = self._commands
        while commands:
            command = commands.popleft()
            if command[0] == "start":
                table.start(command[1], now)
            elif command[0] == "cancel":
                table.cancel(command[1])
            else:
                return True
        return False

    def _close_sockets(self) -> None:
        for dealer in self._dealers.values():
            if not dealer.closed:
                dealer.disable_monitor()
        for monitor in self._monitors.values():
            monitor.close(0)
        for dealer in self._dealers.values():
            dealer.close(0)
        self._ctx.term()


def apply_monitor_event(table: CallTable, endpoint: str, event: int, now: float) -> None:
    """Feed one socket-monitor event to the table: a completed handshake is 'up', a disconnect is 'down'."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        table.node_up(endpoint, now)
    elif event == zmq.EVENT_DISCONNECTED:
        table.node_down(endpoint, now)
    elif event & _HANDSHAKE_FAILED:
        log.warning("handshake with %s failed (zmq event %#x)", endpoint, event)


__all__ = ["Call", "CallTable", "Client", "PingReply", "Result", "Sink", "Stream", "parse_endpoints"]
