"""The web console every node serves at `/`: the static page shipped in `nodes/api/console_web/`, and the JSON view
it polls (`/console/api/mesh`) built from the node's status rows, its metrics' timeline and the request feed.

The page holds no data, so it loads without the API key; the view needs the key like every other API route.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Header, Response
from starlette.exceptions import HTTPException

from .mesh_api import MeshApi

log = logging.getLogger("lanmesh.gateway")

VIEW_PATH = "/console/api/mesh"
VIEW_MAX_AGE_S = 0.25  # the page polls every 0.5 s; several open pages share one status ping per 0.25 s
FEED_SENT = 50  # requests the page gets per poll (the newest)
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


# ---------------------------------------------------------------- the mesh view


def _node_row(row: dict[str, Any]) -> dict[str, Any]:
    """A status row as the page shows it: without the loop's counters and security details (the node's own row
    keeps the few the page shows). Unknown fields pass through, so new ones (model versions) reach the page."""
    out = {k: v for k, v in row.items() if k not in ("stats", "executor", "security")}
    if "stats" in row:
        out["stats"] = {k: row["stats"].get(k, 0) for k in _SHOWN_STATS}
    caches = {  # this node's chat engines: the share of prompt tokens their prefix caches spared
        model: round(s["prefix_reused_tokens"] / s["prefix_prompt_tokens"], 3) if s.get("prefix_prompt_tokens") else 0.0
        for model, s in (row.get("executor") or {}).items()
        if "prefix_reused_tokens" in s
    }
    if caches:
        out["prefix_reused"] = caches
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
    folder = resources.files("nodes.api").joinpath("console_web")
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
