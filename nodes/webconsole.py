"""The web console every node serves at `/`: the static page shipped in `nodes/console_web/`, the JSON view it
polls (`/console/api/mesh`), and the feed of recent requests that the gateway fills.

The page holds no data, so it loads without the API key; the view needs the key like every other API route.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from contextvars import ContextVar
from dataclasses import dataclass, fields
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Header, Response
from starlette.exceptions import HTTPException

from mesh import Result

if TYPE_CHECKING:
    from .gateway import MeshApi

log = logging.getLogger("lanmesh.gateway")

VIEW_PATH = "/console/api/mesh"
VIEW_MAX_AGE_S = 0.25  # the page polls every 0.5 s; several open pages share one status ping per 0.25 s
FEED_SIZE = 200  # requests kept
FEED_SENT = 50  # requests the page gets per poll (the newest)
# The HTTP endpoints that run a model: the feed lists requests to these.
FEED_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# The node's own mesh counters the page shows.
_SHOWN_STATS = ("requests_in", "served_local", "forwarded", "retries", "rejects_received")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything the page loads comes from this node; the browser refuses anything else (no CDN, no internet).
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): a node upgraded in place serves its new page at once
}


# ---------------------------------------------------------------- recent requests


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


# ---------------------------------------------------------------- the mesh view


def _node_row(row: dict[str, Any]) -> dict[str, Any]:
    """A status row as the page shows it: without the loop's counters and security details (the node's own row
    keeps the few the page shows). Unknown fields pass through, so new ones (model versions) reach the page."""
    out = {k: v for k, v in row.items() if k not in ("stats", "executor", "security")}
    if "stats" in row:
        out["stats"] = {k: row["stats"].get(k, 0) for k in _SHOWN_STATS}
    security = row.get("security")
    if isinstance(security, dict):
        out["security"] = {"mode": security.get("mode"), "fingerprint": security.get("fingerprint")}
    return out


def mesh_view(api: MeshApi, rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "node": api.node_id,
        "mesh_up": rows is not None,  # False: this node's mesh loop did not answer the status ping
        "nodes": [_node_row(r) for r in rows or []],
        "requests": api.feed.newest(FEED_SENT),
        "timeline": api.metrics.timeline.series(),
    }


# ---------------------------------------------------------------- static files


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_console_files() -> dict[str, StaticFile]:
    """The console's files by name, read once from the installed package."""
    folder = resources.files("nodes").joinpath("console_web")
    files: dict[str, StaticFile] = {}
    if not folder.is_dir():
        log.warning("the web console's files are missing (%s): / will answer 404", folder)
        return files
    for item in folder.iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in _CONTENT_TYPES:
            body = item.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            files[item.name] = StaticFile(body, _CONTENT_TYPES[suffix], etag)
    return files


def install_console(app: FastAPI, api: MeshApi, guarded: list[Any]) -> None:
    """`/` and `/console/FILE` (no key: they hold no data) and the JSON view (behind the key when one is set)."""
    files = load_console_files()

    def serve(name: str, if_none_match: str | None) -> Response:
        found = files.get(name)
        if found is None:
            raise HTTPException(404, f"no console file {name!r}")
        headers = {**_PAGE_HEADERS, "ETag": found.etag}
        if if_none_match == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, media_type=found.content_type, headers=headers)

    @app.get("/", include_in_schema=False)
    async def page(if_none_match: str | None = Header(default=None)) -> Response:
        return serve("index.html", if_none_match)

    @app.get("/console/{name}", include_in_schema=False)
    async def asset(name: str, if_none_match: str | None = Header(default=None)) -> Response:
        return serve(name, if_none_match)

    router = APIRouter(dependencies=guarded)

    @router.get(VIEW_PATH, include_in_schema=False)
    async def view() -> dict[str, Any]:
        return mesh_view(api, await api.rows(max_age=VIEW_MAX_AGE_S))

    app.include_router(router)
