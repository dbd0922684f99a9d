"""Pipeline stages' traffic through this node: `Stage` messages in on the ROUTER (a header frame, then the tensor frame
its shape announces), out on a peer's DEALER for the stage engines, and cancels of the sequences stages hold here.

A part `MeshNode` is composed of, on its loop thread. The tensor travels as ZeroMQ gave it: received with
`copy=False`, the engine reads it through a view of the frame; sent with `copy=False` from the rows the model wrote
(pyzmq copies only frames under its copy threshold, 64 KiB: one decode token's 2 KiB, not a prompt chunk).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import zmq

from protocol import DecodeError, ErrorCode, Limits, Stage, decode, encode, parse_stage, tensor_nbytes

from ._local import LocalWork
from ._peers import PeerTable

log = logging.getLogger("lanmesh.mesh")

_NB, _NB_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)
FailFn = Callable[[str, Stage], None]  # (node, message) that could not be sent


class StageTraffic:
    """Stage messages in and out of one node (see the module docstring)."""

    def __init__(
        self,
        node_id: str,
        server: Any,
        stats: collections.Counter[str],
        limits: Limits,
        peers: PeerTable,
        local: LocalWork,
    ) -> None:
        self.node_id = node_id
        self.server = server
        self.stats = stats
        self.limits = limits
        self._peers = peers
        self._local = local

    # ------------------------------------------------------------ in

    def read(self, router: zmq.Socket[Any], part: zmq.Frame) -> None:
        """A multi-part message on the ROUTER whose first part (after the identity) is `part`: one or more `Stage`
        headers, each followed by exactly the tensor frame it announces (if any), or it is dropped whole and counted
        as a bad frame."""
        items: list[tuple[Stage, Any]] = []
        while True:
            try:
                msg = decode(part.bytes, self.limits)
            except DecodeError as exc:
                log.debug("bad stage header: %s", exc)
                msg = None
            if not isinstance(msg, Stage):
                self.skip(router, part)
                return
            tensor = None
            if msg.shape:
                if not part.more:
                    self.stats["bad_frames"] += 1
                    return
                frame = router.recv(_NB, copy=False)
                size = tensor_nbytes(msg.shape, msg.dtype)
                if len(frame) != size or size > self.limits.max_frame_bytes:
                    self.skip(router, frame)
                    return
                tensor, part = frame.buffer, frame
            items.append((msg, tensor))
            if not part.more:
                break
            part = router.recv(_NB, copy=False)
        self.deliver(items)

    def skip(self, router: zmq.Socket[Any], part: zmq.Frame) -> None:
        self.stats["bad_frames"] += 1
        while part.more:
            part = router.recv(_NB, copy=False)

    def deliver(self, items: list[tuple[Stage, Any]]) -> None:
        """Stage messages for this node (from a peer, or from a stage here to another stage here)."""
        self.stats["stage_messages_in"] += len(items)
        stage_in = getattr(self.server, "stage_in", None)
        unknown = stage_in(items) if stage_in is not None else [msg for msg, _ in items]
        for msg in unknown:
            self.stats["stage_unknown"] += 1
            if msg.kind == "run":  # tell the pipeline's first stage: its entry then tries another chain
                stage = parse_stage(msg.model)
                why = f"node {self.node_id} does not serve {msg.model}"
                back = Stage(msg.id, stage.model if stage else msg.model, "token", msg.first,
                             data={"code": int(ErrorCode.UNAVAILABLE), "message": why})  # fmt: skip
                self.send(msg.first, [(back, encode(back), None)], None)

    def cancel_here(self, request_id: str, reason: str) -> None:
        """Stop a request running here (its job) and free a stage's sequence of that id held here."""
        self._local.cancel(request_id, reason)
        cancel = getattr(self.server, "cancel_stage", None)
        if cancel is not None:
            cancel(request_id, reason or "cancelled by the caller")

    # ------------------------------------------------------------ out

    def send(self, node: str, items: list[tuple[Stage, bytes, Any]], on_fail: FailFn | None) -> None:
        """Send stage messages (each with its header encoded by the caller, off the loop, and its tensor or None) to
        `node`'s ROUTER as one multi-part message; `on_fail` hears of each when the node is gone or its socket
        cannot take them now."""
        if node == self.node_id:
            self.deliver([(msg, tensor) for msg, _, tensor in items])
            return
        peer = self._peers.get(node)
        dealer = None if peer is None else peer.dealer
        parts = [p for _, header, tensor in items for p in (header, tensor) if p is not None]
        try:
            if dealer is None:
                raise zmq.Again()
            for part in parts[:-1]:
                dealer.send(part, _NB_MORE, copy=False)
            dealer.send(parts[-1], _NB, copy=False)
        except zmq.ZMQError:
            self.stats["stage_undeliverable"] += len(items)
            if on_fail is not None:
                for msg, _, _ in items:
                    on_fail(node, msg)
            return
        self.stats["stage_messages_out"] += len(items)
        self.stats["stage_bytes_out"] += sum(memoryview(p).nbytes for p in parts)
