"""The embeddable client: `Client`, caller threads around one I/O thread that owns the ZeroMQ sockets.

The failover logic lives in `_calls.CallTable` (shared with `AsyncClient`); this module moves frames, socket events
and timers between it and the sockets, and hands outcomes to callers.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Literal, Protocol, cast, overload

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import Task

from ._calls import Call, CallTable, PingReply, Result, Sink, request_call
from ._security import client_security, handshake_failure
from .errors import InternalError, LanmeshError, MeshUnavailable, ProtocolError

log = logging.getLogger(__name__)

_HWM = 100_000
_MAX_FRAME = 16 * 1024 * 1024
_RECONNECT_MS = 100
_RECONNECT_MAX_MS = 1000
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_DRAIN_BATCH = 512  # frames read from one socket before the others get a turn
_CLOSE_JOIN_S = 2.0

_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.%A-Za-z]+")


# ----------------------------------------------------------------- addresses


def parse_endpoints(nodes: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise node addresses (`host:port`, `tcp://host:port`, `[v6]:port`, comma-separated) to zmq endpoints."""
    if isinstance(nodes, str):
        items = nodes.split(",")
    elif isinstance(nodes, Sequence) and all(isinstance(n, str) for n in nodes):
        items = list(nodes)
    else:
        raise ValueError(f"nodes must be 'host:port' or a list of them, got {type(nodes).__name__}")
    endpoints: list[str] = []
    for raw in items:
        ep = _endpoint(raw)
        if ep not in endpoints:
            endpoints.append(ep)
    if not endpoints:
        raise ValueError("no node address given; expected 'host:port' (e.g. '192.168.1.20:7700')")
    return tuple(endpoints)


def _endpoint(raw: str) -> str:
    text = raw.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    elif "://" in text:
        raise ValueError(f"node address {raw!r}: only tcp:// addresses are supported")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        ok_host = bool(sep) and _IPV6_RE.fullmatch(host) is not None and ":" in host
        shown = f"[{host}]"
    else:
        host, sep, port = text.rpartition(":")
        ok_host = bool(sep) and _HOST_RE.fullmatch(host) is not None
        shown = host
    if not ok_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"node address {raw!r} is not 'host:port' with a port in 1..65535 (e.g. '10.0.0.5:7700')")
    return f"tcp://{shown}:{int(port)}"


def discover_endpoints(timeout: float, interfaces: list[str] | None) -> tuple[str, ...]:
    """Browse mDNS for `timeout` seconds and return the ROUTER endpoints of the nodes that answered."""
    from . import _discovery  # zeroconf is only needed by callers that discover

    found = _discovery.browse(timeout, interfaces)
    hosts = [f"[{a.addr.host}]:{a.addr.port}" if ":" in a.addr.host else f"{a.addr.host}:{a.addr.port}" for a in found]
    if not hosts:
        raise MeshUnavailable(f"no lanmesh node answered mDNS within {timeout:g}s")
    return parse_endpoints(hosts)


# ----------------------------------------------------------------- sockets (shared with the asyncio client)


class ClientSecurity(Protocol):
    """What `security=` takes: something that configures a client DEALER before it connects (e.g. CURVE keys)."""

    def configure_client(self, sock: zmq.Socket[Any]) -> None: ...


def configure_dealer(
    sock: zmq.Socket[Any], endpoint: str, *, heartbeat: float, dead_after: float, security: ClientSecurity | None
) -> None:
    """Options for a DEALER to one node: fast failure detection and no queueing towards a dead peer."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, _HWM)
    sock.setsockopt(zmq.RCVHWM, _HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # no pipe until the handshake completes: a send to a dead node fails at once
    sock.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MAX_MS)
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(dead_after * 1000)))
    # The node may keep our connection through pauses of ours longer than we tolerate of it: a client that
    # stalls (GC, suspend) loses nothing by being dropped, but needs no hurry either.
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(dead_after * 3000)))
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    # None: whatever this machine is set up with ($LANMESH_KEY_FILE, the default key file, or plaintext).
    (security if security is not None else client_security()).configure_client(sock)


def check_client_options(timeout: float, heartbeat: float, dead_after: float, try_timeout: float | None) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not 0 < heartbeat < dead_after:
        raise ValueError(f"need 0 < heartbeat < dead_after, got heartbeat={heartbeat}, dead_after={dead_after}")
    if try_timeout is not None and not try_timeout > 0:
        raise ValueError(f"try_timeout must be positive or None, got {try_timeout}")


def generation_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    """The sampling parameters a caller set (unset ones are left to the node's defaults)."""
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return params


def embeddings_of(result: Result) -> list[list[float]]:
    """The vectors in an embed result (a list of vectors, or a map holding them under `embeddings`)."""
    out = result.output
    if isinstance(out, dict):
        out = out.get("embeddings")
    if isinstance(out, list) and all(isinstance(v, list) for v in out):
        return out
    raise ProtocolError(f"an embed result must hold a list of vectors, got {type(out).__name__}", node=result.node)


# ----------------------------------------------------------------- the threaded client


class _FutureSink:
    __slots__ = ("future",)

    def __init__(self, future: Future[Any]) -> None:
        self.future = future

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a future sink never streams")

    def done(self, value: Any) -> None:
        try:
            self.future.set_result(value)
        except InvalidStateError:
            pass  # the caller cancelled the future meanwhile; nobody is waiting for the value

    def fail(self, exc: LanmeshError) -> None:
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            pass  # as above: cancelled by the caller


class _Waiter:
    """A one-shot slot one caller thread blocks on; a bare lock is CPython's cheapest cross-thread signal."""

    __slots__ = ("_lock", "value", "error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.value: Any = None
        self.error: LanmeshError | None = None

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a waiter never streams")

    def done(self, value: Any) -> None:
        self.value = value
        self._lock.release()

    def fail(self, exc: LanmeshError) -> None:
        self.error = exc
        self._lock.release()

    def wait(self) -> Any:
        self._lock.acquire()
        if self.error is not None:
            raise self.error
        return self.value


class _End:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _QueueSink:
    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[tuple[str, str] | _End | LanmeshError] = queue.SimpleQueue()

    def chunk(self, data: str, node: str) -> None:
        self.events.put((data, node))

    def done(self, value: Any) -> None:
        self.events.put(_End(value))

    def fail(self, exc: LanmeshError) -> None:
        self.events.put(exc)


class Stream(Iterator[str]):
    """A streamed answer: iterate for text deltas, in order, across node failovers.

    `node` names the node that sent the latest delta; `result` is set once the stream has ended.
    Breaking out early? Call `close()` (or use `with`) so the request stops counting as in flight.
    """

    def __init__(self, sink: _QueueSink, cancel: Callable[[], None]) -> None:
        self._sink = sink
        self._cancel: Callable[[], None] | None = cancel
        self.node = ""
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if self._cancel is None:
            raise StopIteration
        event = self._sink.events.get()
        if isinstance(event, tuple):
            self.node = event[1]
            return event[0]
        self._cancel = None
        if isinstance(event, _End):
            self.result = event.value
            if self.result is not None:
                self.node = self.result.node
            raise StopIteration
        raise event

    def close(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_cancel", None) is not None:
            self.close()


_Command = tuple[Literal["start"], Call] | tuple[Literal["cancel"], int] | tuple[Literal["close"], None]


class Client:
    """A thread-safe client for a lanmesh mesh: many requests may be in flight from many threads at once.

    One I/O thread owns every ZeroMQ socket; callers hand it calls and wait on futures. When the node carrying a
    request drops (crash, hang caught by heartbeats), the request is re-sent to another node, so a caller sees an
    error only when its deadline passes, no node is reachable, or the mesh gives an answer a retry cannot change.
    """

    def __init__(
        self,
        nodes: str | Sequence[str],
        *,
        timeout: float = 60.0,
        heartbeat: float = 0.25,
        dead_after: float = 1.0,
        try_timeout: float | None = None,
        security: ClientSecurity | None = None,
        client_id: str | None = None,
    ) -> None:
        endpoints = parse_endpoints(nodes)
        check_client_options(timeout, heartbeat, dead_after, try_timeout)
        self.timeout = timeout
        self.client_id = client_id or f"client-{os.urandom(4).hex()}"
        self._ctx = zmq.Context()
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._monitors: dict[str, zmq.Socket[bytes]] = {}
        try:
            for ep in endpoints:
                dealer = self._ctx.socket(zmq.DEALER)
                self._dealers[ep] = dealer
                configure_dealer(dealer, ep, heartbeat=heartbeat, dead_after=dead_after, security=security)
                self._monitors[ep] = dealer.get_monitor_socket(_MONITOR_EVENTS)
                dealer.connect(ep)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ValueError(f"cannot connect to {ep}: {exc}") from exc
        self._table = CallTable(endpoints, client_id=self.client_id, transmit=self._transmit, try_timeout=try_timeout)
        self._commands: deque[_Command] = deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"lanmesh-{self.client_id}", daemon=True)
        self._thread.start()

    @classmethod
    def discover(cls, timeout: float = 2.0, *, interfaces: list[str] | None = None, **kwargs: Any) -> Client:
        """A client for the nodes that answer mDNS within `timeout` seconds (raises MeshUnavailable if none)."""
        return cls(discover_endpoints(timeout, interfaces), **kwargs)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._table.endpoints

    @property
    def connected(self) -> tuple[str, ...]:
        """The node endpoints this client has a live connection to right now."""
        return self._table.connected

    # ------------------------------------------------------------- requests

    def submit(
        self,
        model: str,
        task: str | Task,
        input: Any,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        priority: int = 0,
        require: dict[str, str] | None = None,
    ) -> Future[Result]:
        """Start a request and return at once; the future resolves to its Result or a LanmeshError."""
        future: Future[Result] = Future()
        call = request_call(
            self._table.new_key(), _FutureSink(future), model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        self._start(call, future)
        return future

    def request(
        self,
        model: str,
        task: str | Task,
        input: Any,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        priority: int = 0,
        require: dict[str, str] | None = None,
    ) -> Result:
        """Send a request and wait for its Result."""
        waiter = _Waiter()
        call = request_call(
            self._table.new_key(), waiter, model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        return cast(Result, self._run_call(call, waiter))

    @overload
    def chat(
        self, model: str, messages: list[dict[str, str]], *, stream: Literal[False] = ..., max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Result: ...  # fmt: skip
    @overload
    def chat(
        self, model: str, messages: list[dict[str, str]], *, stream: Literal[True], max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Stream: ...  # fmt: skip
    def chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        require: dict[str, str] | None = None,
    ) -> Result | Stream:
        """Chat with a model; `stream=True` returns an iterator of text deltas (a `Stream`)."""
        params = generation_params(max_tokens, temperature, top_p, seed, stop)
        return self._generate(model, Task.CHAT, messages, params, stream, timeout, require)

    @overload
    def complete(
        self, model: str, prompt: str, *, stream: Literal[False] = ..., max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Result: ...  # fmt: skip
    @overload
    def complete(
        self, model: str, prompt: str, *, stream: Literal[True], max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Stream: ...  # fmt: skip
    def complete(
        self,
        model: str,
        prompt: str,
        *,
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        require: dict[str, str] | None = None,
    ) -> Result | Stream:
        """Continue a prompt; `stream=True` returns an iterator of text deltas (a `Stream`)."""
        params = generation_params(max_tokens, temperature, top_p, seed, stop)
        return self._generate(model, Task.COMPLETE, prompt, params, stream, timeout, require)

    def embed(self, model: str, texts: str | list[str], *, timeout: float | None = None) -> list[list[float]]:
        """One embedding vector per text (a single string gives a list of one vector)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return embeddings_of(self.request(model, Task.EMBED, batch, timeout=timeout))

    def status(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The mesh as a node sees it: one map per node it knows."""
        reply = self._probe("status", timeout)
        return list(reply.pong.status or [])

    def ping(self, timeout: float = 1.0) -> float:
        """Round-trip seconds to the first node that answers (measured at the socket)."""
        return self._probe("ping", timeout).rtt

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the I/O thread; requests still pending fail with MeshUnavailable('client closed')."""
        with self._lock:
            first = not self._closed  # False also when the I/O thread already stopped after a crash
            self._closed = True
            if first:
                self._commands.append(("close", None))
        if first:
            self._wake()
        if threading.current_thread() is self._thread:
            return  # close() from a done-callback: the I/O thread stops once this callback returns
        self._thread.join(_CLOSE_JOIN_S)
        if self._thread.is_alive():
            log.error("the client I/O thread did not stop within %gs", _CLOSE_JOIN_S)
            return
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- caller side

    def _generate(
        self,
        model: str,
        task: Task,
        input: Any,
        params: dict[str, Any],
        stream: bool,
        timeout: float | None,
        require: dict[str, str] | None,
    ) -> Result | Stream:
        if not stream:
            return self.request(model, task, input, params=params, timeout=timeout, require=require)
        sink = _QueueSink()
        key = self._table.new_key()
        call = request_call(
            key, sink, model, task, input, params=params, timeout=self.timeout if timeout is None else timeout,
            priority=0, require=require, stream=True, now=time.monotonic(),
        )  # fmt: skip
        self._send_command(("start", call))
        return Stream(sink, lambda: self._cancel(key))

    def _probe(self, kind: Literal["ping", "status"], timeout: float) -> PingReply:
        waiter = _Waiter()
        now = time.monotonic()
        call = Call(self._table.new_key(), kind, timeout, now + timeout, waiter)
        return cast(PingReply, self._run_call(call, waiter))

    def _start(self, call: Call, future: Future[Any]) -> None:
        self._send_command(("start", call))
        key = call.key
        future.add_done_callback(lambda f: self._cancel(key) if f.cancelled() else None)

    def _run_call(self, call: Call, waiter: _Waiter) -> Any:
        self._send_command(("start", call))
        try:
            return waiter.wait()
        except LanmeshError:
            raise
        except BaseException:
            self._cancel(call.key)  # e.g. KeyboardInterrupt while waiting: stop tracking the request
            raise

    def _cancel(self, key: int) -> None:
        # No lock: this also runs from Stream.__del__, which the GC may call while this thread holds the lock.
        # A cancel that races with close() is harmless: close fails every pending call anyway.
        if self._closed:
            return
        self._commands.append(("cancel", key))
        self._wake()

    def _send_command(self, command: _Command) -> None:
        with self._lock:
            if self._closed:
                raise MeshUnavailable("client closed")
            self._commands.append(command)
        self._wake()

    def _wake(self) -> None:
        # One pending wake-up byte is enough: the I/O thread clears the flag before it drains the commands.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the socket buffer is full of wake-ups already; the I/O thread will wake
        except OSError:
            if not self._closed:
                raise
            # a cancel that raced with close(): the wake-up socket is gone along with the I/O thread

    # ------------------------------------------------------------- the I/O thread

    def _transmit(self, endpoint: str, frame: bytes) -> bool:
        try:
            self._dealers[endpoint].send(frame, zmq.DONTWAIT)
        except zmq.Again:
            return False
        return True

    def _run(self) -> None:
        table = self._table
        poller = zmq.Poller()
        readers: dict[Any, str] = {}
        watchers: dict[Any, str] = {}
        for ep, dealer in self._dealers.items():
            poller.register(dealer, zmq.POLLIN)
            readers[dealer] = ep
        for ep, monitor in self._monitors.items():
            poller.register(monitor, zmq.POLLIN)
            watchers[monitor] = ep
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        try:
            while True:
                wake = table.next_wake()
                timeout = None if wake is None else max(0, math.ceil((wake - time.monotonic()) * 1000.0))
                ready = poller.poll(timeout)
                now = time.monotonic()
                # Replies first: an answer that arrived just before its node dropped is still an answer.
                for sock, _ in ready:
                    source = readers.get(sock)
                    if source is not None:
                        self._drain_replies(sock, source, now)
                for sock, _ in ready:
                    source = watchers.get(sock)
                    if source is not None:
                        self._drain_events(sock, source, now)
                if any(sock == wake_fd for sock, _ in ready):
                    # Drain before clearing the flag: a byte sent after the clear must stay in the socket, or a
                    # caller that then finds the flag set would skip its wake-up and its command would wait forever.
                    self._drain_wakeups()
                    self._wake_pending = False
                if self._commands and self._run_commands(now):
                    break
                table.expire(time.monotonic())
        except Exception as exc:  # a bug in this client: fail every caller loudly instead of leaving them hanging
            log.exception("lanmesh client I/O thread crashed")
            table.fail_all(InternalError(f"client I/O thread crashed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._closed = True  # also after a crash: later calls must fail, not wait for a dead thread
            closed = MeshUnavailable("client closed")
            table.fail_all(closed)
            for command in self._commands:
                if command[0] == "start":
                    command[1].sink.fail(closed)
            self._commands.clear()
            self._close_sockets()

    def _drain_replies(self, sock: zmq.Socket[bytes], ep: str, now: float) -> None:
        receive = self._table.receive
        # Ask EVENTS rather than recv until zmq.Again: raising and catching that costs more than the check.
        for _ in range(_DRAIN_BATCH):
            if not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            receive(ep, sock.recv(zmq.DONTWAIT), now)

    def _drain_events(self, sock: zmq.Socket[bytes], ep: str, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(sock, zmq.DONTWAIT)
            except zmq.Again:
                return
            apply_monitor_event(self._table, ep, int(event["event"]), now)

    def _drain_wakeups(self) -> None:
        while True:
            try:
                if not self._wake_r.recv(4096):
                    return
            except BlockingIOError:
                return

    def _run_commands(self, now: float) -> bool:
        """Run queued caller commands; True when one of them was `close`."""
        table = self._table
        commands = self._commands
        while commands:
            command = commands.popleft()
            if command[0] == "start":
                table.start(command[1], now)
            elif command[0] == "cancel":
                table.cancel(command[1])
            else:
                return True
        return False

    def _close_sockets(self) -> None:
        for dealer in self._dealers.values():
            if not dealer.closed:
                dealer.disable_monitor()
        for monitor in self._monitors.values():
            monitor.close(0)
        for dealer in self._dealers.values():
            dealer.close(0)
        self._ctx.term()


def apply_monitor_event(table: CallTable, endpoint: str, event: int, now: float) -> None:
    """Feed one socket-monitor event to the table: a completed handshake is 'up', a disconnect is 'down'."""
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        table.node_up(endpoint, now)
    elif event == zmq.EVENT_DISCONNECTED:
        table.node_down(endpoint, now)
    elif event & _HANDSHAKE_FAILED:
        why = handshake_failure(endpoint, event)
        log.warning("%s", why)
        table.node_refused(endpoint, why, now)


__all__ = ["Call", "CallTable", "Client", "PingReply", "Result", "Sink", "Stream", "parse_endpoints"]
