"""How a mesh error becomes an HTTP error in OpenAI's shape, and the app's handlers for every error it can meet."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from mesh import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    LanmeshError,
    MeshUnavailable,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    Unauthorized,
)

from ..models.backends.textgen import CONTEXT_EXCEEDED
from .bodies import ApiError
from .feed import note_error

RETRY_AFTER_S = "1"


# Mesh error -> (HTTP status, OpenAI error type, code). A retry cannot fix 400/404; 429/503 say when to retry.
_MESH_ERRORS: dict[type[LanmeshError], tuple[int, str, str]] = {
    BadRequest: (400, "invalid_request_error", "bad_request"),
    ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    Overloaded: (429, "rate_limit_error", "overloaded"),
    DeadlineExceeded: (504, "timeout_error", "deadline_exceeded"),
    MeshUnavailable: (503, "service_unavailable_error", "unavailable"),
    Unauthorized: (500, "server_error", "mesh_refused_gateway"),  # the node's own key setup is wrong
    InternalError: (500, "server_error", "internal_error"),
    ProtocolError: (502, "server_error", "bad_reply"),
}
# A node's BAD_REQUEST names the param it refused first in its message (`max_tokens 5000 is over ...`).
_NAMED_PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop", "tools", "guidance")


def api_error(exc: LanmeshError, guidance_param: str | None = None, prompt_param: str = "messages") -> ApiError:
    """The HTTP error for a mesh error; `guidance_param` names the field a refused grammar came from, and
    `prompt_param` the field that holds the prompt (`messages`, or completions' `prompt`)."""
    status, kind, code = next(
        (v for cls, v in _MESH_ERRORS.items() if isinstance(exc, cls)), (500, "server_error", "internal_error")
    )
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    param = "model" if status == 404 else None
    if status == 400 and str(exc).startswith(CONTEXT_EXCEEDED):
        # As OpenAI sends it: openai-python's BadRequestError with this code, langchain's ContextOverflowError.
        message = str(exc) if prompt_param == "messages" else str(exc).replace("messages", prompt_param)
        return ApiError(400, message, kind, prompt_param, "context_length_exceeded")
    if status == 400:
        message = str(exc)
        param = next((p for p in _NAMED_PARAMS if message.startswith(p)), None)
        if param == "guidance":
            param = guidance_param
    return ApiError(status, str(exc), kind, param, code, headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        note_error(exc.detail.message)
        return exc.response()

    async def on_mesh_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, LanmeshError)
        note_error(str(exc))
        return api_error(exc, prompt_param="prompt" if request.url.path == "/v1/completions" else "messages").response()

    async def on_invalid(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ())]
        param = ".".join(loc[1:]) if loc[:1] == ["body"] else (loc[-1] if loc else None)
        if first.get("type") == "json_invalid":
            param = None  # the location is a character offset, not a field
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid')}"
            if len(errors) > 1:
                message += f" (and {len(errors) - 1} more problems)"
        note_error(message)
        return ApiError(400, message, param=param or None, code="invalid_value").response()

    async def on_http(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {})).response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(LanmeshError, on_mesh_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)
