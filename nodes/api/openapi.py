"""What `/openapi.json` says beyond FastAPI's defaults: each error status and what it means here, the route
headers, the event-stream answers; and FastAPI's 422 entries removed (validation errors are 400, OpenAI's way)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from .bodies import ErrorResponse

_DESCRIPTIONS = {
    400: "Bad input: invalid JSON, a field of the wrong type or range, a field lanmesh does not support "
    "(`code: unsupported_parameter`), or a model that cannot do this task.",
    401: "Missing or wrong API key (`Authorization: Bearer KEY`).",
    404: "No node in the mesh serves this model (or no such path).",
    408: "The request body did not arrive in time.",
    413: "The request body is larger than 8 MiB.",
    429: "Every node serving the model is busy; retry after `Retry-After` seconds.",
    500: "The model failed on this request.",
    502: "A node answered something this gateway cannot read.",
    503: "No live node can serve the model now (or the mesh loop does not answer); see `Retry-After`.",
    504: "The request's deadline (`X-Lanmesh-Timeout`, default 300 s) passed before an answer came.",
}
_RETRY_HEADER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[code]}
        if code in (429, 503):
            entry["headers"] = _RETRY_HEADER
        out[code] = entry
    return out


_ROUTE_HEADERS = {
    "X-Lanmesh-Node": {"description": "The node that served the request.", "schema": {"type": "string"}},
    "X-Lanmesh-Route": {
        "description": "Why it went there (`local`, `p2c:a<b`, `retry-after:...`); streams carry it in the last event.",
        "schema": {"type": "string"},
    },
}


def served_responses(model: type[BaseModel], streams: bool) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"model": model, "headers": _ROUTE_HEADERS, "description": "Served."}
    if streams:
        ok["content"] = {
            "text/event-stream": {
                "schema": {
                    "description": "With `stream: true`, one server-sent event per chunk, then `data: [DONE]`.",
                    "type": "object",
                    "properties": {"data": {"type": "string", "description": "A JSON chunk, or [DONE]."}},
                    "required": ["data"],
                }
            }
        }
        ok["description"] = "Served (JSON), or a stream of server-sent events with `stream: true`."
    return {200: ok}


def install_openapi(app: FastAPI) -> None:
    """The schema as served: validation errors are 400 here (OpenAI's way), so FastAPI's 422 entries go."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
