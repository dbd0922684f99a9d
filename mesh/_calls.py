"""`CallTable`: the client's fail-over, retry, cancel and mesh-learning logic, over the calls in flight.

`CallTable` is sans-IO: it is told what happened (a node connected or dropped, a frame arrived, time passed), sends
frames through the `transmit` callable it was given, and says which node connections to open or close
(`take_node_changes`). Each runtime (`Client`, `AsyncClient`) only moves bytes, events and timers to it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from protocol import (
    RETRYABLE,
    Cancel,
    Chunk,
    DecodeError,
    Error,
    ErrorCode,
    Ping,
    Pong,
    Reject,
    Reply,
    Request,
    decode,
    encode,
)

from ._backoff import CLIENT_DECLINED, CLIENT_UNAVAILABLE
from ._call import Call, CallState, Sink, generation_params, request_call
from ._directory import NodeDirectory
from ._results import PingReply, Result, text_of
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

# Handshakes failed this many times in a row at every node (and none connected): the key is wrong, not the network.
_REFUSALS_FOR_UNAUTHORIZED = 2
# A send refused by the socket (no live pipe yet, or the HWM is full) is retried after this pause.
_SEND_RETRY_S = 0.002
# Below this budget a request cannot be stamped (deadline_ms must be >= 1) and has expired.
_MIN_BUDGET_S = 0.001
# How long a node may take to answer the status ping that tells this client about the rest of the mesh.
_LEARN_TIMEOUT_S = 2.0
# Cancels for tries on a node that dropped are sent if it comes back (a hung node resumes its work otherwise);
# at most this many per node are remembered.
_MAX_OWED_CANCELS = 1024


class CallTable:
    """Every call in flight, which node each is on, and what to do when something happens to a node.

    Nodes: the `endpoints` given, plus, with a `directory`, the live nodes the mesh reports (learned). Calls go to
    the given nodes while one of them is connected and takes them; learned ones are the stand-ins, so the mesh is
    entered where the caller chose while that node lives, and elsewhere at once when it does not.

    Not thread-safe: one thread (or one event loop) drives it. `transmit(endpoint, frame)` must not block and
    returns False when the socket cannot take the frame now. `on_nodes_changed()` is called when
    `take_node_changes()` has connections for the runtime to open or close.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        client_id: str,
        transmit: Callable[[str, bytes], bool],
        try_timeout: float | None = None,
        directory: NodeDirectory | None = None,
        on_nodes_changed: Callable[[], None] | None = None,
        on_status: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.client_id = client_id
        self._on_status = on_status  # told every status a node answers (a member identity learns node keys there)
        self._transmit = transmit
        self._try_timeout = try_timeout
        self._given = frozenset(self.endpoints)
        self._up: list[str] = []  # every connected node
        self._up_given: list[str] = []
        self._up_learned: list[str] = []
        self._rr = 0
        self._calls: dict[int, Call] = {}
        self._waiting: dict[int, Call] = {}
        self._by_wire: dict[str, Call] = {}
        self._on_node: dict[str, set[int]] = {ep: set() for ep in self.endpoints}  # every node held, by endpoint
        self._timers: list[tuple[float, int]] = []
        self._wire_prefix = os.urandom(6).hex()
        self._wire_seq = itertools.count(1)
        self._keys = itertools.count(1)
        self.stale_replies = 0  # answers to tries that were abandoned (failover, cancel, deadline)
        self.protocol_errors = 0  # frames that could not be decoded or matched to any call
        self._refused: dict[str, tuple[int, str]] = {}  # endpoint -> (handshakes failed in a row, why)
        self._owed: dict[str, list[tuple[str, str, float]]] = {}  # endpoint -> (wire id, reason, until) to cancel
        self._directory = directory
        self._on_nodes_changed = on_nodes_changed
        self._node_changes: list[tuple[bool, str]] = []  # (open?, endpoint), for the runtime's sockets
        self._learn_key = 0  # the status ping out now (0: none)

    # ------------------------------------------------------------- inputs

    def new_key(self) -> int:
        """A key for a call about to be started (safe from any thread: `next` on a count is atomic)."""
        return next(self._keys)

    @property
    def connected(self) -> tuple[str, ...]:
        return tuple(self._up)

    @property
    def learned(self) -> tuple[str, ...]:
        """The nodes this table holds besides the given ones: learned from the mesh, not yet forgotten."""
        return self._directory.learned if self._directory is not None else ()

    @property
    def pending(self) -> int:
        return len(self._calls)

    def active(self, key: int) -> bool:
        """Whether call `key` is still in flight (or waiting to be sent)."""
        return key in self._calls

    def start(self, call: Call, now: float) -> None:
        self._calls[call.key] = call
        self._dispatch(call, now)

    def cancel(self, key: int, reason: str = "cancelled") -> None:
        """The caller gave up on call `key`: forget it, and tell the node carrying its live try to stop."""
        call = self._calls.get(key)
        if call is not None:
            self._cancel_try(call, reason)
            self._finish(call)

    def node_up(self, endpoint: str, now: float) -> None:
        if endpoint in self._up or endpoint not in self._on_node:
            return  # up already, or a node dropped while its socket's last events were on their way
        self._up.append(endpoint)
        given = endpoint in self._given
        (self._up_given if given else self._up_learned).append(endpoint)
        self._refused.pop(endpoint, None)
        log.debug("connected to %s", endpoint)
        owed = self._owed.pop(endpoint, None)
        if owed:
            self._send_owed_cancels(endpoint, owed, now)
        for call in list(self._waiting.values()):
            if call.not_before <= now:
                self._dispatch(call, now)
        if self._directory is not None:
            if given:  # first contact, or back after an outage: the mesh may have changed meanwhile
                self._directory.ask_soon(now)
            self._learn(now)

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
        (self._up_given if endpoint in self._given else self._up_learned).remove(endpoint)
        moved = [self._calls[key] for key in self._on_node[endpoint]]
        if moved:
            log.info("lost %s with %d requests in flight; re-sending them", endpoint, len(moved))
        for call in moved:
            # The connection is gone, so the Cancel waits: a node that only hung resumes its work when it wakes.
            self._owe_cancel(endpoint, call, "node lost")
            self._drop_try(call)
            self._dispatch(call, now)
        if self._directory is not None:
            self._directory.ask_soon(now)  # which nodes are left, and are there others to connect to
            self._learn(now)

    def receive(self, endpoint: str, frame: bytes, now: float) -> None:
        try:
            msg = decode(frame)
        except DecodeError as exc:
            call = self._by_wire.get(exc.request_id) if exc.request_id else None
            if call is None:
                self.protocol_errors += 1
                log.warning("dropped an undecodable frame from %s: %s", endpoint, exc)
                return
            self._abort(call, ProtocolError(f"undecodable reply from {endpoint}: {exc}"), "undecodable reply")
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
            if msg.status and self._on_status is not None:
                self._on_status(msg.status)
            if call.kind == "learn":
                self._learned(msg, endpoint, now)
            else:
                call.sink.done(PingReply(msg, now - call.sent_at))
        else:
            what = f"{endpoint} answered a {call.kind} with a {type(msg).__name__}"
            self._abort(call, ProtocolError(what), "unexpected reply")

    def expire(self, now: float) -> None:
        """Act on every timer that is due: deadlines, backoffs, per-try timeouts, asking the mesh for its nodes."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, key = heapq.heappop(timers)
            call = self._calls.get(key)
            if call is None or call.wake != when:
                continue
            if now >= call.deadline - _MIN_BUDGET_S:
                self._expire(call)
            elif call.state is not CallState.SENT:
                self._dispatch(call, now)
            elif self._try_timeout is not None and now >= call.sent_at + self._try_timeout:
                log.info("no answer from %s within the %gs try timeout; re-sending", call.node, self._try_timeout)
                avoid = call.node
                self._cancel_try(call, "try timeout")
                self._drop_try(call)
                self._dispatch(call, now, avoid=avoid)
        if self._directory is not None:
            self._learn(now)

    def next_wake(self) -> float | None:
        """When `expire` next has work (None: nothing timed is pending)."""
        timers = self._timers
        wake = None
        while timers:
            when, key = timers[0]
            call = self._calls.get(key)
            if call is not None and call.wake == when:
                wake = when
                break
            heapq.heappop(timers)
        directory = self._directory
        if directory is not None and self._up and not self._learn_key and (wake is None or directory.next_ask < wake):
            return directory.next_ask
        return wake

    def fail_all(self, exc: LanmeshError) -> None:
        """End every call with `exc` (the client closes or broke), cancelling their live tries."""
        for call in list(self._calls.values()):
            self._abort(call, exc, exc.message)

    def take_node_changes(self) -> list[tuple[bool, str]]:
        """Node connections for the runtime to open (True) or close (False), in order; each is handed out once."""
        changes = self._node_changes
        if changes:
            self._node_changes = []
        return changes

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
            self._abort(call, ProtocolError(f"stream chunk carries {what}, not text", node=chunk.node), "bad chunk")
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
        if err.code not in RETRYABLE:  # protocol.RETRYABLE: the one table of what a retry can fix, mesh-wide
            self._fail(call, exc)
        elif err.code is ErrorCode.OVERLOADED:
            self._declined(call, endpoint, err.queue, exc, now)  # busy: the next node after a short backoff
        else:  # cannot serve now (e.g. shutting down): another node at once; when all said so, all again later
            call.unavailable.add(endpoint)
            call.last_error = exc
            self._drop_try(call)
            self._dispatch(call, now)

    def _declined(self, call: Call, endpoint: str, queue: int, exc: LanmeshError, now: float) -> None:
        call.declined[endpoint] = queue
        call.last_error = exc
        self._drop_try(call)
        if all(ep in call.declined for ep in self._up):
            self._fail(call, exc)
            return
        # A full mesh needs a moment to drain, and an instant retry storm would only refill it.
        pause = CLIENT_DECLINED.delay(len(call.declined))
        self._park(call, now + pause)

    # ------------------------------------------------------------- learning the mesh

    def _learn(self, now: float) -> None:
        """Ask a connected node for its view of the mesh, when the directory says it is time."""
        directory = self._directory
        if directory is None or self._learn_key or not self._up or now < directory.next_ask:
            return
        call = Call(self.new_key(), "learn", _LEARN_TIMEOUT_S, now + _LEARN_TIMEOUT_S, _LearnSink(self))
        self._learn_key = call.key
        directory.asked(now, _LEARN_TIMEOUT_S)
        self.start(call, now)

    def _learned(self, pong: Pong, via: str, now: float) -> None:
        assert self._directory is not None
        self._learn_key = 0
        changes = self._directory.answered(pong.status or [], via, now, self._up)
        for ep in changes.opened:
            log.info("learned node %s from %s", ep, via)
            self._on_node[ep] = set()
            self._node_changes.append((True, ep))
        for ep in changes.closed:
            log.info("forgetting node %s: the mesh reports it gone", ep)
            self.node_down(ep, now)  # not connected (the directory keeps those), but be sure nothing is left on it
            del self._on_node[ep]
            self._owed.pop(ep, None)
            self._refused.pop(ep, None)
            self._node_changes.append((False, ep))
        if changes and self._on_nodes_changed is not None:
            self._on_nodes_changed()

    def _learn_failed(self) -> None:
        self._learn_key = 0
        if self._directory is not None:
            self._directory.failed()

    # ------------------------------------------------------------- cancelling

    def _cancel_try(self, call: Call, reason: str) -> None:
        """Tell the node carrying the call's live try to stop it. Nobody answers a Cancel, and an older node
        drops it: nothing waits for one."""
        node = call.node
        if node is None or call.kind != "request":
            return
        if not self._transmit(node, encode(Cancel(call.wire, reason))):
            self._owe_cancel(node, call, reason)

    def _owe_cancel(self, endpoint: str, call: Call, reason: str) -> None:
        if call.kind != "request":
            return
        owed = self._owed.setdefault(endpoint, [])
        if len(owed) < _MAX_OWED_CANCELS:
            owed.append((call.wire, reason, call.deadline))

    def _send_owed_cancels(self, endpoint: str, owed: list[tuple[str, str, float]], now: float) -> None:
        for wire, reason, until in owed:
            if until > now:  # past its deadline the node has dropped the work itself
                self._transmit(endpoint, encode(Cancel(wire, reason)))

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
                call.unavailable_rounds += 1
                pause = CLIENT_UNAVAILABLE.delay(call.unavailable_rounds)
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
        call.move(CallState.SENT)
        call.node, call.wire, call.sent_at = endpoint, wire, now
        call.tries += 1
        call.seen.clear()
        self._by_wire[wire] = call
        self._on_node[endpoint].add(call.key)
        wake = call.deadline if self._try_timeout is None else min(call.deadline, now + self._try_timeout)
        self._set_wake(call, wake)

    def _message(self, call: Call, wire: str, now: float) -> Request | Ping:
        if call.kind != "request":
            return Ping(id=wire, node=self.client_id, want_status=call.kind != "ping")
        deadline_ms = int((call.deadline - now) * 1000)
        # Positional (in Request's field order): noticeably cheaper than keywords on this per-request path.
        return Request(
            wire, call.model, call.task, call.input, call.params, deadline_ms if deadline_ms > 0 else 1,
            call.priority, 0, self.client_id, call.stream, call.require, "".join(call.text) if call.text else "",
        )  # fmt: skip

    def _pick(self, call: Call, avoid: str | None) -> str | None:
        """A connected node that has not refused this call: round-robin over the given nodes, then over the
        learned ones (any node routes inside the mesh); the node to avoid only when there is no other."""
        fallback = None
        for up in (self._up_given, self._up_learned):
            if len(up) == 1:  # the common case: no rotation
                ep = up[0]
                if ep in call.declined or ep in call.unavailable:
                    continue
                if ep != avoid:
                    return ep
                fallback = ep
                continue
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
        self._drop_try(call)
        call.move(CallState.WAITING)
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
        """The call's try is over (answered, refused, lost or abandoned): nothing of it is live any more."""
        if call.state is CallState.SENT:
            call.move(CallState.WAITING)
        if call.node is not None:
            self._on_node[call.node].discard(call.key)
            call.node = None
        self._by_wire.pop(call.wire, None)

    def _finish(self, call: Call) -> None:
        self._drop_try(call)
        call.move(CallState.DONE)
        self._waiting.pop(call.key, None)
        self._calls.pop(call.key, None)

    def _fail(self, call: Call, exc: LanmeshError) -> None:
        """End the call with `exc`; its try, if any, has ended too (its node answered with this error)."""
        self._finish(call)
        call.sink.fail(exc)

    def _abort(self, call: Call, exc: LanmeshError, reason: str) -> None:
        """End the call with `exc` while its try may still run: cancel that first."""
        self._cancel_try(call, reason)
        self._fail(call, exc)

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
        self._abort(call, exc, "deadline")


class _LearnSink:
    """Where the table's own status ping ends when it fails (its answer is taken in `CallTable.receive`)."""

    __slots__ = ("table",)

    def __init__(self, table: CallTable) -> None:
        self.table = table

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a status ping never streams")

    def done(self, value: Any) -> None:
        raise AssertionError("the table takes its status answers itself")

    def fail(self, exc: LanmeshError) -> None:
        self.table._learn_failed()


__all__ = ["Call", "CallTable", "PingReply", "Result", "Sink", "generation_params", "request_call", "text_of"]
