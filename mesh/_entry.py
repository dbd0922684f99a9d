"""The entry node's side of a request: which node serves it, and what to do when that node answers, streams,
refuses, fails, falls silent, or when the caller gives up.

Sans-IO, like the routing policy and the failure detector: `EntryTable` is told what happened (a request came in,
a peer answered, a peer was declared suspect, time passed, the caller cancelled) with the time it happened, and
acts through the `EntryHost` it was given (send to a peer, answer a client, serve here). `MeshNode` owns the
sockets and calls it; the unit tests drive it with a fake clock and no sockets.

Rules:
- A request lives as long as its deadline. A try is abandoned only when its node is suspected, dead, left or
  restarted, refused it (Reject, or a retryable error: `protocol.RETRYABLE`), or, where a per-try timeout is set,
  when that passes; never because the work takes long.
- An abandoned try is cancelled on its node (a `Cancel` with the try's id) before the request goes elsewhere; each
  try travels under an id of its own, so a late answer of an old try is recognised and dropped, and a node that gets
  the request again never mistakes it for the one it was told to drop.
- A stream that moves continues after what the caller already has: the new node gets it as `prefix`, and chunks
  are renumbered so the caller sees 0, 1, 2, ... whatever the number of nodes.
- A model no eligible node holds whole is served by a chain of stage holders (`EntryHost.pipeline`): the try goes
  to the first stage, which answers; losing any node of the chain moves the try to a new chain, which reads the
  exact tokens already generated (`prefix_ids`, from the ids the first stage sends with each streamed piece) so the
  stream continues with no token lost or repeated. An abandoned chain is cancelled on every node of it.
- The caller gets exactly one answer: a Reply or an Error; none after it cancelled.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from protocol import (
    RETRYABLE,
    Cancel,
    Chunk,
    Error,
    ErrorCode,
    Reject,
    Reply,
    Request,
    encode,
    restamp_reply,
    restamp_request,
)

from ._backoff import ENTRY, ENTRY_ROUNDS
from ._call import IllegalMove
from ._routing import RoutingPolicy

_ID_LEN = 128  # the wire's limit on ids


class PendingState(StrEnum):
    """Where a request taken from a client stands. Every change goes through `Pending.move`, checked against
    `_MOVES`; the last three are final (the table has forgotten the request)."""

    ROUTING = "routing"  # being given a node (between tries, or arrived)
    ON_PEER = "on_peer"  # a try is out on `Pending.target`
    BACKING_OFF = "backing_off"  # every candidate refused or is out of reach: waiting until `retry_at`
    SERVED_HERE = "served_here"  # handed to this node's executor, which answers the client
    ANSWERED = "answered"  # the client has its one answer (a Reply or an Error)
    CANCELLED = "cancelled"  # the caller gave up: no answer


_FINAL = frozenset({PendingState.SERVED_HERE, PendingState.ANSWERED, PendingState.CANCELLED})
_MOVES: dict[PendingState, frozenset[PendingState]] = {
    PendingState.ROUTING: frozenset({PendingState.ON_PEER, PendingState.BACKING_OFF, *_FINAL}),
    PendingState.ON_PEER: frozenset({PendingState.ROUTING, PendingState.ANSWERED, PendingState.CANCELLED}),
    PendingState.BACKING_OFF: frozenset({PendingState.ROUTING, PendingState.ANSWERED, PendingState.CANCELLED}),
    PendingState.SERVED_HERE: frozenset(),
    PendingState.ANSWERED: frozenset(),
    PendingState.CANCELLED: frozenset(),
}


@dataclass(slots=True)
class Pending:
    """A request this node took from a client and is getting served somewhere."""

    client: bytes
    request: Request
    deadline: float
    started: float  # when it arrived (monotonic)
    frame: bytes = b""  # the request as it arrived: tries are this frame re-stamped, never re-encoded
    target: str = ""  # node serving the current try; "" while none is
    try_id: str = ""  # the id the current try travels under
    try_started: float = 0.0
    route: str = ""
    tries: int = 0
    outstanding: dict[str, str] = field(default_factory=dict)  # node -> model the policy counts it on there
    excluded: set[str] = field(default_factory=set)
    retry_at: float = 0.0  # > 0: waiting out a backoff before the next draw
    rounds: int = 0
    seq: int = 0  # next chunk number towards the client
    streamed: list[str] = field(default_factory=list)
    refused: bool = False  # some node said it was too busy
    state: PendingState = PendingState.ROUTING
    chain: tuple[tuple[str, str], ...] = ()  # a pipeline try: (node, stage) from the first stage to the last
    ids: list[int] = field(default_factory=list)  # the token ids of `streamed`, while every piece came with them
    exact: bool = True  # every piece streamed so far came with its token ids (a chain may replay them)
    next_why: str = "retry-after:busy:"  # the route's prefix when a backoff ends

    @property
    def id(self) -> str:
        return self.request.id

    def move(self, to: PendingState) -> None:
        if to not in _MOVES[self.state]:
            raise IllegalMove(f"request {self.id}: {self.state} -> {to}")
        self.state = to


PipelineFn = Callable[[Request, set[str], float], "tuple[list[tuple[str, str]], str] | None"]
ServeTrackedFn = Callable[[Request, float, float], bool]


class EntryHost(Protocol):
    """What the entry table needs from its node: who may serve, and the sockets and executor behind plain calls."""

    node_id: str

    def eligible(self, request: Request, excluded: set[str]) -> tuple[list[str], bool]:
        """Node ids that may serve `request` now (self included), and whether any node serves its model at all."""
        ...

    def servers(self, model: str) -> list[str]:
        """Every node (alive or not) that announced `model`, for the queue estimate of an OVERLOADED answer."""
        ...

    def serve_here(
        self, client: bytes, request: Request, deadline: float, route: str, seq0: int, started: float
    ) -> bool:
        """Hand the request to this node's executor (answers go straight to `client`); False when it is full."""
        ...

    def send_peer(self, node: str, frame: bytes) -> bool:
        """Send an encoded Request or Cancel to a peer's ROUTER; False when its socket cannot take it now."""
        ...

    # A chain of stage holders that serves a request's model together, and why (None: none can now).
    pipeline: PipelineFn
    # Serve a try here whose answers come back to this table (`on_chunk`, `on_reply`, `on_error` with this node's
    # id), as a peer's would: a pipeline whose first stage is this node.
    serve_tracked: ServeTrackedFn

    # Stop a try running here (and free a pipeline sequence of that id held here).
    cancel_here: Callable[[str, str], None]

    def send_client(self, client: bytes, frame: bytes) -> None:
        """Send an encoded Reply, Chunk or Error to a client (or to the entry node that forwarded to us)."""
        ...

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        """A request this node forwarded ended: `ok`, an error code in lower case, or `cancelled`."""
        ...

    def first_chunk(self, model: str, seconds: float) -> None: ...


class EntryTable:
    """Every request this node took from a client and is having served elsewhere (or will serve itself)."""

    def __init__(
        self,
        host: EntryHost,
        policy: RoutingPolicy,
        *,
        max_tries: int = 4,
        try_timeout: float | None = None,
        wait_for_node: float = 3.0,
        counts: collections.Counter[str] | None = None,
    ) -> None:
        if max_tries < 1:
            raise ValueError("max_tries must be at least 1")
        if try_timeout is not None and not try_timeout > 0:
            raise ValueError("try_timeout must be positive (or None: tries last as long as the request)")
        self.host = host
        self.policy = policy
        self.max_tries = max_tries
        self.try_timeout = try_timeout
        # A request for a model whose nodes are all out of reach (suspect, dead: e.g. this node's own link was down)
        # waits this long for one to come back before its client hears UNAVAILABLE: a node that rejoins the mesh
        # then routes again the moment it sees a peer, instead of failing what arrived meanwhile.
        self.wait_for_node = wait_for_node
        self._pending: dict[str, Pending] = {}  # by the caller's request id
        self._by_try: dict[str, Pending] = {}  # by the id the current try travels under
        # Events worth a counter (forwarded, retries, cancels_sent, ...); the node passes its own stats.
        self.counts: collections.Counter[str] = counts if counts is not None else collections.Counter()

    # ------------------------------------------------------------ views

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._pending.values()))

    def get(self, request_id: str) -> Pending | None:
        return self._pending.get(request_id)

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    # ------------------------------------------------------------ inputs

    def take(
        self, client: bytes, request: Request, now: float, refused_here: bool = False, frame: bytes = b""
    ) -> Pending:
        """A request from a client that this node did not serve at once: find it a node."""
        p = Pending(client, request, now + request.deadline_ms / 1000, now, frame, refused=refused_here)
        if refused_here:
            p.excluded.add(self.host.node_id)
        self._pending[request.id] = p
        self._dispatch(p, "", now)
        return p

    def forward_first(
        self, client: bytes, request: Request, node: str, route: str, now: float, frame: bytes = b""
    ) -> bool:
        """The common case, decided by the node's fast path: send the first try straight to `node`."""
        p = Pending(client, request, now + request.deadline_ms / 1000, now, frame)
        self._pending[request.id] = p
        if self._forward(p, node, route, now):
            return True
        del self._pending[request.id]
        return False

    def on_reply(self, node: str, msg: Reply, now: float, frame: bytes = b"") -> None:
        p = self._current(node, msg.id)
        if p is None:
            return
        if node != self.host.node_id:
            self.policy.observe_queue(node, p.outstanding.get(node, p.request.model), msg.queue, now)
        out = (
            restamp_reply(frame, msg, id=p.id, route=p.route) if frame else encode(replace(msg, id=p.id, route=p.route))
        )
        self._finish(p, out, "ok", now)

    def on_chunk(self, node: str, msg: Chunk, now: float) -> None:
        p = self._current(node, msg.id)
        if p is None:
            return
        data = msg.data
        if p.chain and isinstance(data, dict) and isinstance(data.get("text"), str):
            # A pipeline's piece: its text for the caller, its token ids kept for a replay.
            tokens = data.get("tokens")
            if isinstance(tokens, list) and all(type(t) is int for t in tokens):
                p.ids.extend(tokens)
            else:
                p.exact = False
            data = data["text"]
        else:
            p.exact = False
        if isinstance(data, str):
            p.streamed.append(data)
        if p.seq == 0:
            self.host.first_chunk(p.request.model, now - p.started)
        self.host.send_client(p.client, encode(Chunk(p.id, p.seq, data, msg.node, p.route)))
        p.seq += 1

    def on_reject(self, node: str, msg: Reject, now: float) -> None:
        p = self._current(node, msg.id)
        if p is None:
            return
        self._count("rejects_received")
        p.refused = True
        self._abandon(p, node, now, msg.queue, cancel=False)  # a refused request never started there
        p.excluded.add(node)
        self._dispatch(p, f"retry-after:reject({node}):", now)

    def on_error(self, node: str, msg: Error, now: float) -> None:
        p = self._current(node, msg.id)
        if p is None:
            return
        if msg.code in RETRYABLE and p.tries < self.max_tries:
            p.refused = p.refused or msg.code is ErrorCode.OVERLOADED
            chain = bool(p.chain)
            self._abandon(p, node, now, msg.queue, cancel=False)  # it answered: nothing runs there any more
            if chain and msg.code is ErrorCode.UNAVAILABLE:
                # A stage behind the first one failed or went away: the failure detector is about to say which
                # (a closed connection is seen in milliseconds), so wait a moment rather than compose the same chain.
                p.move(PendingState.BACKING_OFF)
                p.retry_at, p.next_why = now + ENTRY.delay(1), f"retry-after:stage-lost({node}):"
                return
            p.excluded.add(node)
            self._dispatch(p, f"retry-after:{msg.code.name.lower()}({node}):", now)
            return
        if node != self.host.node_id:
            self.policy.observe_queue(node, p.outstanding.get(node, p.request.model), msg.queue, now)
        self._finish(p, encode(replace(msg, id=p.id)), msg.code.name.lower(), now)

    def cancel(self, client: bytes, request_id: str, reason: str, now: float) -> bool:
        """The caller gave up: stop the try where it runs, forget the request, answer nothing. False if unknown
        (already answered). The Cancel may come on another connection than the request: a client whose connection
        dropped sends its Cancels again once it reconnects. A request's id is its caller's capability (clients make
        them random; a peer on the request's path could stop it by answering badly anyway)."""
        p = self._pending.get(request_id)
        if p is None:
            return False
        if p.client != client:
            self._count("cancelled_from_another_connection")
        self._count("cancelled")
        if p.target:
            self._abandon(p, p.target, now, cancel=True, reason=reason or "cancelled by the caller")
        self._release(p, PendingState.CANCELLED)
        self.host.finished(p.request.model, "cancelled", now - p.started)
        return True

    def node_gone(self, node: str, why: str, now: float) -> None:
        """`node` is suspected, dead, left or restarted: re-send what runs there (or on a chain through it)."""
        for p in list(self._pending.values()):
            if p.target == node or any(n == node for n, _ in p.chain):
                self._abandon(p, p.target, now, cancel=True, reason=f"moved to another node ({why})")
                p.excluded.add(node)
                self._dispatch(p, f"retry-after:{why}:", now)

    def node_back(self, now: float) -> None:
        """A node became reachable again: what waits for one goes out now, not at its next backoff."""
        for p in list(self._pending.values()):
            if p.state is PendingState.BACKING_OFF:
                self._dispatch(p, "retry-after:node-back:", now)

    def tick(self, now: float) -> None:
        """Deadlines, backoffs that are over, and (where set) per-try timeouts."""
        for p in list(self._pending.values()):
            if now >= p.deadline:
                if p.target:
                    self._abandon(p, p.target, now, cancel=True, reason="deadline passed")
                err = Error(p.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed while being served", self.host.node_id)
                self._finish(p, err, "deadline_exceeded", now)
            elif p.state is PendingState.BACKING_OFF and now >= p.retry_at:
                why, p.next_why = p.next_why, "retry-after:busy:"
                self._dispatch(p, why, now)
            elif self.try_timeout is not None and p.target and now - p.try_started > self.try_timeout:
                self._count("try_timeouts")
                node = p.target
                self._abandon(
                    p, node, now, cancel=True, reason=f"no answer within the {self.try_timeout:g}s try timeout"
                )
                p.excluded.add(node)
                self._dispatch(p, "retry-after:timeout:", now)

    def hand_back(self, why: str, now: float) -> None:
        """This node is stopping: every caller hears UNAVAILABLE (its client retries elsewhere)."""
        for p in list(self._pending.values()):
            if p.target:
                self._abandon(p, p.target, now, cancel=True, reason=why)
            self._finish(p, Error(p.id, ErrorCode.UNAVAILABLE, why, self.host.node_id), "unavailable", now)

    # ------------------------------------------------------------ deciding

    def _dispatch(self, p: Pending, why: str, now: float) -> None:
        """Pick a node for `p` and send it there; answer the client when nothing can serve it."""
        if p.state is PendingState.BACKING_OFF:
            p.move(PendingState.ROUTING)
            p.retry_at = 0.0
        req = p.request
        if now >= p.deadline:
            err = Error(p.id, ErrorCode.DEADLINE_EXCEEDED, "deadline passed before a node could serve it",
                        self.host.node_id)  # fmt: skip
            self._finish(p, err, "deadline_exceeded", now)
            return
        while True:
            candidates, known = self.host.eligible(req, p.excluded)
            if not candidates:
                piped = self.host.pipeline(req, p.excluded, now)
                if piped is None:
                    self._nobody(p, known, now)
                    return
                chain, reason = piped
                if self._forward_chain(p, chain, f"{why}{reason}" if why else reason, now):
                    return
                p.excluded.add(chain[0][0])
                continue
            choice = self.policy.choose(req.model, candidates, now, req)
            route = f"{why}{choice.reason}" if why else choice.reason
            if choice.node == self.host.node_id:
                local = replace(req, prefix=req.prefix + "".join(p.streamed)) if p.streamed else req
                if self.host.serve_here(p.client, local, p.deadline, route, p.seq, p.started):
                    self._release(p, PendingState.SERVED_HERE)  # the executor answers the client from here on
                    self._count("served_local")
                    return
                p.excluded.add(self.host.node_id)
                p.refused = True
                continue
            if self._forward(p, choice.node, route, now):
                return
            p.excluded.add(choice.node)

    def _nobody(self, p: Pending, known: bool, now: float) -> None:
        req = p.request
        node_id = self.host.node_id
        if not known:
            msg = f"no node in the mesh serves model {req.model!r}"
            if req.require:
                msg += f" with labels {req.require}"
            self._finish(p, Error(p.id, ErrorCode.UNKNOWN_MODEL, msg, node_id), "unknown_model", now)
        elif p.rounds < ENTRY_ROUNDS or (not p.refused and now - p.started < self.wait_for_node):
            # Everyone said no, failed, or is out of reach: a short backoff (_backoff.ENTRY), then try them all again.
            p.rounds += 1
            p.excluded.clear()
            p.move(PendingState.BACKING_OFF)
            p.retry_at = now + ENTRY.delay(p.rounds)
        else:
            code = ErrorCode.OVERLOADED if p.refused else ErrorCode.UNAVAILABLE
            msg = "every node serving this model is busy" if p.refused else "no live node serves this model now"
            queue = min((self.policy.estimate(n, req.model, now) for n in self.host.servers(req.model)), default=0)
            self._finish(p, Error(p.id, code, msg, node_id, int(queue)), code.name.lower(), now)

    def _forward(self, p: Pending, node: str, route: str, now: float) -> bool:
        left_ms = int((p.deadline - now) * 1000)
        if left_ms <= 0:
            return False
        try_id = _try_id(p.id, p.tries + 1)
        req = p.request
        prefix = req.prefix + "".join(p.streamed) if p.streamed else req.prefix
        origin = req.origin or self.host.node_id
        if p.frame:
            frame = restamp_request(p.frame, req, id=try_id, deadline_ms=left_ms, hops=req.hops + 1, origin=origin,
                                    prefix=prefix)  # fmt: skip
        else:
            frame = encode(
                replace(req, id=try_id, hops=req.hops + 1, deadline_ms=left_ms, origin=origin, prefix=prefix)
            )
        if not self.host.send_peer(node, frame):
            self._count("forward_unreachable")
            return False
        p.chain = ()
        self._sent(p, node, route, try_id, now, {node: req.model})
        return True

    def _forward_chain(self, p: Pending, chain: list[tuple[str, str]], route: str, now: float) -> bool:
        """Send a try to the first stage of `chain`, which answers for the whole chain."""
        left_ms = int((p.deadline - now) * 1000)
        if left_ms <= 0:
            return False
        try_id = _try_id(p.id, p.tries + 1)
        req = p.request
        streamed = "".join(p.streamed)
        first, stage = chain[0]
        try_req = replace(req, id=try_id, model=stage, hops=req.hops + 1, deadline_ms=left_ms,
                          origin=req.origin or self.host.node_id, prefix=req.prefix + streamed, stages=tuple(chain),
                          prefix_ids=tuple(p.ids) if p.exact and p.ids else ())  # fmt: skip
        if first == self.host.node_id:
            sent = self.host.serve_tracked(try_req, p.deadline, p.started)
        else:
            sent = self.host.send_peer(first, encode(try_req))
        if not sent:
            self._count("forward_unreachable")
            return False
        p.chain = tuple(chain)
        self._sent(p, first, route, try_id, now, {n: s for n, s in chain if n != self.host.node_id})
        self._count("pipelined")
        return True

    def _sent(self, p: Pending, node: str, route: str, try_id: str, now: float, counted: dict[str, str]) -> None:
        p.move(PendingState.ON_PEER)
        p.target, p.route, p.try_id, p.try_started = node, route, try_id, now
        p.tries += 1
        p.outstanding.update(counted)
        self._by_try[try_id] = p
        for n, model in counted.items():
            self.policy.dispatched(n, model)
        self._count("forwarded")
        if p.tries > 1:
            self._count("retries")

    # ------------------------------------------------------------ bookkeeping

    def _current(self, node: str, try_id: str) -> Pending | None:
        """The request whose current try on `node` this answer belongs to; None for a late or stray answer."""
        p = self._by_try.get(try_id)
        if p is None or p.target != node:
            self._count("duplicate_replies")
            return None
        return p

    def _abandon(
        self, p: Pending, node: str, now: float, queue: int | None = None, *, cancel: bool, reason: str = ""
    ) -> None:
        """Give up the current try (on `node`; on a chain, every node of it: each frees what it holds)."""
        nodes = [n for n, _ in p.chain] if p.chain and p.target == node else [node]
        for n in nodes:
            model = p.outstanding.pop(n, None)
            if model is not None:
                self.policy.completed(n, model)
                if queue is not None and n == node:
                    self.policy.observe_queue(n, model, queue, now)
        if p.target == node:
            if cancel or p.chain:  # a chain's other stages still hold the sequence, whatever the first one said
                frame = encode(Cancel(p.try_id, reason or "try abandoned"))
                for n in nodes:
                    if n == self.host.node_id:
                        self.host.cancel_here(p.try_id, reason)
                    elif n != node or cancel:
                        self.host.send_peer(n, frame)
                        self._count("cancels_sent")
            self._by_try.pop(p.try_id, None)
            p.target = ""
            p.chain = ()
            p.move(PendingState.ROUTING)

    def _release(self, p: Pending, state: PendingState) -> None:
        """Forget `p` as it ends in `state`, and release what the policy counts for it."""
        p.move(state)
        self._pending.pop(p.id, None)
        if p.try_id:
            self._by_try.pop(p.try_id, None)
        for node, model in p.outstanding.items():
            self.policy.completed(node, model)
        p.outstanding.clear()
        p.target = ""

    def _finish(self, p: Pending, msg: Error | bytes, outcome: str, now: float) -> None:
        """Give the client its one answer (an Error, or an encoded answer)."""
        self._release(p, PendingState.ANSWERED)
        if outcome != "ok":
            self._count(f"errors_{outcome}")
        self.host.finished(p.request.model, outcome, now - p.started)
        self.host.send_client(p.client, msg if isinstance(msg, bytes) else encode(msg))


def _try_id(request_id: str, attempt: int) -> str:
    """The id of a request's `attempt`-th try: its own id first, then `<id>#<n>` (hashed when it would be too long)."""
    if attempt == 1:
        return request_id
    suffix = f"#{attempt}"
    if len(request_id) + len(suffix) > _ID_LEN:
        request_id = hashlib.sha256(request_id.encode()).hexdigest()[:32]
    return request_id + suffix
