"""The sockets a node binds for itself (its ROUTER, its PUB), the TCP options every one of its connections carries,
the wake-up pair its loop sleeps on, and the poller that loop waits in.

The peer-facing sockets it connects (a DEALER and a SUB per peer) are `_links`' business.
"""

from __future__ import annotations

import select
import threading
from typing import TYPE_CHECKING, Any

import zmq

from ._security import GOSSIP_ZAP_DOMAIN

if TYPE_CHECKING:
    from ._identity import MemberIdentity
    from ._security import Authenticator, MeshKey, Plaintext
    from ._settings import MeshSettings


_KEEPALIVE_IDLE_S = 120  # an idle link's one packet every two minutes (stateful firewalls, half-open connections)


def tcp_options(sock: zmq.Socket[Any], dead_after_s: float) -> None:
    """Every TCP connection of a node (its bound sockets' too): unacknowledged data for `dead_after_s` ends the
    connection (ZeroMQ then re-makes it), and an idle one is checked every two minutes."""
    sock.setsockopt(zmq.TCP_MAXRT, max(1000, int(dead_after_s * 1000)))
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, _KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 5)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)


def peer_address(frame: zmq.Frame) -> str | None:
    """The address a ROUTER message came from (ZeroMQ's `Peer-Address`), when the transport knows it."""
    try:
        value = frame.get("Peer-Address")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


def bound_port(sock: zmq.Socket[Any]) -> int:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(endpoint.rsplit(":", 1)[1])


def bind_router(
    ctx: zmq.Context[Any], s: MeshSettings, security: MeshKey | MemberIdentity | Plaintext, auth: Authenticator | None
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
    ctx: zmq.Context[Any],
    s: MeshSettings,
    security: MeshKey | MemberIdentity | Plaintext,
    auth: Authenticator | None,
    port: int,
    pub_port: int = 0,
) -> Any:
    """The PUB gossip goes out on: at `pub_port` or --pub-port, else the ROUTER's port + 1 (any port when that was
    0). With member identities only nodes may subscribe (its own ZAP domain)."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 1000)
    pub.setsockopt(zmq.MAXMSGSIZE, 1024)  # a PUB only ever receives subscriptions
    tcp_options(pub, s.dead_after)
    security.configure_server(pub, GOSSIP_ZAP_DOMAIN)
    if auth is not None:
        auth.watch(pub, "pub")
    pub_port = pub_port or s.pub_port or (port + 1 if s.port else 0)
    pub.bind(f"tcp://{s.bind}:{pub_port}" if pub_port else f"tcp://{s.bind}:*")
    return pub


class SocketPoller:
    """Which of many ZeroMQ sockets have messages, at a cost that does not grow with how many there are.

    `zmq.Poller` asks every registered socket on every call (a node holds two per peer: ~200 us a call at a hundred
    peers, and the loop turns ~50 times a second idle). This one sleeps in epoll on the sockets' notification
    descriptors (`ZMQ_FD`) and asks only the sockets whose descriptor fired, those that had more than one turn's
    drain left, and those `touch`ed since (a send may consume the notification of a message that arrived just
    before it, so whoever sends on a polled socket touches it). Same calls as `zmq.Poller` otherwise.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._by_fd: dict[int, zmq.Socket[Any]] = {}
        self._fd_of: dict[zmq.Socket[Any], int] = {}
        self._recheck: set[zmq.Socket[Any]] = set()

    def register(self, sock: zmq.Socket[Any], flags: int = zmq.POLLIN) -> None:
        if sock in self._fd_of:
            return
        fd = int(sock.getsockopt(zmq.FD))
        self._by_fd[fd] = sock
        self._fd_of[sock] = fd
        self._epoll.register(fd, select.EPOLLIN)
        self._recheck.add(sock)  # messages may be waiting already: their notification came before we listened

    def unregister(self, sock: zmq.Socket[Any]) -> None:
        fd = self._fd_of.pop(sock, None)
        self._recheck.discard(sock)
        if fd is None:
            return
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # the descriptor went with its socket already

    def touch(self, sock: zmq.Socket[Any]) -> None:
        """`sock` was sent on: ask it again on the next poll."""
        if sock in self._fd_of:
            self._recheck.add(sock)

    def poll(self, timeout_ms: int) -> list[tuple[zmq.Socket[Any], int]]:
        """The sockets with messages to read, waiting up to `timeout_ms` (none: at once) for one."""
        ready = self._ready(self._recheck)
        self._recheck = set()
        fired = self._epoll.poll(0 if ready else max(0, timeout_ms) / 1000)
        ready.update(self._ready(self._by_fd[fd] for fd, _ in fired if fd in self._by_fd))
        self._recheck = set(ready)  # read once more next turn: a drain is bounded, and the loop may send on it
        return [(sock, zmq.POLLIN) for sock in ready]

    @staticmethod
    def _ready(socks: Any) -> set[zmq.Socket[Any]]:
        out = set()
        for sock in socks:
            if not sock.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                out.add(sock)
        return out

    def close(self) -> None:
        self._epoll.close()


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
