"""What one logical request is (`Call`), what it ends as (`Result`), and `CallTable`: the client's failover logic.

`CallTable` is sans-IO: it is told what happened (a node connected or dropped, a frame arrived, time passed) and
sends frames through the `transmit` callable it was given. Each runtime (`Client`, `AsyncClient`) only moves bytes,
events and timers to it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
    LanmeshError,
    MeshUnavailable,
    Overloaded,
    ProtocolError,
    Unauthorized,
    error_from_wire,
)

log = logging.getLogger(__name__)

# After a Reject/OVERLOADED the next node is tried after this pause, doubling per refusal (a full mesh needs a
# moment to drain, and an instant retry storm would only refill it).
_DECLINED_BACKOFF_S, _DECLINED_BACKOFF_MAX_S = 0.005, 0.1
# When every reachable node answered UNAVAILABLE (e.g. shutting down), wait longer before asking again.
_UNAVAILABLE_BACKOFF_S, _UNAVAILABLE_BACKOFF_MAX_S = 0.05, 0.5
# Handshakes failed this many times in a row at every node (and none connected): the key is wrong, not the network.
_REFUSALS_FOR_UNAUTHORIZED = 2
# A send refused by the socket (no live pipe yet, or the HWM is full) is retried after this pause.
_SEND_RETRY_S = 0.002
# Below this budget a request cannot be stamped (deadline_ms must be >= 1) and has expired.
_MIN_BUDGET_S = 0.001
_TASKS: dict[str, Task] = {t.value: t for t in Task}  # a Task is a str, so members find themselves too

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
        self._refused: dict[str, tuple[int, str]] = {}  # endpoint -> (handshakes failed in a row, why)

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

    def active(self, key: int) -> bool:
        """Whether call `key` is still in flight (or waiting to be sent)."""
        return key in self._calls

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
        self._refused.pop(endpoint, None)
        log.debug("connected to %s", endpoint)
        for call in list(self._waiting.values()):
            if call.not_before <= now:
                self._dispatch(call, now)

    def node_refused(self, endpoint: str, why: str, now: float, *, final: bool = False) -> None:
        """The handshake with `endpoint` failed (wrong or missing mesh key). When every node keeps refusing,
        fail the calls now with Unauthorized: waiting for the deadline cannot fix a key. `final`: ZeroMQ will
        not try this node again (a protocol mismatch), so one refusal is enough."""
        count = self._refused.get(endpoint, (0, ""))[0] + 1
        self._refused[endpoint] = (max(count, _REFUSALS_FOR_UNAUTHORIZED) if final else count, why)
        if self._every_node_refused():
            self.fail_all(self._unauthorized())

    def _every_node_refused(self) -> bool:
        refused = self._refused
        return not self._up and all(refused.get(ep, (0, ""))[0] >= _REFUSALS_FOR_UNAUTHORIZED for ep in self.endpoints)

    def _unauthorized(self) -> Unauthorized:
        reasons = "; ".join(why for _, why in self._refused.values())
        return Unauthorized(f"no node accepted this client's mesh key: {reasons}")

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
        if type(msg) is Reply:  # the common case first
            self._on_reply(call, msg)
        elif isinstance(msg, Chunk):
            self._on_chunk(call, msg, endpoint)
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
        if self._waiting:
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
                if self._refused and self._every_node_refused():
                    self._fail(call, self._unauthorized())  # no node will ever take this client's key
                    return
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
        deadline_ms = int((call.deadline - now) * 1000)
        # Positional (in Request's field order): noticeably cheaper than keywords on this per-request path.
        return Request(
            wire, call.model, call.task, call.input, call.params, deadline_ms if deadline_ms > 0 else 1,
            call.priority, 0, self.client_id, call.stream, call.require, "".join(call.text) if call.text else "",
        )  # fmt: skip

    def _pick(self, call: Call, avoid: str | None) -> str | None:
        """Round-robin over connected nodes that have not refused this call (any node routes inside the mesh)."""
        up = self._up
        if len(up) == 1:  # one node: no rotation; the node to avoid is still better than none
            ep = up[0]
            return None if ep in call.declined or ep in call.unavailable else ep
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
        elif not self._up and self._refused:
            exc = self._unauthorized()
        elif not self._up:
            where = ", ".join(self.endpoints)
            exc = MeshUnavailable(f"no lanmesh node reachable at {where} within {call.timeout:g}s")
        else:
            exc = DeadlineExceeded(f"the request was not served within {call.timeout:g}s")
        self._fail(call, exc)


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
    try:
        task_ = _TASKS.get(task)  # a dict lookup: Task(task) costs an enum call per request
    except TypeError:  # unhashable
        task_ = None
    if task_ is None:
        raise ValueError(f"task must be one of {list(_TASKS)}, got {task!r}")
    return Call(
        key=key,
        kind="request",
        timeout=timeout,
        deadline=now + timeout,
        sink=sink,
        model=model,
        task=task_,
        input=input,
        params=dict(params) if params else {},
        priority=priority,
        require=dict(require) if require else {},
        stream=stream,
    )


__all__ = ["Call", "CallTable", "PingReply", "Result", "Sink", "request_call", "text_of"]
