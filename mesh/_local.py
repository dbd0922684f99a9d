"""Requests this node serves itself: where each one's answer goes, the executor's chunks and answers sent on to it,
and cancels of work running here.

A part `MeshNode` is composed of. The executor calls back from its worker threads; what arrives there is posted to
the loop, which alone sends to clients.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from protocol import Chunk, Error, ErrorCode, Reply, Request

from ._settings import LocalServer, RequestObserver

TRACKED = b"\0entry"  # the "client" of a try this node's own entry table tracks (a pipeline starting here)


class Local(NamedTuple):
    """A request running on this node's executor, and where its answer goes."""

    client: bytes
    route: str
    seq0: int  # chunk number of its first chunk (after a stream moved here)
    started: float
    where: str  # local | peer


class LocalWork:
    """The requests running on this node's executor, by id."""

    def __init__(
        self,
        node_id: str,
        server: LocalServer,
        stats: collections.Counter[str],
        *,
        send_client: Callable[[bytes, Any], None],
        post: Callable[[str, Any], None],
        observer: Callable[[], RequestObserver | None],
        entry: Any = None,
    ) -> None:
        self.node_id = node_id
        self.server = server
        self.stats = stats
        self._send = send_client
        self._entry = entry  # the node's EntryTable, for tries it tracks itself (TRACKED)
        self._post = post
        self._observer = observer
        self._running: dict[str, Local] = {}
        self._cancelled: set[str] = set()  # stopped by its caller: its answer goes nowhere
        self.loop_ident = 0  # the loop thread's ident, once it runs

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._running

    def get(self, request_id: str) -> Local | None:
        return self._running.get(request_id)

    def submit(
        self, ident: bytes, req: Request, deadline: float, route: str, seq0: int, started: float, where: str
    ) -> bool:
        """Queue `req` on the executor, its answers going to `ident`; False when the executor cannot take it."""
        rid = req.id
        self._running[rid] = Local(ident, route, seq0, started, where)
        ok = self.server.submit(req, deadline, self._on_chunk, self._on_done)
        if not ok:
            self._running.pop(rid, None)
        return ok

    def submit_tracked(self, req: Request, deadline: float, started: float) -> bool:
        """Queue a try whose answers go back to this node's entry table (a pipeline whose first stage is here)."""
        return self.submit(TRACKED, req, deadline, "", 0, started, "local")

    def cancel(self, request_id: str, reason: str) -> None:
        """Stop work running here, whoever asks (a request's id is its caller's capability: see EntryTable.cancel)."""
        if request_id not in self._running:
            return  # finished already
        self._cancelled.add(request_id)
        if not self.server.cancel(request_id, reason or "cancelled by the caller"):
            self._cancelled.discard(request_id)

    def _send_client(self, client: bytes, msg: Any) -> None:
        """An answer goes to the client, or, for a try this node's entry table tracks, back to that table."""
        if client != TRACKED:
            self._send(client, msg)
        elif isinstance(msg, Chunk):
            self._entry.on_chunk(self.node_id, msg, time.monotonic())
        elif type(msg) is Reply:
            self._entry.on_reply(self.node_id, msg, time.monotonic())
        elif isinstance(msg, Error):
            self._entry.on_error(self.node_id, msg, time.monotonic())

    def hand_back(self) -> None:
        """The node stops: every caller of work running here hears UNAVAILABLE (its client retries elsewhere)."""
        for rid, local in list(self._running.items()):
            self._send_client(local.client, Error(rid, ErrorCode.UNAVAILABLE, "node stopped; request handed back",
                                                  self.node_id))  # fmt: skip
        self._running.clear()

    # ------------------------------------------------------------ from the executor (any thread)

    def _on_chunk(self, job: Any, seq: int, data: Any) -> None:
        if threading.get_ident() == self.loop_ident:
            self.chunk(job.request, seq, data)
        else:
            self._post("chunk", (job.request, seq, data))

    def _on_done(self, job: Any, output: Any, meta: Any, code: ErrorCode | None, message: str) -> None:
        if threading.get_ident() == self.loop_ident:
            self.done(job.request, output, meta, code, message)
        else:
            self._post("done", (job.request, output, meta, code, message))

    # ------------------------------------------------------------ on the loop

    def chunk(self, req: Request, seq: int, data: Any) -> None:
        local = self._running.get(req.id)
        if local is None or req.id in self._cancelled:
            return
        observer = self._observer()
        if local.seq0 + seq == 0 and observer is not None:
            observer.first_chunk(req.model, time.monotonic() - local.started)
        self._send_client(local.client, Chunk(req.id, local.seq0 + seq, data, self.node_id, local.route))

    def done(self, req: Request, output: Any, meta: Any, code: ErrorCode | None, message: str) -> None:
        local = self._running.pop(req.id, None)
        if local is None:
            return
        cancelled = req.id in self._cancelled
        self._cancelled.discard(req.id)
        observer = self._observer()
        if observer is not None:
            outcome = "cancelled" if cancelled else "ok" if code is None else code.name.lower()
            observer.completed(req.model, outcome, local.where, time.monotonic() - local.started)
        if cancelled:
            return  # its caller is gone: nobody waits for this answer
        queue = self.server.queue_length(req.model)
        if code is None:
            self._send_client(local.client, Reply(req.id, output, self.node_id, local.route, queue, meta or {}))
        else:
            self.stats[f"errors_{code.name.lower()}"] += 1
            self._send_client(local.client, Error(req.id, code, message, self.node_id, queue))
