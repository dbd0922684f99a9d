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
import select
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
# Plain ints: zmq's flag enums cost an enum construction per `&` on the hot path.
_EVENTS, _POLLIN, _DONTWAIT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.DONTWAIT)
_DRAIN_BATCH = 512  # frames read in one go before the reader lets others have the lock
# The I/O thread looks at its timers at least this often, so a new call whose deadline is later (almost all) need
# not wake it.
_IDLE_WAKE_S = 1.0
_IDLE_WAKE_MS = int(_IDLE_WAKE_S * 1000)
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


# A future's outcome waits in its client's outbox until the client's lock is released: resolving a future runs
# the caller's done-callbacks, and those may call back into the client.
_Outcome = tuple[Future[Any], Any, bool]  # (future, value or error, failed)


class _RequestFuture(Future[Any]):
    """A Future whose `cancel()` also stops the request (cheaper than a done-callback on every future)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client
        self._key = 0

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._client._cancel(self._key)
        return True


class _FutureSink:
    __slots__ = ("future", "outbox")

    def __init__(self, future: Future[Any], outbox: list[_Outcome]) -> None:
        self.future = future
        self.outbox = outbox

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a future sink never streams")

    def done(self, value: Any) -> None:
        self.outbox.append((self.future, value, False))

    def fail(self, exc: LanmeshError) -> None:
        self.outbox.append((self.future, exc, True))


_NO_OUTCOMES: list[_Outcome] = []  # never appended to


def _resolve(outcomes: list[_Outcome]) -> None:
    for future, value, failed in outcomes:
        try:
            if failed:
                future.set_exception(value)
            else:
                future.set_result(value)
        except InvalidStateError:
            pass  # the caller cancelled the future meanwhile; nobody is waiting for the value


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


class Client:
    """A thread-safe client for a lanmesh mesh: many requests may be in flight from many threads at once.

    One I/O thread sends submitted requests (in batches), reads replies and watches connections and timers; a thread
    blocked in `request()` sends and reads for itself (see below). When the node carrying a request drops (crash,
    hang caught by heartbeats), the request is re-sent to another node, so a caller sees an error only when its
    deadline passes, no node is reachable, or the mesh gives an answer a retry cannot change.

    Threading: every socket and the CallTable are used only under `_lock` (a ZeroMQ socket may move between threads
    behind a full memory barrier). The I/O thread sleeps in a poll on each DEALER's ZMQ_FD, never on the socket
    itself, so a caller may send while it sleeps. ZMQ_FD is edge-triggered and any send may consume its signal, so
    whoever holds the lock reads every DEALER until ZMQ_EVENTS shows no input before releasing it (`_settle`):
    replies that arrive later then raise ZMQ_FD again and wake the I/O thread.

    `submit()` only queues the call and wakes the I/O thread if it sleeps (no lock: a pipelining caller never waits
    on the I/O thread's socket work). A thread blocked in `request()` instead sends its call itself and polls the
    DEALERs while it waits (it "leads", one thread at a time), reading every reply that comes while the I/O thread
    leaves the DEALERs to it: two thread wake-ups fewer per synchronous request. Whoever ends the leader's call
    from another thread (a deadline, close) pokes it; a leader that leaves with calls still in flight hands the
    DEALERs back to the I/O thread. Futures are resolved outside the lock, on whichever of these threads read the
    reply, so a done-callback may call the client again (even `request()`), but should not block for long.
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
        self._lock = threading.Lock()
        self._closed = False
        self._outbox: list[_Outcome] = []
        self._queued: deque[Call] = deque()  # submitted, for the I/O thread to send
        # Cancels may come from Stream.__del__ (the GC, maybe while this thread holds the lock): they queue here.
        self._cancels: deque[int] = deque()
        # When the sleeping I/O thread wakes on its own (-inf: it is awake and will look at the timers itself). A
        # caller whose call needs the I/O thread sooner writes a byte to the wake-up socket.
        self._io_wake_at = -math.inf
        self._io_watching = True  # whether the I/O thread's poll includes the DEALERs
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._dealer_list = list(self._dealers.items())
        self._many = len(self._dealer_list) > 1
        self._sends = 0  # frames sent so far: tells the I/O thread whether its turn sent any
        # Each DEALER's ZMQ_FD, which the I/O thread and a leader poll instead of the socket: zmq_poll on the
        # socket would use it while a caller sends on it.
        self._dealer_fds = {cast(int, dealer.getsockopt(zmq.FD)) for dealer in self._dealers.values()}
        self._unread = False  # a reader stopped at its batch limit with input left on a DEALER
        self._leader = 0  # key of the call whose thread reads the DEALERs now (0: none, the I/O thread does)
        self._leader_poked = False
        self._poke_r, self._poke_w = socket.socketpair()
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        self._pokes_open = True
        self._lead_poll = select.poll()  # one syscall per wait, where zmq_poll makes two
        for fd in self._dealer_fds:
            self._lead_poll.register(fd, select.POLLIN)
        self._lead_poll.register(self._poke_r.fileno(), select.POLLIN)
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
        future = _RequestFuture(self)
        call = request_call(
            self._table.new_key(), _FutureSink(future, self._outbox), model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        future._key = call.key
        self._enqueue(call)
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
            if not self._closed:  # closed already also when the I/O thread stopped after a crash
                self._closed = True
                self._wake()
        if threading.current_thread() is self._thread:
            return  # close() from a done-callback: the I/O thread stops once this callback returns
        self._thread.join(_CLOSE_JOIN_S)
        if self._thread.is_alive():
            log.error("the client I/O thread did not stop within %gs", _CLOSE_JOIN_S)
            return
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            if not self._leader:  # else the leader, poked by the I/O thread, closes them as it leaves
                self._close_pokes()

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
        self._enqueue(call)
        return Stream(sink, lambda: self._cancel(key))

    def _probe(self, kind: Literal["ping", "status"], timeout: float) -> PingReply:
        waiter = _Waiter()
        now = time.monotonic()
        call = Call(self._table.new_key(), kind, timeout, now + timeout, waiter)
        return cast(PingReply, self._run_call(call, waiter))

    def _enqueue(self, call: Call) -> None:
        if self._closed:
            raise MeshUnavailable("client closed")
        self._queued.append(call)
        if not self._closed:
            self._wake()
            return
        with self._lock:  # closed meanwhile: the I/O thread's last sweep of the queue may have missed this call
            self._fail_queued()
            outcomes = self._take_outcomes()
        _resolve(outcomes)

    def _start(self, call: Call) -> bool:
        """Send the call's first try from this thread; True if this thread is now the leader and must read."""
        with self._lock:
            if self._closed:
                raise MeshUnavailable("client closed")
            table = self._table
            table.start(call, time.monotonic())
            lead = not self._leader and table.active(call.key)
            if lead:
                self._leader = call.key
            self._settle(leading=lead)
            if lead and not table.active(call.key):  # answered already, while this thread read the sockets
                self._leader = 0
                lead = False
                self._hand_over()
            outcomes = self._take_outcomes()
        if outcomes:
            _resolve(outcomes)
        return lead

    def _lead(self, key: int) -> None:
        """Read the DEALERs from this thread until call `key` has ended; then hand them back."""
        poll = self._lead_poll.poll
        try:
            while True:
                poll(_IDLE_WAKE_MS)  # the I/O thread pokes on close or a deadline, so this cap is only a guard
                with self._lock:
                    if self._leader_poked:
                        self._drain(self._poke_r)
                        self._leader_poked = False
                    if self._closed:
                        self._leader = 0
                        self._close_pokes()  # close() left them to the leader
                        return
                    self._settle(leading=True)
                    ended = not self._table.active(key)
                    if ended:
                        self._leader = 0
                        self._hand_over()
                    outcomes = self._take_outcomes()
                if outcomes:
                    _resolve(outcomes)
                if ended:
                    return
        except BaseException:
            with self._lock:  # e.g. KeyboardInterrupt in the poll: another thread or the I/O thread takes over
                if self._leader == key:
                    self._leader = 0
                    if self._closed:
                        self._close_pokes()
                    else:
                        self._hand_over()
            raise

    def _run_call(self, call: Call, waiter: _Waiter) -> Any:
        lead = self._start(call)
        try:
            if lead:
                self._lead(call.key)
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
        self._cancels.append(key)
        self._wake()

    def _wake(self) -> None:
        """Make the I/O thread run a turn soon. Any thread, lock or not: the I/O thread drains the wake-up socket,
        then clears the flag, then looks at its queues, so a byte is only skipped when one is on its way."""
        self._io_wake_at = -math.inf  # awake from now on: no caller needs to write another byte
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
            # raced with close(): the wake-up socket is gone along with the I/O thread, which failed every call

    # ------------------------------------------------------------- under the lock, from any thread

    def _transmit(self, endpoint: str, frame: bytes) -> bool:
        try:
            self._dealers[endpoint].send(frame, _DONTWAIT)
        except zmq.Again:
            return False
        self._sends += 1
        return True

    def _settle(self, *, leading: bool = False) -> None:
        """Leave the sockets and threads so that whoever must wake does; call last before releasing the lock."""
        if self._read_replies(time.monotonic()):
            self._wake()  # more waiting than one batch: the I/O thread reads on
        else:
            wake = self._table.next_wake()
            if wake is not None and wake < self._io_wake_at:
                self._wake()  # a timer due before the sleeping I/O thread would look
        if not leading:
            self._hand_over()

    def _hand_over(self) -> None:
        """Make sure someone reads the DEALERs: poke a leader whose call ended here, or wake the I/O thread."""
        if self._leader:
            if not self._leader_poked and not self._table.active(self._leader):
                self._leader_poked = True
                self._poke_w.send(b"\0")  # one byte at most: the socket buffer cannot fill
        elif not self._io_watching and self._table.pending:
            self._wake()  # calls in flight and nobody polling their DEALERs

    def _close_pokes(self) -> None:
        if self._pokes_open:
            self._pokes_open = False
            self._poke_r.close()
            self._poke_w.close()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        # One read: bytes beyond it only cost a spare turn, where reading until EAGAIN costs an exception each time.
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass  # already drained

    def _read_replies(self, now: float) -> bool:
        """Read every DEALER until ZMQ_EVENTS shows no input; True when the batch limit left frames unread."""
        receive = self._table.receive
        budget = _DRAIN_BATCH
        again = True
        while again:
            again = False
            for ep, sock in self._dealer_list:
                # Ask EVENTS rather than recv until zmq.Again: raising and catching that costs more than the check.
                while cast(int, sock.get(_EVENTS)) & _POLLIN:
                    if not budget:
                        self._unread = True
                        return True
                    budget -= 1
                    receive(ep, sock.recv(_DONTWAIT), now)
                    # An answer can send a retry on a DEALER already read, which may consume its ZMQ_FD signal.
                    again = self._many
        self._unread = False
        return False

    def _fail_queued(self) -> None:
        closed = MeshUnavailable("client closed")
        while self._queued:
            self._queued.popleft().sink.fail(closed)

    def _take_outcomes(self) -> list[_Outcome]:
        outbox = self._outbox
        if not outbox:
            return _NO_OUTCOMES
        taken = outbox[:]
        outbox.clear()  # in place: every future sink holds this list
        return taken

    # ------------------------------------------------------------- the I/O thread

    def _run(self) -> None:
        table = self._table
        watching, quiet = zmq.Poller(), zmq.Poller()  # with the DEALERs, and without them (while a caller leads)
        watchers: dict[Any, str] = {}
        for fd in self._dealer_fds:
            watching.register(fd, zmq.POLLIN)
        wake_fd = self._wake_r.fileno()
        for poller in (watching, quiet):
            for ep, monitor in self._monitors.items():
                poller.register(monitor, zmq.POLLIN)  # monitor sockets are this thread's alone
                watchers[monitor] = ep
            poller.register(wake_fd, zmq.POLLIN)
        ready: list[tuple[Any, int]] = []
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                    timeout = self._turn(ready, watchers, wake_fd)
                    outcomes = self._take_outcomes()
                if outcomes:
                    _resolve(outcomes)
                ready = (watching if self._io_watching else quiet).poll(timeout)
        except Exception as exc:  # a bug in this client: fail every caller loudly instead of leaving them hanging
            log.exception("lanmesh client I/O thread crashed")
            with self._lock:
                table.fail_all(InternalError(f"client I/O thread crashed: {type(exc).__name__}: {exc}"))
                outcomes = self._take_outcomes()
            _resolve(outcomes)
        finally:
            with self._lock:
                self._closed = True  # also after a crash: later calls must fail, not wait for a dead thread
                table.fail_all(MeshUnavailable("client closed"))
                self._fail_queued()  # after setting `_closed`: a call queued later is failed by its submitter
                self._hand_over()  # wakes a leader, which then leaves the sockets alone: they close now
                self._close_sockets()
                outcomes = self._take_outcomes()
            _resolve(outcomes)

    def _turn(self, ready: list[tuple[Any, int]], watchers: dict[Any, str], wake_fd: int) -> int:
        """One round of the I/O thread's work; returns how long it may then sleep (ms)."""
        table = self._table
        now = time.monotonic()
        if any(sock == wake_fd for sock, _ in ready):
            self._drain(self._wake_r)
            self._wake_pending = False
        # Replies first: an answer that arrived just before its node dropped is still an answer. Read only when
        # there can be input: every lock holder left the DEALERs read, so only a raised ZMQ_FD or a reader
        # that stopped at its batch limit means there is.
        more = False
        if self._unread or any(sock in self._dealer_fds for sock, _ in ready):
            more = self._read_replies(now)
        sends = self._sends
        for sock, _ in ready:
            source = watchers.get(sock)
            if source is not None:
                self._drain_events(sock, source, now)
        queued = self._queued
        while queued:
            table.start(queued.popleft(), now)
        cancels = self._cancels
        while cancels:
            table.cancel(cancels.popleft())
        table.expire(time.monotonic())
        if self._sends != sends:  # new calls, failovers or retries went out, and a send may consume ZMQ_FD's signal
            more = self._read_replies(now) or more
        self._io_watching = not self._leader
        self._hand_over()  # a leader's call may have ended here (deadline, error)
        if more:
            self._io_wake_at = -math.inf
            return 0
        now = time.monotonic()
        wake = table.next_wake()
        self._io_wake_at = now + _IDLE_WAKE_S if wake is None else min(wake, now + _IDLE_WAKE_S)
        return max(0, math.ceil((self._io_wake_at - now) * 1000.0))

    def _drain_events(self, sock: zmq.Socket[bytes], ep: str, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(sock, zmq.DONTWAIT)
            except zmq.Again:
                return
            apply_monitor_event(self._table, ep, int(event["event"]), now)

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
        # After a protocol mismatch ZeroMQ does not reconnect: that refusal is final.
        table.node_refused(endpoint, why, now, final=bool(event & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL))


__all__ = ["Call", "CallTable", "Client", "PingReply", "Result", "Sink", "Stream", "parse_endpoints"]
