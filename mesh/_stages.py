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
        dealer_of: Callable[[str], zmq.Socket[Any] | None],
    ) -> None:
        self.node_id = node_id
        self.server = server
        self.stats = stats
        self.limits = limits
        self._dealer_of = dealer_of

    # ------------------------------------------------------------ in

    def read(self, router: zmq.Socket[Any], header: zmq.Frame) -> None:
        """A multi-part message on the ROUTER whose first part (after the identity) is `header`: a `Stage` header
        and exactly the tensor frame it announces, or it is dropped and counted as a bad frame."""
        try:
            msg = decode(header.bytes, self.limits)
        except DecodeError as exc:
            log.debug("bad stage header: %s", exc)
            msg = None
        if not isinstance(msg, Stage) or not msg.shape:
            self._skip(router, header)
            return
        tensor = router.recv(_NB, copy=False)
        size = tensor_nbytes(msg.shape, msg.dtype)
        if tensor.more or len(tensor) != size or size > self.limits.max_frame_bytes:
            self._skip(router, tensor)
            return
        self.deliver(msg, tensor.buffer)

    def _skip(self, router: zmq.Socket[Any], part: zmq.Frame) -> None:
        self.stats["bad_frames"] += 1
        while part.more:
            part = router.recv(_NB, copy=False)

    def deliver(self, msg: Stage, tensor: Any) -> None:
        """A stage message for this node (from a peer, or from a stage here to another stage here)."""
        self.stats["stage_messages_in"] += 1
        stage_in = getattr(self.server, "stage_in", None)
        if stage_in is not None and stage_in(msg, tensor):
            return
        self.stats["stage_unknown"] += 1
        if msg.kind == "run":  # tell the pipeline's first stage: its entry then tries another chain
            stage = parse_stage(msg.model)
            why = f"node {self.node_id} does not serve {msg.model}"
            back = Stage(msg.id, stage.model if stage else msg.model, "token", msg.first,
                         data={"code": int(ErrorCode.UNAVAILABLE), "message": why})  # fmt: skip
            self.send(msg.first, back, encode(back), None, None)

    def cancel(self, sequence: str, reason: str) -> None:
        cancel = getattr(self.server, "cancel_stage", None)
        if cancel is not None:
            cancel(sequence, reason or "cancelled by the caller")

    # ------------------------------------------------------------ out

    def send(self, node: str, msg: Stage, header: bytes, tensor: Any, on_fail: FailFn | None) -> None:
        """Send one stage message (header encoded by the caller, off the loop) to `node`'s ROUTER; `on_fail` hears
        of it when the node is gone or its socket cannot take it now."""
        if node == self.node_id:
            self.deliver(msg, tensor)
            return
        dealer = self._dealer_of(node)
        try:
            if dealer is None:
                raise zmq.Again()
            if tensor is None:
                dealer.send(header, _NB)
            else:
                dealer.send(header, _NB_MORE)
                dealer.send(tensor, _NB, copy=False)
        except zmq.ZMQError:
            self.stats["stage_undeliverable"] += 1
            if on_fail is not None:
                on_fail(node, msg)
            return
        self.stats["stage_messages_out"] += 1
        self.stats["stage_bytes_out"] += len(header) + (0 if tensor is None else memoryview(tensor).nbytes)
