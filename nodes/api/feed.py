"""The feed of recent requests the web console lists: the HTTP requests that ran a model through this node's API,
filled by the guard (opens and files each entry) and the handlers (`note_*`: model, who served it, errors)."""

from __future__ import annotations

import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

from mesh import Result

FEED_SIZE = 200  # requests kept
# The HTTP endpoints that run a model: the feed lists requests to these.
FEED_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


@dataclass(slots=True)
class FeedEntry:
    """One HTTP request that ran a model through this gateway: who served it, why there, how it ended."""

    id: int
    endpoint: str
    at: float  # wall-clock time it arrived (the browser shows it as a time of day)
    model: str = ""
    node: str = ""
    route: str = ""
    tries: int = 0
    stream: bool = False
    pieces: int = 0  # streamed chunks
    tokens: int = 0  # completion tokens, when the model reports them
    status: int = 0
    ms: float = 0.0
    error: str = ""
    caller: str = ""  # the name of the API key it came with ("" without keys)


_FEED_FIELDS = tuple(f.name for f in fields(FeedEntry))


class RequestFeed:
    """The last FEED_SIZE requests that ran a model through this node's HTTP API, newest last.

    Only the gateway's event loop touches it: BodyGuard opens an entry when such a request arrives and files it
    once the response has ended (streams: after the last event); the handlers fill in the model and the `Result`
    through `note_*`, which find the entry in a context variable (it crosses layers that know nothing of each
    other: middleware, handlers, exception handlers, and the stream's task, which copies the context).
    """

    def __init__(self, size: int = FEED_SIZE) -> None:
        self._entries: deque[FeedEntry] = deque(maxlen=size)
        self._next_id = 1

    def open(self, path: str) -> FeedEntry | None:
        """A new entry for the HTTP request being handled, or None when `path` runs no model.

        Call it in the request's own task: the entry stays current for that task (uvicorn runs each request in
        a task of its own, so it ends with the request).
        """
        if path not in FEED_ENDPOINTS:
            return None
        entry = FeedEntry(id=self._next_id, endpoint=path, at=time.time())
        self._next_id += 1
        _current_entry.set(entry)
        return entry

    def file(self, entry: FeedEntry, status: int, seconds: float) -> None:
        entry.status = status
        entry.ms = round(seconds * 1000, 1)
        self._entries.append(entry)

    def newest(self, count: int) -> list[dict[str, Any]]:
        """The newest `count` entries, newest first."""
        return [{name: getattr(e, name) for name in _FEED_FIELDS} for e in list(self._entries)[-count:][::-1]]


_current_entry: ContextVar[FeedEntry | None] = ContextVar("lanmesh_feed_entry", default=None)


def note_model(model: str, stream: bool = False) -> None:
    entry = _current_entry.get()
    if entry is not None:
        entry.model, entry.stream = model, stream


def note_served(result: Result, pieces: int = 0) -> None:
    entry = _current_entry.get()
    if entry is not None:
        entry.node, entry.route, entry.tries, entry.pieces = result.node, result.route, result.tries, pieces
        tokens = result.usage.get("completion_tokens")
        entry.tokens = tokens if isinstance(tokens, int) and not isinstance(tokens, bool) else 0


def note_caller(name: str) -> None:
    entry = _current_entry.get()
    if entry is not None:
        entry.caller = name


def note_error(message: str) -> None:
    entry = _current_entry.get()
    if entry is not None:
        entry.error = message[:300]


def note_unfinished(node: str, pieces: int) -> None:
    """A stream that ended without its last event: failed (noted already) or the client went away (stop)."""
    entry = _current_entry.get()
    if entry is not None:
        entry.node, entry.pieces = entry.node or node, pieces
        entry.error = entry.error or "the client went away before the end"
