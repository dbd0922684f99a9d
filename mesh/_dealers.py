"""The client's DEALER sockets, one per node, shared by `Client` and `AsyncClient`: their options, what their
connection events mean to the `CallTable`, and how they close."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import zmq

from ._keyfiles import client_security
from ._security import handshake_failure

if TYPE_CHECKING:
    from ._calls import CallTable

log = logging.getLogger(__name__)

_HWM = 100_000
_MAX_FRAME = 16 * 1024 * 1024
_RECONNECT_MS = 100
_RECONNECT_MAX_MS = 1000
# On close, frames still queued (the Cancels of calls in flight) get this long to leave; a socket with nothing
# queued closes at once.
_FLUSH_ON_CLOSE_MS = 100
MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class ClientSecurity(Protocol):
    """What `security=` takes: something that configures a client DEALER before it connects to `endpoint` (CURVE
    keys: the mesh key, or a member identity and the key it expects of that node)."""

    def configure_client(self, sock: zmq.Socket[Any], endpoint: str | None = None, server_key: str = "") -> None: ...


class DealerOptions:
    """How every DEALER of one client is set up: the ones it was given and the ones it learns later alike."""

    def __init__(self, *, heartbeat: float, dead_after: float, security: ClientSecurity | None) -> None:
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        # None: whatever this machine is set up with ($LANMESH_KEY_FILE, the default key file, or plaintext),
        # looked up once so a node learned later gets the same key as the first.
        self.security = security if security is not None else client_security()
        # A member identity's certificate goes first on each new connection, so the node knows who this is.
        frame = getattr(self.security, "certificate_frame", None)
        self.credentials: bytes | None = frame() if frame is not None else None
        self._learn_status = getattr(self.security, "learn_status", None)
        self._resolve = getattr(self.security, "resolve", None)

    def configure(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        """Options for a DEALER to one node: fast failure detection and no queueing towards a dead peer."""
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no pipe until the handshake completes: a send to a dead node fails at once
        sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(self.heartbeat * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(self.dead_after * 1000)))
        # The node may keep our connection through pauses of ours longer than we tolerate of it: a client that
        # stalls (GC, suspend) loses nothing by being dropped, but needs no hurry either.
        sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(self.dead_after * 3000)))
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        self.security.configure_client(sock, endpoint)

    def learn_status(self, rows: list[Any]) -> None:
        """A node's status rows: a member identity learns the keys of the nodes they list."""
        if self._learn_status is not None:
            self._learn_status(rows)

    def open(self, ctx: zmq.Context[Any], endpoint: str, *, resolve: bool = True) -> tuple[Any, Any]:
        """A connected DEALER to `endpoint` and the monitor socket that reports its connection events. A member
        identity that knows no key for the node there asks the nodes it knows first, when `resolve` (a node the
        client was given); `MeshKeyError` if none tells."""
        if resolve and self._resolve is not None:
            self._resolve(endpoint)
        dealer = ctx.socket(zmq.DEALER)
        try:
            self.configure(dealer, endpoint)
            monitor = dealer.get_monitor_socket(MONITOR_EVENTS)
        except zmq.ZMQError:
            dealer.close(0)
            raise
        try:
            dealer.connect(endpoint)
        except zmq.ZMQError:
            close_dealer(dealer, monitor, flush=False)
            raise
        return dealer, monitor


def connect_dealer(sock: zmq.Socket[Any], endpoint: str, security: ClientSecurity) -> None:
    """Connect a DEALER of one's own (a command line tool's, a probe's) to the node at `endpoint` the way a client
    does: the keys `security` expects of it, then (a member identity) its certificate first."""
    resolve = getattr(security, "resolve", None)
    if resolve is not None:
        resolve(endpoint)
    security.configure_client(sock, endpoint)
    sock.connect(endpoint)
    frame = getattr(security, "certificate_frame", None)
    if frame is not None:
        try:
            sock.send(frame(), zmq.NOBLOCK)
        except zmq.Again:
            pass  # IMMEDIATE and not connected: the caller's first send fails alike


def close_dealer(dealer: zmq.Socket[Any], monitor: zmq.Socket[Any], *, flush: bool = True) -> None:
    """Close one DEALER and its monitor; `flush`: frames already queued (Cancels) still go out, briefly."""
    if not dealer.closed:
        dealer.disable_monitor()
    monitor.close(0)
    dealer.close(_FLUSH_ON_CLOSE_MS if flush else 0)


def close_all(
    ctx: zmq.Context[Any] | None, dealers: Iterable[zmq.Socket[Any]], monitors: Iterable[zmq.Socket[Any]]
) -> None:
    """Close a client's sockets (queued frames get _FLUSH_ON_CLOSE_MS to leave), then its own context; None: the
    context is shared with others and stays (its I/O thread sends what is queued)."""
    for monitor in monitors:
        monitor.close(0)
    for dealer in dealers:
        if not dealer.closed:
            dealer.disable_monitor()
            dealer.close(_FLUSH_ON_CLOSE_MS)
    if ctx is not None:
        ctx.term()  # waits for queued frames to leave, at most _FLUSH_ON_CLOSE_MS


def check_client_options(timeout: float, heartbeat: float, dead_after: float, try_timeout: float | None) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not 0 < heartbeat < dead_after:
        raise ValueError(f"need 0 < heartbeat < dead_after, got heartbeat={heartbeat}, dead_after={dead_after}")
    if try_timeout is not None and not try_timeout > 0:
        raise ValueError(f"try_timeout must be positive or None, got {try_timeout}")


def apply_monitor_event(
    table: CallTable, endpoint: str, event: int, now: float, introduce: Callable[[str], object] | None = None
) -> None:
    """Feed one socket-monitor event to the table: a completed handshake is 'up', a disconnect is 'down'. On a new
    connection `introduce(endpoint)` goes first (a member identity's certificate), before any call is sent there."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        if introduce is not None:
            introduce(endpoint)
        table.node_up(endpoint, now)
    elif event == zmq.EVENT_DISCONNECTED:
        table.node_down(endpoint, now)
    elif event & _HANDSHAKE_FAILED:
        why = handshake_failure(endpoint, event)
        log.warning("%s", why)
        # After a protocol mismatch ZeroMQ does not reconnect: that refusal is final.
        table.node_refused(endpoint, why, now, final=bool(event & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL))


__all__ = [
    "MONITOR_EVENTS",
    "ClientSecurity",
    "DealerOptions",
    "apply_monitor_event",
    "check_client_options",
    "close_all",
    "close_dealer",
    "connect_dealer",
]
