"""Operators' commands and model files (`Admin`, `Fetch`), and joins (`Join`): answered by the node on worker threads,
never on the mesh loop, since a model load takes minutes, a file read waits out the sender's rate cap, and the
authority writes its state to disk before it answers.

The loop hands each message over with `submit` and sends the answer when the worker posts it back; `done` settles
the count of pending work. Each kind has its own pool and its own bound, past which the caller hears `OVERLOADED`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from protocol import Admin, Error, ErrorCode, Fetch, Join, encode

from ._members import MEMBERSHIP_ACTIONS

log = logging.getLogger("lanmesh.mesh")

# kind -> (worker threads, most pending at once)
POOLS: dict[type, tuple[int, int]] = {Admin: (2, 16), Fetch: (3, 64), Join: (1, 16)}


class Services:
    """The node's Admin/Fetch handler (`handler`, set by the node; None: it answers neither), the handler of joins
    and of the admins' membership actions (`membership`, given the sender's key; None: no member identities), and
    their pools."""

    def __init__(self, node_id: str, post: Callable[[str, Any], None]) -> None:
        self.node_id = node_id
        self.handler: Callable[[Admin | Fetch], Any] | None = None
        self.membership: Callable[[Join | Admin, str], Any] | None = None
        self.refused = 0
        self._post = post
        self._pools = {
            kind: (ThreadPoolExecutor(threads, thread_name_prefix=f"lanmesh-{kind.__name__.lower()}"), bound)
            for kind, (threads, bound) in POOLS.items()
        }
        self._pending: collections.Counter[type] = collections.Counter()

    def submit(self, ident: bytes, msg: Admin | Fetch | Join, uid: str = "") -> Error | None:
        """Queue `msg` for a worker (its answer is posted to the loop as ("answer", (ident, frame, kind)), exactly
        once, the frame None only when not even an error could be encoded); or the error to answer at once: nobody
        handles it here, or too many are pending. `uid`: the sender's key (member identities)."""
        kind = type(msg)
        handler: Callable[[Any], Any] | None = self.handler
        if isinstance(msg, Join) or (isinstance(msg, Admin) and msg.action in MEMBERSHIP_ACTIONS):
            membership = self.membership
            handler = (lambda m: membership(m, uid)) if membership is not None else None
            if handler is None:
                why = "this mesh runs on one shared key: it has no authority to invite, join or revoke (lanmesh init)"
                return Error(msg.id, ErrorCode.BAD_REQUEST, why, self.node_id)
        if handler is None:
            return Error(msg.id, ErrorCode.BAD_REQUEST, f"this node takes no {kind.__name__}", self.node_id)
        pool, bound = self._pools[kind]
        if self._pending[kind] >= bound:
            self.refused += 1
            return Error(msg.id, ErrorCode.OVERLOADED, f"too many {kind.__name__} requests here", self.node_id)
        self._pending[kind] += 1

        def run() -> None:
            frame: bytes | None = None
            try:
                try:
                    answer = handler(msg)
                except Exception as exc:  # a handler bug answers its caller; the pool thread lives on
                    log.exception("%s %s failed", kind.__name__, msg.id)
                    answer = Error(msg.id, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", self.node_id)
                try:
                    frame = encode(answer)
                except Exception as exc:  # an answer msgpack cannot carry: the caller hears why, not nothing
                    log.exception("%s %s: the answer cannot be encoded", kind.__name__, msg.id)
                    why = f"the answer could not be sent: {type(exc).__name__}: {str(exc)[:200]}"
                    frame = encode(Error(msg.id, ErrorCode.INTERNAL, why, self.node_id))
            finally:
                # Always posted, even empty-handed: the loop counts every answer down, or the bound fills for good.
                self._post("answer", (ident, frame, kind))

        pool.submit(run)
        return None

    def done(self, kind: type) -> None:
        """An answer of `kind` was sent (on the loop)."""
        self._pending[kind] -= 1

    def close(self) -> None:
        for pool, _ in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
