"""What stands between the LAN and the gateway's app: connection caps, header and body deadlines, body size, and
cancelling the request of a caller who went away.

A hostile host must not be able to lock others out. Connections are capped per peer address below the global cap
(past it, a new connection from that address is refused with a 429), and when the gateway is full a connection that
is *waiting* (it has not sent a complete request: a slow or idle client, a keep-alive connection between requests)
is closed to make room, taken from the address that holds the most connections. A connection that is sending or
awaiting a response is never closed to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal, Protocol

from uvicorn.protocols.http.h11_impl import H11Protocol

from mesh import RejectionLog

from .bodies import ApiError
from .feed import RequestFeed
from .metrics import NodeMetrics

log = logging.getLogger("lanmesh.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 8 * 1024 * 1024  # the mesh's frame limit: a larger body could not travel anyway
HEADER_TIMEOUT_S = 10.0  # request line + headers must arrive within this (uvicorn alone has no such limit)
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this after the headers
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 512  # open connections at most, all addresses together
MAX_CONNECTIONS_PER_IP = 64  # open connections at most from one address (loopback included)

DropReason = Literal["per_ip_limit", "full", "shed", "header_timeout"]


class Connection(Protocol):
    """What the book needs of a connection: to close it when room must be made."""

    def close_quietly(self) -> None: ...


class ConnectionBook:
    """Every open HTTP connection by peer address, and which are waiting; decides who gets in when it is full.

    Only the gateway's event loop touches it. `admit` is asked for each new connection; the protocol reports when
    a request starts (`busy`) and when its response has ended (`waiting`).
    """

    def __init__(
        self, max_total: int | None = None, max_per_ip: int | None = None, metrics: NodeMetrics | None = None
    ) -> None:
        self.max_total = MAX_CONNECTIONS if max_total is None else max_total
        self.max_per_ip = MAX_CONNECTIONS_PER_IP if max_per_ip is None else max_per_ip
        self.metrics = metrics
        self._by_ip: dict[str, dict[Connection, None]] = {}  # per address, in order of arrival
        self._ip_of: dict[Connection, str] = {}
        self._waiting: set[Connection] = set()

    def __len__(self) -> int:
        return len(self._ip_of)

    def from_ip(self, ip: str) -> int:
        return len(self._by_ip.get(ip, ()))

    def refusal_for(self, ip: str) -> DropReason | None:
        """Why a new connection from `ip` would be refused now, or None (room is there, or can be made)."""
        if len(self._by_ip.get(ip, ())) >= self.max_per_ip:
            return "per_ip_limit"  # refused outright, not room made among its own: cheapest for a host that reconnects
        if len(self._ip_of) >= self.max_total and self._shed_candidate() is None:
            return "full"
        return None

    def admit(self, conn: Connection, ip: str) -> DropReason | None:
        """Take `conn` in (closing a waiting one if that makes room), or say why it is refused."""
        refused = self.refusal_for(ip)
        if refused is not None:
            self.dropped(refused)
            return refused
        if len(self._ip_of) >= self.max_total:
            victim = self._shed_candidate()
            assert victim is not None  # refusal_for found one
            self._shed(victim)
        self._by_ip.setdefault(ip, {})[conn] = None
        self._ip_of[conn] = ip
        self._waiting.add(conn)
        self._count()
        return None

    def busy(self, conn: Connection) -> None:
        self._waiting.discard(conn)

    def waiting(self, conn: Connection) -> None:
        if conn in self._ip_of:
            self._waiting.add(conn)

    def remove(self, conn: Connection) -> None:
        ip = self._ip_of.pop(conn, None)
        if ip is None:
            return
        self._waiting.discard(conn)
        mine = self._by_ip[ip]
        del mine[conn]
        if not mine:
            del self._by_ip[ip]
        self._count()

    def dropped(self, reason: DropReason) -> None:
        if self.metrics is not None:
            self.metrics.http_connections_dropped.labels(reason).inc()

    def _shed_candidate(self) -> Connection | None:
        """The oldest waiting connection of the address that holds the most connections."""
        for _ip, conns in sorted(self._by_ip.items(), key=lambda item: -len(item[1])):
            victim = next((c for c in conns if c in self._waiting), None)
            if victim is not None:
                return victim
        return None

    def _shed(self, victim: Connection) -> None:
        self.remove(victim)
        self.dropped("shed")
        victim.close_quietly()

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.http_connections.set(len(self._ip_of))


def refusal(reason: DropReason, book: ConnectionBook) -> bytes:
    """The whole response to a connection refused before its request was read (then it is closed)."""
    if reason == "per_ip_limit":
        status, phrase, message = 429, "Too Many Requests", f"this address holds {book.max_per_ip} connections here"
    else:
        status, phrase, message = 503, "Service Unavailable", "every connection of this gateway is busy"
    error = {"message": f"{message}; retry shortly", "type": "rate_limit_error", "param": None}
    body = json.dumps({"error": {**error, "code": "too_many_connections"}}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "retry-after: 1\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket, so one flood cannot hog the loop
ACCEPT_PAUSE_S = 0.1  # accepting pauses this long when accept() itself fails (out of file descriptors)


class Listener:
    """Accepts the gateway's connections itself, and refuses those the `ConnectionBook` turns away at the door.

    asyncio's own accept path costs about 200 us of Python per connection (a task, a transport, a protocol)
    before anyone can look at the address; a host reconnecting as fast as it can would spend that, under the
    GIL the mesh loop shares, on every refusal. Here a refusal is an accept, a send and a close; an admitted
    connection goes on to `loop.connect_accepted_socket` and the usual protocol.
    """

    def __init__(self, sock: socket.socket, book: ConnectionBook, make_protocol: Callable[[], asyncio.Protocol]):
        self.sock = sock
        self.book = book
        self.make_protocol = make_protocol
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._opening: set[asyncio.Task[Any]] = set()
        self._errors = RejectionLog()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._resume()

    def stop(self) -> None:
        if self._loop is not None and self._reading:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False
        self._loop = None

    def _resume(self) -> None:
        if self._loop is not None and not self._reading:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._reading = True

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: let the backlog wait a moment
                line = self._errors.note("http_accept_failed", "listener", str(exc))
                if line is not None:
                    log.warning("the HTTP gateway could not accept a connection: %s", line)
                self._loop.remove_reader(self.sock.fileno())
                self._reading = False
                self._loop.call_later(ACCEPT_PAUSE_S, self._resume)
                return
            ip = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            refused = self.book.refusal_for(ip)
            if refused is not None:
                self.book.dropped(refused)
                _refuse(conn, refusal(refused, self.book))
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(self.make_protocol, conn)
        except OSError:
            conn.close()  # it went away before it was set up


def _refuse(conn: socket.socket, answer: bytes) -> None:
    """Send a refusal on a just-accepted socket and close it (without a transport: nothing else to tear down)."""
    try:
        conn.setblocking(False)
        conn.send(answer)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(65536)  # what the caller already sent: unread, it would turn our close into a reset
    except OSError:
        pass
    finally:
        conn.close()


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, plus the `ConnectionBook`'s caps and a deadline for the request line and headers.

    uvicorn times out idle keep-alive connections only after a response; a client that connects and trickles its
    headers would hold a connection for ever. (uvicorn's own `limit_concurrency` counted such connections and
    answered 503 to everyone else once they filled it, so it is not used.)
    """

    _head_timer: asyncio.TimerHandle | None = None
    _refused = False

    def __init__(self, *args: Any, book: ConnectionBook, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.book = book

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Asked before uvicorn sets the connection up: a refusal costs as little as it can (a host may keep
        # reconnecting as fast as it can), and uvicorn never learns of a refused connection.
        peer = transport.get_extra_info("peername")
        refused = self.book.admit(self, str(peer[0]) if isinstance(peer, tuple) and peer else "?")
        if refused is not None:
            self._refused = True
            transport.write(refusal(refused, self.book))
            transport.close()
            return
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.book.remove(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self.book.busy(self)
            self._cancel_head_timer()  # a request's headers are in: the body and the app have their own limits

    def on_response_complete(self) -> None:
        # Before super(): it may start a pipelined request, which marks the connection busy again.
        self.book.waiting(self)
        self._arm_head_timer()
        super().on_response_complete()

    def close_quietly(self) -> None:
        """Close a waiting connection to make room (nothing is in progress on it, so nothing is owed)."""
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.book.dropped("header_timeout")
            self.transport.close()


class BodyGuard:
    """ASGI middleware in front of the app: body size and read-time limits, HTTP metrics, and cancellation.

    The body is read here in full (at most MAX_BODY_BYTES, within BODY_TIMEOUT_S) and replayed to the app, so an
    oversized or trickled body is refused before any handler runs. The app then runs as a task of its own, and a
    caller who disconnects before the response has ended cancels it: the handler's mesh request is cancelled with
    it (its future, or its stream), instead of running on for nobody.
    """

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, feed: RequestFeed | None, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.feed = feed
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500
        ended = False
        entry = self.feed.open(scope["path"]) if self.feed is not None else None  # the web console's feed

        async def send_and_note(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                status = 499  # the caller left while sending its body (nginx's name for it)
                return
            if isinstance(body, ApiError):
                await body.response()(scope, receive, send_and_note)
                return
            gone = asyncio.Event()
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()  # after the body only http.disconnect comes; the watch below reads it
                return {"type": "http.disconnect"}

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            app = asyncio.ensure_future(self.app(scope, replay, send_and_note))
            watch = asyncio.ensure_future(watch_disconnect())
            try:
                await asyncio.wait({app, watch}, return_when=asyncio.FIRST_COMPLETED)
                if not app.done() and not ended:
                    app.cancel()  # the caller is gone: stop its request (an ended response just finishes)
                    status = 499 if status == 500 else status
                with contextlib.suppress(asyncio.CancelledError):
                    await app
            finally:
                watch.cancel()
                if not app.done():
                    app.cancel()  # this task itself was cancelled (server shutdown): take the app with it
        finally:
            self.metrics.http_done(endpoint, status, time.monotonic() - started)
            if entry is not None and self.feed is not None:
                self.feed.file(entry, status, time.monotonic() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | ApiError | None:
        """The whole body; an ApiError when it is too large or too slow; None when the caller left."""
        close = {"Connection": "close"}
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                return ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", headers=close)
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        return ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", headers=close)
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return ApiError(408, f"the body did not arrive within {BODY_TIMEOUT_S:g}s", headers=close)
        return b"".join(parts)
