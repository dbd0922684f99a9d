"""The OpenAI-compatible HTTP gateway of a node: FastAPI served by uvicorn in a thread of the node's own process.

Every HTTP request enters the mesh through one `AsyncClient` connected to this node's ROUTER, so it is routed,
forwarded and retried exactly like a ZeroMQ request; the gateway never touches the mesh loop's state.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from uvicorn.protocols.http.h11_impl import H11Protocol

from mesh import (
    AsyncClient,
    BadRequest,
    DeadlineExceeded,
    InternalError,
    LanmeshError,
    MeshUnavailable,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    Result,
    Unauthorized,
)
from protocol import Task

from .metrics import CONTENT_TYPE, NodeMetrics
from .webconsole import VIEW_PATH, RequestFeed, install_console, note_error, note_model, note_served, note_unfinished

if TYPE_CHECKING:
    from mesh._aclient import AsyncStream

log = logging.getLogger("lanmesh.gateway")

T = TypeVar("T")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 8 * 1024 * 1024  # the mesh's frame limit: a larger body could not travel anyway
HEADER_TIMEOUT_S = 10.0  # request line + headers must arrive within this (uvicorn alone has no such limit)
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this after the headers
KEEP_ALIVE_S = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 512  # uvicorn answers 503 past this many connections
DEFAULT_TIMEOUT_S = 300.0  # a request's deadline when the caller sets no X-Lanmesh-Timeout
MAX_TIMEOUT_S = 86_400.0  # the wire's limit (one day)
MIN_TIMEOUT_S = 0.1
WATCH_S = 0.5  # while a request waits, check this often whether any live node still serves its model
STATUS_TIMEOUT_S = 2.0
RETRY_AFTER_S = "1"
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")
_ENDPOINTS += (VIEW_PATH,)  # the web console's poll, so it is not lumped with unknown paths


# ---------------------------------------------------------------- request and response bodies (OpenAI's shapes)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


Stop = str | Annotated[list[str], Field(max_length=4)]


class _Sampling(BaseModel):
    """What chat and completions share. Unknown fields (presence_penalty, logit_bias, ...) are ignored."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=2**31)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: Stop | None = None
    n: int | None = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="Ignored.")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31, description="Wins over max_tokens.")


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)] = Field(
        description="One prompt, or several (one choice each; streaming takes one)."
    )


class EmbeddingRequest(BaseModel):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Must equal the model's own size if given.")
    user: str | None = Field(default=None, description="Ignored.")


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 values.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lanmesh"
    nodes: list[str] = Field(description="Live nodes serving this model (this node included).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ready", "unavailable", "leaving"]
    ready: bool
    node: str
    models: list[str] = Field(description="Models this node serves.")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=self.detail).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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


def api_error(exc: LanmeshError) -> ApiError:
    status, kind, code = next(
        (v for cls, v in _MESH_ERRORS.items() if isinstance(exc, cls)), (500, "server_error", "internal_error")
    )
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return ApiError(status, str(exc), kind, "model" if status == 404 else None, code, headers)


_DESCRIPTIONS = {
    400: "Bad input: invalid JSON, a field of the wrong type or range, or a model that cannot do this task.",
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


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
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


def _served(model: type[BaseModel], streams: bool) -> dict[int | str, dict[str, Any]]:
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


# ---------------------------------------------------------------- talking to the mesh


def live_servers(rows: list[dict[str, Any]], model: str) -> tuple[bool, list[str]]:
    """(whether any known node serves `model`, the live ones that do) in a node's status rows."""
    known, live = False, []
    for row in rows:
        if model in (row.get("models") or {}):
            known = True
            if row.get("state") in ("self", "alive"):
                live.append(str(row.get("node")))
    return known, sorted(live)


class MeshView:
    """This node's status rows, taken on the mesh loop through a status ping and shared for a moment.

    One fetch at a time: concurrent callers await the same ping, so a burst of requests costs one.
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] | None = None
        self._at = -1e9
        self._fetch: asyncio.Task[list[dict[str, Any]] | None] | None = None
        self._failing = False

    async def rows(self, client: AsyncClient, max_age: float) -> list[dict[str, Any]] | None:
        """Rows at most `max_age` seconds old; None when the mesh loop did not answer."""
        if self._rows is not None and time.monotonic() - self._at <= max_age:
            return self._rows
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.ensure_future(self._ping(client))
        return await asyncio.shield(self._fetch)

    async def _ping(self, client: AsyncClient) -> list[dict[str, Any]] | None:
        try:
            rows = await client.status(timeout=STATUS_TIMEOUT_S)
        except LanmeshError as exc:
            if not self._failing:
                log.warning("the mesh loop did not answer a status ping: %s", exc)
            self._failing = True
            return None
        self._failing = False
        self._rows, self._at = rows, time.monotonic()
        return rows


async def _next_piece(stream: AsyncStream) -> str | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class MeshApi:
    """What the HTTP handlers need: the client, the status view, the metrics, and the watch on waiting requests."""

    def __init__(self, node_id: str, metrics: NodeMetrics) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.view = MeshView()
        self.feed = RequestFeed()  # the web console's "recent requests"
        self.leaving = False
        self._client: AsyncClient | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise MeshUnavailable("the gateway is not connected to its node")
        return self._client

    def connect(self, client: AsyncClient | None) -> None:
        self._client = client

    async def rows(self, max_age: float) -> list[dict[str, Any]] | None:
        return await self.view.rows(self.client, max_age)

    async def watch(self, future: Awaitable[T], model: str) -> T:
        """Await a mesh answer; give up with MeshUnavailable once no live node serves `model` (seen twice).

        The mesh answers UNAVAILABLE quickly, but the client retries that until the deadline: for a model whose
        only servers died this turns a wait of the whole deadline into about a second.
        """
        task = asyncio.ensure_future(future)
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_S)
                if done:
                    return task.result()
                rows = await self.rows(max_age=WATCH_S / 2)
                known, live = live_servers(rows, model) if rows else (False, [])
                misses = misses + 1 if known and not live else 0
                if misses >= 2:
                    raise MeshUnavailable(f"no live node serves model {model!r} now")
        finally:
            if not task.done():
                task.cancel()

    async def serve(self, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float) -> Result:
        note_model(model)
        try:
            future = self.client.submit(model, task, payload, params=params, timeout=timeout)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        result = await self.watch(future, model)
        note_served(result)
        return result

    async def open_stream(
        self, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
    ) -> tuple[AsyncStream, str | None]:
        """Start a stream and wait for its first piece (None: it ended at once), so errors get their status."""
        note_model(model, stream=True)
        client = self.client
        start = client.chat if task is Task.CHAT else client.complete
        try:
            stream = await start(model, payload, stream=True, timeout=timeout, **params)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        try:
            first = await self.watch(_next_piece(stream), model)
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    async def next_piece(self, stream: AsyncStream, model: str) -> str | None:
        return await self.watch(_next_piece(stream), model)


_ROLES = {"developer": "system"}


def _params(body: _Sampling, max_completion_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI sampling fields -> the mesh's params (unset ones are left to the model's defaults)."""
    given = {
        "max_tokens": max_completion_tokens or body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
    }
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    return params


def _finish_reason(meta: dict[str, Any]) -> FinishReason:
    return "length" if meta.get("finish_reason") == "length" else "stop"


def _usage(meta: dict[str, Any]) -> Usage:
    raw = meta.get("usage")
    if not isinstance(raw, dict):
        return Usage()

    def count(key: str) -> int:
        n = raw.get(key)
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0

    prompt, completion = count("prompt_tokens"), count("completion_tokens")
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=count("total_tokens") or prompt + completion
    )


def _text(result: Result, model: str) -> str:
    try:
        return result.text
    except TypeError:
        raise ApiError(400, f"model {model!r} did not answer with text; is it a chat model?", param="model") from None


def _vectors(output: Any, count: int) -> list[list[float]] | None:
    out = output.get("embeddings") if isinstance(output, dict) else output
    if not isinstance(out, list) or len(out) != count:
        return None
    for vec in out:
        if not isinstance(vec, list) or not vec:
            return None
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vec):
            return None
    return out


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _served_headers(response: Response, result: Result) -> None:
    response.headers["X-Lanmesh-Node"] = result.node
    response.headers["X-Lanmesh-Route"] = result.route


# ---------------------------------------------------------------- the app


def build_app(api: MeshApi, api_key: str = "") -> FastAPI:
    """The FastAPI app: OpenAI-compatible routes, /health, /metrics and the web console; every route but /health
    and the console's static files (which hold no data) needs the key."""
    app = FastAPI(
        title="lanmesh",
        version="1",
        summary="OpenAI-compatible API of a lanmesh node; requests are routed across the whole mesh.",
        docs_url=None,
        redoc_url=None,
    )
    guarded: list[Any] = [Depends(_key_check(api_key))] if api_key else []
    auth = (401,) if api_key else ()
    router = APIRouter(dependencies=guarded)
    inference = _errors(400, *auth, 404, 408, 413, 429, 500, 502, 503, 504)
    timeout_header = Header(
        default=None,
        alias="X-Lanmesh-Timeout",
        ge=MIN_TIMEOUT_S,
        le=MAX_TIMEOUT_S,
        description=f"Seconds the mesh may take to answer (default {DEFAULT_TIMEOUT_S:g}); then 504.",
    )

    @router.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**_served(ChatCompletion, True), **inference},
        summary="Chat with a model served anywhere in the mesh",
    )
    async def chat_completions(
        body: ChatCompletionRequest, response: Response, timeout: float | None = timeout_header
    ) -> Any:
        # OpenAI's newer "developer" role is what models know as "system".
        messages = [{"role": _ROLES.get(m.role, m.role), "content": m.text()} for m in body.messages]
        params = _params(body, body.max_completion_tokens)
        seconds = timeout or DEFAULT_TIMEOUT_S
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(api, "chat", body.model, Task.CHAT, messages, params, seconds, include_usage)
        result = await api.serve(body.model, Task.CHAT, messages, params, seconds)
        text = _text(result, body.model)
        api.metrics.count_tokens(body.model, result.usage)
        _served_headers(response, result)
        choice = ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=_finish_reason(result.meta))
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=[choice],
            usage=_usage(result.meta),
        )

    @router.post(
        "/v1/completions",
        response_model=Completion,
        responses={**_served(Completion, True), **inference},
        summary="Continue a prompt",
    )
    async def completions(body: CompletionRequest, response: Response, timeout: float | None = timeout_header) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        params = _params(body)
        seconds = timeout or DEFAULT_TIMEOUT_S
        if body.stream:
            if len(prompts) != 1:
                raise ApiError(400, "streaming takes one prompt", param="prompt")
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(api, "text", body.model, Task.COMPLETE, prompts[0], params, seconds, include_usage)
        tasks = [asyncio.ensure_future(api.serve(body.model, Task.COMPLETE, p, params, seconds)) for p in prompts]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()  # one prompt failed: the others' answers would be thrown away
        usage = Usage()
        choices = []
        for i, result in enumerate(results):
            choices.append(
                CompletionChoice(index=i, text=_text(result, body.model), finish_reason=_finish_reason(result.meta))
            )
            api.metrics.count_tokens(body.model, result.usage)
            u = _usage(result.meta)
            usage.prompt_tokens += u.prompt_tokens
            usage.completion_tokens += u.completion_tokens
            usage.total_tokens += u.total_tokens
        _served_headers(response, results[0])
        return Completion(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, choices=choices, usage=usage
        )

    @router.post(
        "/v1/embeddings",
        response_model=EmbeddingList,
        responses={**_served(EmbeddingList, False), **inference},
        summary="Embed one text or a list of texts",
    )
    async def embeddings(body: EmbeddingRequest, response: Response, timeout: float | None = timeout_header) -> Any:
        batch = [body.input] if isinstance(body.input, str) else list(body.input)
        result = await api.serve(body.model, Task.EMBED, batch, {}, timeout or DEFAULT_TIMEOUT_S)
        vectors = _vectors(result.output, len(batch))
        if vectors is None:
            raise ApiError(
                400,
                f"model {body.model!r} did not answer with one embedding vector per input; is it an embedding model?",
                param="model",
                code="not_an_embedding_model",
            )
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            raise ApiError(400, f"model {body.model!r} makes {len(vectors[0])} dimensions", param="dimensions")
        api.metrics.count_tokens(body.model, result.usage)
        _served_headers(response, result)
        data = [
            Embedding(index=i, embedding=_b64(v) if body.encoding_format == "base64" else v)
            for i, v in enumerate(vectors)
        ]
        u = _usage(result.meta)
        usage = EmbeddingUsage(prompt_tokens=u.prompt_tokens, total_tokens=u.total_tokens or u.prompt_tokens)
        return EmbeddingList(data=data, model=body.model, usage=usage)

    @router.get(
        "/v1/models",
        response_model=ModelList,
        responses=_errors(*auth, 503),
        summary="Every model served anywhere in the mesh, with the nodes serving it",
    )
    async def models() -> ModelList:
        rows = await api.rows(max_age=0.5)
        if rows is None:
            raise ApiError(503, "this node's mesh loop did not answer", "service_unavailable_error", code="unavailable")
        names = sorted({m for row in rows for m in (row.get("models") or {})})
        cards = []
        for name in names:
            _known, nodes = live_servers(rows, name)
            if nodes:
                cards.append(ModelCard(id=name, nodes=nodes))
        return ModelList(data=cards)

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."},
            **_errors(*auth),
        },
        summary="Prometheus metrics of this node",
    )
    async def metrics() -> Response:
        rows = await api.rows(max_age=0.0)
        return Response(api.metrics.render(rows), media_type=CONTENT_TYPE)

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready: the mesh loop does not answer, or leaving."}},
        summary="Liveness and readiness (no key needed)",
    )
    async def health() -> Any:
        rows = await api.rows(max_age=0.5)
        me = rows[0] if rows else {}
        models = sorted(me.get("models") or {})
        if api.leaving or me.get("state") == "leaving":
            status: Literal["ready", "unavailable", "leaving"] = "leaving"
        else:
            status = "ready" if me.get("state") == "self" else "unavailable"
        body = Health(status=status, ready=status == "ready", node=api.node_id, models=models)
        return body if body.ready else JSONResponse(body.model_dump(), status_code=503)

    app.include_router(router)
    install_console(app, api, guarded)  # the web console at / (nodes/webconsole.py)
    _install_error_handlers(app)
    _install_openapi(app)
    return app


async def _stream(
    api: MeshApi,
    kind: Literal["chat", "text"],
    model: str,
    task: Task,
    payload: Any,
    params: dict[str, Any],
    timeout: float,
    include_usage: bool,
) -> StreamingResponse:
    stream, first = await api.open_stream(model, task, payload, params, timeout)
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    base = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created}
    base["model"] = model

    def chunk(piece: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if piece is not None:
                delta["content"] = piece
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
        return {**base, "choices": [choice]}

    async def events() -> AsyncIterator[str]:
        pieces = 0
        try:
            if kind == "chat":
                yield _sse(chunk(None, role=True))
            piece = first
            while piece is not None:
                yield _sse(chunk(piece))
                pieces += 1
                piece = await api.next_piece(stream, model)
            result = stream.result
            meta = result.meta if result is not None else {}
            last = chunk(None, finish=_finish_reason(meta))
            if result is not None:
                last["lanmesh"] = {"node": result.node, "route": result.route}
                api.metrics.count_tokens(model, result.usage)
                note_served(result, pieces)
            yield _sse(last)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(meta).model_dump()})
            yield "data: [DONE]\n\n"
        except LanmeshError as exc:
            # The status line went out with the first event: a later failure can only be an error event.
            note_error(str(exc))
            yield _sse(ErrorResponse(error=api_error(exc).detail).model_dump())
        finally:
            if stream.result is None:
                note_unfinished(stream.node, pieces)
            await stream.aclose()

    headers = {"X-Lanmesh-Node": stream.node, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# Module level: FastAPI evaluates the string annotation below in this module's globals.
BEARER = HTTPBearer(auto_error=False, description="The node's API key (--api-key, LANMESH_API_KEY or --api-key-file).")


def _key_check(api_key: str) -> Callable[..., Awaitable[None]]:
    expected = api_key.encode()

    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if credentials is None:
            raise ApiError(401, "missing API key: send Authorization: Bearer KEY", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(401, "wrong API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        note_error(exc.detail.message)
        return exc.response()

    async def on_mesh_error(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, LanmeshError)
        note_error(str(exc))
        return api_error(exc).response()

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


def _install_openapi(app: FastAPI) -> None:
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


# ---------------------------------------------------------------- limits below the app


class BodyGuard:
    """ASGI middleware in front of the app: body size and read-time limits, and the HTTP metrics.

    The body is read here in full (at most MAX_BODY_BYTES, within BODY_TIMEOUT_S) and replayed to the app, so
    an oversized or trickled body is refused before any handler runs.
    """

    def __init__(self, app: ASGIApp, metrics: NodeMetrics, feed: RequestFeed | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.feed = feed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = 500
        entry = self.feed.open(scope["path"]) if self.feed is not None else None  # the web console's feed

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if isinstance(body, ApiError):
                await body.response()(scope, receive, send_and_note)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: only http.disconnect comes

            await self.app(scope, replay, send_and_note)
        finally:
            self.metrics.http_done(endpoint, status, time.monotonic() - started)
            if entry is not None and self.feed is not None:
                self.feed.file(entry, status, time.monotonic() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | ApiError:
        close = {"Connection": "close"}
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
                return ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", headers=close)
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        return ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", headers=close)
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return ApiError(408, f"the body did not arrive within {BODY_TIMEOUT_S:g}s", headers=close)
        return b"".join(parts)


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request line and headers.

    uvicorn times out idle keep-alive connections only after a response; a client that connects and trickles
    its headers would hold a connection (and a slot of MAX_CONNECTIONS) for ever.
    """

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_head_timer()  # a request's headers are in: the body and the app have their own limits

    def on_response_complete(self) -> None:
        self._arm_head_timer()  # before super(): it may start a pipelined request, which cancels the timer
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()


# ---------------------------------------------------------------- the server thread


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens and which node it talks to."""

    node_id: str
    host: str
    port: int
    mesh_endpoint: str  # this node's ROUTER, e.g. 127.0.0.1:5555
    api_key: str = ""
    grace: float = 10.0  # seconds in-flight HTTP requests get when the node stops


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is an error at start, not in a thread later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve HTTP host {host!r}: {exc}") from None
    family, kind, proto, _name, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


class Gateway:
    """The HTTP server of one node: its own thread and event loop; `start()` returns once it accepts."""

    def __init__(self, settings: GatewaySettings, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.api = MeshApi(settings.node_id, metrics)
        self.app = build_app(self.api, settings.api_key)
        self.port = settings.port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        sock = bind_socket(self.settings.host, self.settings.port)
        self.port = int(sock.getsockname()[1])
        _route_uvicorn_logs()
        config = uvicorn.Config(
            BodyGuard(self.app, self.api.metrics, self.api.feed),
            http=HeaderDeadlineH11,
            loop="asyncio",  # zmq.asyncio needs a loop with add_reader; the stdlib one is the one it is tested on
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            limit_concurrency=MAX_CONNECTIONS,
            timeout_graceful_shutdown=max(1, int(self.settings.grace)),
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="http-gateway", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self._server.should_exit = True
                raise OSError("the HTTP gateway did not start; see the log above")
            time.sleep(0.01)
        log.info("HTTP gateway on %s (web console at /, OpenAI API under /v1, metrics at /metrics)", self.url)

    def begin_stop(self) -> None:
        """Stop accepting connections and say 'leaving' on /health; requests in flight go on."""
        self.api.leaving = True
        if self._server is not None:
            self._server.should_exit = True

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for requests in flight, then close."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(2.0)

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except Exception:
            log.exception("the HTTP gateway stopped on an error")
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        client = AsyncClient(
            self.settings.mesh_endpoint, timeout=DEFAULT_TIMEOUT_S, client_id=f"http@{self.api.node_id}"
        )
        self.api.connect(client)
        try:
            await self._server.serve(sockets=[sock])
        finally:
            self.api.connect(None)
            await client.close()


def _route_uvicorn_logs() -> None:
    """uvicorn's own warnings and errors go through the node's log handler (its INFO chatter does not)."""
    ours = logging.getLogger("lanmesh")
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = ours.handlers
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def mesh_endpoint(bind: str, port: int) -> str:
    """Where the gateway reaches its own node: loopback when the ROUTER listens on every address."""
    if bind in ("0.0.0.0", "*", ""):
        return f"127.0.0.1:{port}"
    if bind in ("::", "[::]"):
        return f"[::1]:{port}"
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
