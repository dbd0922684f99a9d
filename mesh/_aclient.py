"""`AsyncClient`: the lanmesh client for asyncio programs, on zmq.asyncio sockets.

The failover logic is `_calls.CallTable`'s (shared with `Client`); this module only feeds it socket events, frames and
timers from the event loop, opens and closes the connections to nodes it learns of, and turns its outcomes into
asyncio futures and async iterators.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, cast, overload

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from protocol import Task

from ._call import Call, generation_params, request_call
from ._calls import CallTable
from ._dealers import ClientSecurity, DealerOptions, apply_monitor_event, check_client_options, close_all, close_dealer
from ._directory import NodeDirectory
from ._endpoints import discover_endpoints, parse_endpoints
from ._results import PingReply, Result, embeddings_of
from .errors import InternalError, LanmeshError, MeshUnavailable

log = logging.getLogger(__name__)


class _FutureSink:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a future sink never streams")

    def done(self, value: Any) -> None:
        if not self.future.done():  # done already: the awaiting task was cancelled
            self.future.set_result(value)

    def fail(self, exc: LanmeshError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _QueueSink:
    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: asyncio.Queue[tuple[str, str] | Result | LanmeshError] = asyncio.Queue()

    def chunk(self, data: str, node: str) -> None:
        self.events.put_nowait((data, node))

    def done(self, value: Any) -> None:
        self.events.put_nowait(value)

    def fail(self, exc: LanmeshError) -> None:
        self.events.put_nowait(exc)


class AsyncStream(AsyncIterator[str]):
    """A streamed answer: `async for` over text deltas, in order, across node failovers.

    `node` names the node that sent the latest delta; `result` is set once the stream has ended. Leaving early?
    Call `aclose()` (or use `async with`): the node serving it is told to stop. A stream dropped unread is closed
    when it is garbage-collected.
    """

    def __init__(self, sink: _QueueSink, client: AsyncClient, key: int) -> None:
        self._sink = sink
        self._client: AsyncClient | None = client
        self._key = key
        self.node = ""
        self.result: Result | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        if self._client is None:
            raise StopAsyncIteration
        event = await self._sink.events.get()
        if isinstance(event, tuple):
            self.node = event[1]
            return event[0]
        self._client = None
        if isinstance(event, Result):
            self.result = event
            self.node = event.node
            raise StopAsyncIteration
        raise event

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client._cancel(self._key, "stream closed")

    def __del__(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None and client._loop is not None:
            # The GC may run this on any thread; the table belongs to the loop.
            try:
                client._loop.call_soon_threadsafe(client._cancel, self._key, "stream closed")
            except RuntimeError:
                pass  # the loop is closed: so is the client, which cancelled everything in flight

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """The asyncio twin of `Client`: same failover, same learning of the mesh, same errors; use it from one event
    loop. A call that ends without an answer (its future or awaiting task cancelled, a stream closed, its deadline,
    `close()`) is cancelled on the node running it.

    Sockets are made at construction; the reader tasks start with the first call (they need the running loop). If a
    reader stops on an error, every pending call fails with InternalError and new calls are refused.
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
        learn: bool = True,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        endpoints = parse_endpoints(nodes)
        check_client_options(timeout, heartbeat, dead_after, try_timeout)
        self.timeout = timeout
        self.client_id = client_id or f"client-{os.urandom(4).hex()}"
        self._dealer_options = DealerOptions(heartbeat=heartbeat, dead_after=dead_after, security=security)
        # `context`: one ZeroMQ context (one I/O thread) shared by many clients, e.g. a gateway's client per caller;
        # the client then leaves it open when it closes. By default each client has its own.
        self._own_ctx = context is None
        self._ctx = zmq.asyncio.Context() if context is None else context
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._monitors: dict[str, zmq.asyncio.Socket] = {}
        try:
            for ep in endpoints:
                self._dealers[ep], self._monitors[ep] = self._dealer_options.open(self._ctx, ep)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ValueError(f"cannot connect to {ep}: {exc}") from exc
        self._table = CallTable(
            endpoints, client_id=self.client_id, transmit=self._transmit, try_timeout=try_timeout,
            directory=NodeDirectory(endpoints) if learn else None, on_nodes_changed=self._nodes_changed,
            on_status=self._dealer_options.learn_status,
        )  # fmt: skip
        credentials = self._dealer_options.credentials
        self._introduce = (lambda ep: self._transmit(ep, credentials)) if credentials is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}  # each node's reader and monitor watcher
        self._retiring: set[asyncio.Task[None]] = set()  # closing the sockets of nodes dropped
        self._changes_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False  # no new calls: closed, or a reader died
        self._broken = ""  # why a reader died
        self._shut = False  # close() has run

    @classmethod
    async def discover(cls, timeout: float = 2.0, *, interfaces: list[str] | None = None, **kwargs: Any) -> AsyncClient:
        """A client for the nodes that answer mDNS within `timeout` seconds (raises MeshUnavailable if none)."""
        loop = asyncio.get_running_loop()
        endpoints = await loop.run_in_executor(None, discover_endpoints, timeout, interfaces)
        return cls(endpoints, **kwargs)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._table.endpoints

    @property
    def connected(self) -> tuple[str, ...]:
        """The node endpoints this client has a live connection to right now."""
        return self._table.connected

    @property
    def learned(self) -> tuple[str, ...]:
        """The node endpoints this client learned from the mesh, besides `endpoints`."""
        return self._table.learned

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
    ) -> asyncio.Future[Result]:
        """Start a request and return its future at once (call from inside the event loop)."""
        loop = self._running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        call = request_call(
            self._table.new_key(), _FutureSink(future), model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        self._start(call, future)
        return future

    async def request(
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
        return await self.submit(model, task, input, params=params, timeout=timeout, priority=priority, require=require)

    @overload
    async def chat(
        self, model: str, messages: list[dict[str, str]], *, stream: Literal[False] = ..., max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Result: ...  # fmt: skip
    @overload
    async def chat(
        self, model: str, messages: list[dict[str, str]], *, stream: Literal[True], max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> AsyncStream: ...  # fmt: skip
    async def chat(
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
    ) -> Result | AsyncStream:
        """Chat with a model; `stream=True` gives an async iterator of text deltas (an `AsyncStream`)."""
        params = generation_params(max_tokens, temperature, top_p, seed, stop)
        return await self._generate(model, Task.CHAT, messages, params, stream, timeout, require)

    @overload
    async def complete(
        self, model: str, prompt: str, *, stream: Literal[False] = ..., max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> Result: ...  # fmt: skip
    @overload
    async def complete(
        self, model: str, prompt: str, *, stream: Literal[True], max_tokens: int | None = ...,
        temperature: float | None = ..., top_p: float | None = ..., seed: int | None = ...,
        stop: str | list[str] | None = ..., timeout: float | None = ..., require: dict[str, str] | None = ...,
    ) -> AsyncStream: ...  # fmt: skip
    async def complete(
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
    ) -> Result | AsyncStream:
        """Continue a prompt; `stream=True` gives an async iterator of text deltas (an `AsyncStream`)."""
        params = generation_params(max_tokens, temperature, top_p, seed, stop)
        return await self._generate(model, Task.COMPLETE, prompt, params, stream, timeout, require)

    async def embed(self, model: str, texts: str | list[str], *, timeout: float | None = None) -> list[list[float]]:
        """One embedding vector per text (a single string gives a list of one vector)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return embeddings_of(await self.request(model, Task.EMBED, batch, timeout=timeout))

    async def status(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """The mesh as a node sees it: one map per node it knows."""
        reply = await self._probe("status", timeout)
        return list(reply.pong.status or [])

    async def ping(self, timeout: float = 1.0) -> float:
        """Round-trip seconds to the first node that answers (measured at the socket)."""
        return (await self._probe("ping", timeout)).rtt

    # ------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Stop reading; requests still pending fail with MeshUnavailable('client closed') and are cancelled on
        their nodes."""
        if self._shut:
            return
        self._shut = self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [task for per_node in self._tasks.values() for task in per_node]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks or self._retiring:
            await asyncio.gather(*tasks, *self._retiring, return_exceptions=True)
        self._table.fail_all(MeshUnavailable("client closed"))  # cancels their tries: sent as the sockets close
        self._close_sockets()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------- inside the loop

    async def stream(
        self,
        model: str,
        task: str | Task,
        input: Any,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        require: dict[str, str] | None = None,
    ) -> AsyncStream:
        """Start a streamed request of any task with any params (the engines' keys: max_tokens, temperature,
        guidance, tools, ...); `chat(stream=True)` is this with the sampling keywords made into params."""
        out = await self._generate(model, Task(task), input, dict(params or {}), True, timeout, require)
        assert isinstance(out, AsyncStream)
        return out

    async def _generate(
        self,
        model: str,
        task: Task,
        input: Any,
        params: dict[str, Any],
        stream: bool,
        timeout: float | None,
        require: dict[str, str] | None,
    ) -> Result | AsyncStream:
        if not stream:
            return await self.request(model, task, input, params=params, timeout=timeout, require=require)
        self._running_loop()
        sink = _QueueSink()
        key = self._table.new_key()
        call = request_call(
            key, sink, model, task, input, params=params, timeout=self.timeout if timeout is None else timeout,
            priority=0, require=require, stream=True, now=time.monotonic(),
        )  # fmt: skip
        self._table.start(call, time.monotonic())
        self._rearm()
        return AsyncStream(sink, self, key)

    async def _probe(self, kind: Literal["ping", "status"], timeout: float) -> PingReply:
        future: asyncio.Future[PingReply] = self._running_loop().create_future()
        now = time.monotonic()
        self._start(Call(self._table.new_key(), kind, timeout, now + timeout, _FutureSink(future)), future)
        return await future

    def _start(self, call: Call, future: asyncio.Future[Any]) -> None:
        key = call.key
        self._table.start(call, time.monotonic())
        self._rearm()
        # Cancelling the future, or the task awaiting it, cancels the request on its node.
        future.add_done_callback(lambda f: self._cancel(key, "cancelled") if f.cancelled() else None)

    def _cancel(self, key: int, reason: str) -> None:
        if not self._closed:
            self._table.cancel(key, reason)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise MeshUnavailable(f"client closed: {self._broken}" if self._broken else "client closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            for ep in self._dealers:
                self._watch_node(ep)
        elif loop is not self._loop:
            raise RuntimeError("an AsyncClient belongs to the event loop it was first used in")
        return loop

    def _watch_node(self, ep: str) -> None:
        """Start reading node `ep`'s replies and connection events."""
        assert self._loop is not None
        tasks = [
            self._loop.create_task(self._read_replies(ep, self._dealers[ep]), name=f"lanmesh-replies {ep}"),
            self._loop.create_task(self._watch(ep, self._monitors[ep]), name=f"lanmesh-monitor {ep}"),
        ]
        self._tasks[ep] = tasks
        for task in tasks:
            task.add_done_callback(self._reader_stopped)

    def _reader_stopped(self, task: asyncio.Task[None]) -> None:
        # A reader ends only when the client closes or drops its node (both untrack it first), or when it crashed
        # (handled where it crashed): anything else, e.g. a cancel from outside, leaves calls that nobody reads.
        if self._closed or not any(task in tasks for tasks in self._tasks.values()):
            return
        self._crash(RuntimeError(f"{task.get_name()} stopped"))

    # ------------------------------------------------------------- learned nodes

    def _nodes_changed(self) -> None:
        if not self._changes_due and self._loop is not None:
            self._changes_due = True
            self._loop.call_soon(self._change_nodes)  # not inside the table's own call stack

    def _change_nodes(self) -> None:
        self._changes_due = False
        if self._closed:
            return
        for opened, ep in self._table.take_node_changes():
            if opened:
                try:
                    self._dealers[ep], self._monitors[ep] = self._dealer_options.open(self._ctx, ep, resolve=False)
                except (zmq.ZMQError, ValueError) as exc:  # ValueError: a member identity knows no key for it
                    log.warning("cannot connect to %s, learned from the mesh: %s", ep, exc)
                    continue
                self._watch_node(ep)
            elif ep in self._dealers:
                retire = self._retire(self._tasks.pop(ep, []), self._dealers.pop(ep), self._monitors.pop(ep))
                task = asyncio.ensure_future(retire)
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(tasks: list[asyncio.Task[None]], dealer: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close_dealer(dealer, monitor)

    def _transmit(self, endpoint: str, frame: bytes) -> bool:
        # With DONTWAIT and no send queued (we never queue one), zmq.asyncio sends at once and returns a done future.
        sent = cast("asyncio.Future[Any]", self._dealers[endpoint].send(frame, zmq.DONTWAIT))
        if not sent.done():
            raise AssertionError("a DONTWAIT send on a zmq.asyncio socket did not complete at once")
        exc = sent.exception()
        if isinstance(exc, zmq.Again):
            return False
        if exc is not None:
            raise exc
        return True

    async def _read_replies(self, endpoint: str, dealer: zmq.asyncio.Socket) -> None:
        table = self._table
        try:
            while True:
                frame = await dealer.recv()
                table.receive(endpoint, frame, time.monotonic())
                self._rearm()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in this client: fail every caller loudly instead of leaving them hanging
            log.exception("lanmesh async client: reading replies from %s failed", endpoint)
            self._crash(exc)

    async def _watch(self, endpoint: str, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = await recv_monitor_message(monitor)
                apply_monitor_event(self._table, endpoint, int(event["event"]), time.monotonic(), self._introduce)
                self._rearm()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as in _read_replies
            log.exception("lanmesh async client: watching the connection to %s failed", endpoint)
            self._crash(exc)

    def _crash(self, exc: Exception) -> None:
        """A reader died: fail every pending call, and refuse new ones (nobody would read their answers)."""
        if self._closed:
            return
        self._closed = True
        self._broken = f"its reader stopped ({type(exc).__name__}: {exc})"
        if self._timer is not None:
            self._timer.cancel()
        current = asyncio.current_task()
        for task in [task for per_node in self._tasks.values() for task in per_node]:
            if task is not current:
                task.cancel()
        self._table.fail_all(InternalError(f"client reader crashed: {type(exc).__name__}: {exc}"))

    def _rearm(self) -> None:
        """Keep one loop timer set for the table's next deadline, backoff or try timeout."""
        wake = self._table.next_wake()
        if wake is None or wake >= self._timer_at or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        self._timer = self._loop.call_later(max(0.0, wake - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._table.expire(time.monotonic())
        self._rearm()

    def _close_sockets(self) -> None:
        close_all(self._ctx if self._own_ctx else None, self._dealers.values(), self._monitors.values())


__all__ = ["AsyncClient", "AsyncStream"]
