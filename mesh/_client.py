"""The embeddable client: `Client`, the thread-safe API over the machinery in `_client_io`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any, Literal, cast, overload

from protocol import Task

from ._call import Call, generation_params, request_call
from ._client_io import ClientIO
from ._dealers import ClientSecurity, DealerOptions, check_client_options
from ._endpoints import discover_endpoints, parse_endpoints
from ._handles import FutureSink, QueueSink, RequestFuture, Stream, Waiter
from ._results import PingReply, Result, embeddings_of


class Client(ClientIO):
    """A thread-safe client for a lanmesh mesh: many requests may be in flight from many threads at once.

    One I/O thread sends submitted requests (in batches), reads replies and watches connections and timers; a thread
    blocked in `request()` sends and reads for itself (`ClientIO` says how the threads share the sockets). When the
    node carrying a request drops (crash, hang caught by heartbeats), the request is re-sent to another node, so a
    caller sees an error only when its deadline passes, no node is reachable, or the mesh gives an answer a retry
    cannot change. With `learn` (the default) the client asks the nodes it reaches which others are alive and
    connects to those too, as stand-ins: requests go to the given nodes while one is connected, so one address is
    enough and losing it loses nothing. A call that ends without an answer (a cancelled future, a closed stream,
    Ctrl-C in `request()`, its deadline, `close()`) is cancelled on the node running it.
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
    ) -> None:
        endpoints = parse_endpoints(nodes)
        check_client_options(timeout, heartbeat, dead_after, try_timeout)
        self.timeout = timeout
        super().__init__(
            endpoints, client_id=client_id or f"client-{os.urandom(4).hex()}", try_timeout=try_timeout, learn=learn,
            dealer_options=DealerOptions(heartbeat=heartbeat, dead_after=dead_after, security=security),
        )  # fmt: skip

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
    ) -> Future[Result]:
        """Start a request and return at once; the future resolves to its Result or a LanmeshError."""
        future = RequestFuture(self._cancel)
        call = request_call(
            self._table.new_key(), FutureSink(future, self._outbox), model, task, input, params=params,
            timeout=self.timeout if timeout is None else timeout, priority=priority, require=require,
            stream=False, now=time.monotonic(),
        )  # fmt: skip
        future.key = call.key
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
        waiter = Waiter()
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

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- caller side

    def stream(
        self,
        model: str,
        task: str | Task,
        input: Any,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        require: dict[str, str] | None = None,
    ) -> Stream:
        """Start a streamed request of any task with any params (the engines' keys: max_tokens, temperature,
        guidance, tools, ...); `chat(stream=True)` is this with the sampling keywords made into params."""
        out = self._generate(model, Task(task), input, dict(params or {}), True, timeout, require)
        assert isinstance(out, Stream)
        return out

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
        sink = QueueSink()
        key = self._table.new_key()
        call = request_call(
            key, sink, model, task, input, params=params, timeout=self.timeout if timeout is None else timeout,
            priority=0, require=require, stream=True, now=time.monotonic(),
        )  # fmt: skip
        self._enqueue(call)
        return Stream(sink, self._cancel, key)

    def _probe(self, kind: Literal["ping", "status"], timeout: float) -> PingReply:
        waiter = Waiter()
        now = time.monotonic()
        call = Call(self._table.new_key(), kind, timeout, now + timeout, waiter)
        return cast(PingReply, self._run_call(call, waiter))


__all__ = ["Client", "Result", "Stream"]
