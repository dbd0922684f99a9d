"""The sockets a node binds for itself: its ROUTER, its PUB, and the wake-up pair its loop sleeps on.

The peer-facing sockets it connects (a DEALER and the SUB per peer) are `_links`' business.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import zmq

from ._links import tcp_options

if TYPE_CHECKING:
    from ._security import Authenticator, MeshKey, Plaintext
    from ._settings import MeshSettings


def bound_port(sock: zmq.Socket[Any]) -> int:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


def bind_router(
    ctx: zmq.Context[Any], s: MeshSettings, security: MeshKey | Plaintext, auth: Authenticator | None
) -> Any:
    """The ROUTER clients and peers send to: unroutable answers raise, frames capped, CURVE + ZAP when keyed."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.MAXMSGSIZE, s.limits.max_frame_bytes)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.SNDHWM, s.hwm)
    router.setsockopt(zmq.RCVHWM, s.hwm)
    tcp_options(router, s.dead_after)
    security.configure_server(router)
    if auth is not None:
        auth.watch(router, f"router:{s.port}")
    router.bind(f"tcp://{s.bind}:{s.port}")
    return router


def bind_pub(
    ctx: zmq.Context[Any], s: MeshSettings, security: MeshKey | Plaintext, auth: Authenticator | None, port: int
) -> Any:
    """The PUB gossip goes out on: at --pub-port, else the ROUTER's port + 1 (any port when that was 0)."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 1000)
    pub.setsockopt(zmq.MAXMSGSIZE, 1024)  # a PUB only ever receives subscriptions
    tcp_options(pub, s.dead_after)
    security.configure_server(pub)
    if auth is not None:
        auth.watch(pub, "pub")
    pub_port = s.pub_port or (port + 1 if s.port else 0)
    pub.bind(f"tcp://{s.bind}:{pub_port}" if pub_port else f"tcp://{s.bind}:*")
    return pub


class Waker:
    """Wakes a thread asleep in a `zmq.Poller` from any other thread: one byte on an inproc PUSH/PULL pair.

    Poll `pull`; when it is readable, `drain()` it and look at what the other threads left (they leave work
    elsewhere first, then wake). One pending wake-up is enough, so a flood of them costs nothing.
    """

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        endpoint = f"inproc://wake-{id(self)}"
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(endpoint)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 1)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(endpoint)
        self._push: Any = push
        self._lock = threading.Lock()  # a ZeroMQ socket is not thread-safe; wake() is called from any thread

    def wake(self) -> None:
        with self._lock:
            if self._push is not None:
                try:
                    self._push.send(b"", zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # a wake-up is already pending, or the pair is closed; either way nothing is lost

    def drain(self) -> None:
        while True:
            try:
                self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def silence(self) -> None:
        """No more wake-ups (before the context closes the pair)."""
        with self._lock:
            self._push = None
