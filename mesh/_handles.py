"""What a caller of the threaded `Client` holds while a call runs: the Future `submit()` returns, the waiter a
blocked `request()` sleeps on, and the `Stream` a streamed answer is read from. Each one that ends early (cancel,
close, garbage collection) tells the client, which cancels the call on its node."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import Any

from ._results import Result
from .errors import LanmeshError

# Stops call `key` for `reason` (the client's `_cancel`): no lock, safe from any thread and from the GC.
CancelCall = Callable[[int, str], None]

# A future's outcome waits in its client's outbox until the client's lock is released: resolving a future runs
# the caller's done-callbacks, and those may call back into the client.
Outcome = tuple[Future[Any], Any, bool]  # (future, value or error, failed)
NO_OUTCOMES: list[Outcome] = []  # never appended to


class RequestFuture(Future[Any]):
    """A Future whose `cancel()` also stops the request (cheaper than a done-callback on every future)."""

    def __init__(self, cancel_call: CancelCall) -> None:
        super().__init__()
        self._cancel_call = cancel_call
        self.key = 0

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._cancel_call(self.key, "cancelled")
        return True


class FutureSink:
    __slots__ = ("future", "outbox")

    def __init__(self, future: Future[Any], outbox: list[Outcome]) -> None:
        self.future = future
        self.outbox = outbox

    def chunk(self, data: str, node: str) -> None:
        raise AssertionError("a future sink never streams")

    def done(self, value: Any) -> None:
        self.outbox.append((self.future, value, False))

    def fail(self, exc: LanmeshError) -> None:
        self.outbox.append((self.future, exc, True))


def resolve(outcomes: list[Outcome]) -> None:
    for future, value, failed in outcomes:
        try:
            if failed:
                future.set_exception(value)
            else:
                future.set_result(value)
        except InvalidStateError:
            pass  # the caller cancelled the future meanwhile; nobody is waiting for the value


class Waiter:
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


class QueueSink:
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
    Leaving early? Call `close()` (or use `with`): the node serving it is told to stop. A stream dropped unread
    is closed when it is garbage-collected.
    """

    def __init__(self, sink: QueueSink, cancel_call: CancelCall, key: int) -> None:
        self._sink = sink
        self._cancel_call: CancelCall | None = cancel_call
        self._key = key
        self.node = ""
        self.result: Result | None = None

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        if self._cancel_call is None:
            raise StopIteration
        event = self._sink.events.get()
        if isinstance(event, tuple):
            self.node = event[1]
            return event[0]
        self._cancel_call = None
        if isinstance(event, _End):
            self.result = event.value
            if self.result is not None:
                self.node = self.result.node
            raise StopIteration
        raise event

    def close(self) -> None:
        cancel, self._cancel_call = self._cancel_call, None
        if cancel is not None:
            cancel(self._key, "stream closed")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_cancel_call", None) is not None:
            self.close()


__all__ = ["NO_OUTCOMES", "FutureSink", "Outcome", "QueueSink", "RequestFuture", "Stream", "Waiter", "resolve"]
