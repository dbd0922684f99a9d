"""The OpenAI-compatible HTTP gateway of a node: FastAPI served by uvicorn in a thread of the node's own process.

Every HTTP request enters the mesh through an `AsyncClient` connected to this node's ROUTER, one per caller
(`mesh_callers.py`), so it is routed, forwarded and retried exactly like a ZeroMQ request, and the mesh's
per-client limits see each caller apart; the gateway never touches the mesh loop's state. The bodies and what
each field means are in `openai_bodies.py`, tools and structured output in `structured_output.py`, connection
caps and deadlines in `http_guard.py`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import uvicorn
import zmq.asyncio
from fastapi import APIRouter, Depends, FastAPI, Header, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

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
from mesh._security import RejectionLog
from protocol import Task

from .config import check_api_key
from .http_guard import KEEP_ALIVE_S, BodyGuard, ConnectionBook, GuardedH11, Listener
from .mesh_callers import CallerClients, Lease
from .metrics import CONTENT_TYPE, NodeMetrics
from .openai_bodies import (
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    ErrorResponse,
    FinishReason,
    FunctionCallOut,
    Health,
    ModelCard,
    ModelList,
    ToolCall,
    Usage,
)
from .structured_output import AnswerReader, AnswerShape, ArgumentsDelta, CallStart, ContentDelta, Delta, read_answer
from .webconsole import VIEW_PATH, RequestFeed, install_console, note_error, note_model, note_served, note_unfinished

if TYPE_CHECKING:
    from mesh._aclient import AsyncStream

log = logging.getLogger("lanmesh.gateway")

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0  # a request's deadline when the caller sets no X-Lanmesh-Timeout
MAX_TIMEOUT_S = 86_400.0  # the wire's limit (one day)
MIN_TIMEOUT_S = 0.1
WATCH_S = 0.5  # while a request waits, check this often whether any live node still serves its model
STATUS_TIMEOUT_S = 2.0
RETRY_AFTER_S = "1"
_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", VIEW_PATH}
)


# ---------------------------------------------------------------- errors

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


def api_error(exc: LanmeshError, guidance_param: str | None = None) -> ApiError:
    """The HTTP error for a mesh error; `guidance_param` names the field a refused grammar came from."""
    status, kind, code = next(
        (v for cls, v in _MESH_ERRORS.items() if isinstance(exc, cls)), (500, "server_error", "internal_error")
    )
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    param = "model" if status == 404 else None
    if status == 400:
        message = str(exc)
        param = next((p for p in _NAMED_PARAMS if message.startswith(p)), None)
        if param == "guidance":
            param = guidance_param
    return ApiError(status, str(exc), kind, param, code, headers)


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
    name, _, pin = model.partition("@")
    for row in rows:
        served = row.get("models") or {}
        current = served.get(name)
        pinned_current = bool(pin) and isinstance(current, list) and len(current) > 3 and current[3].startswith(pin)
        if model in served or pinned_current:  # status rows show a current version under its name alone
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
    """What the HTTP handlers need: the callers' clients, the status view, the metrics, the watch on waiting
    requests."""

    def __init__(self, node_id: str, metrics: NodeMetrics) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.view = MeshView()
        self.feed = RequestFeed()  # the web console's "recent requests"
        self.leaving = False
        self._client: AsyncClient | None = None  # the gateway's own: status pings, and callers past the LRU
        self._callers: CallerClients | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise MeshUnavailable("the gateway is not connected to its node")
        return self._client

    @property
    def callers(self) -> CallerClients:
        if self._callers is None:
            raise MeshUnavailable("the gateway is not connected to its node")
        return self._callers

    def connect(self, client: AsyncClient | None, callers: CallerClients | None = None) -> None:
        self._client = client
        self._callers = callers

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
                task.cancel()  # also when the caller went away: the request's future is cancelled with it

    async def serve(
        self, caller: str, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
    ) -> Result:
        note_model(model)
        with self.callers.lease(caller) as lease:
            try:
                future = lease.client.submit(model, task, payload, params=params, timeout=timeout)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            result = await self.watch(future, model)
        note_served(result)
        return result

    async def open_stream(
        self, caller: str, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
    ) -> tuple[AsyncStream, str | None, Lease]:
        """Start a stream and wait for its first piece (None: it ended at once), so errors get their status.

        The caller's lease travels with the stream: release it when the stream ends.
        """
        note_model(model, stream=True)
        lease = self.callers.lease(caller)
        try:
            try:
                stream = await _start_stream(lease.client, model, task, payload, params, timeout)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            try:
                first = await self.watch(_next_piece(stream), model)
            except BaseException:
                await stream.aclose()
                raise
        except BaseException:
            lease.release()
            raise
        return stream, first, lease

    async def next_piece(self, stream: AsyncStream, model: str) -> str | None:
        return await self.watch(_next_piece(stream), model)


async def _start_stream(
    client: AsyncClient, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
) -> AsyncStream:
    """A streamed request with any params (tools, guidance)."""
    return await client.stream(model, task, payload, params=params, timeout=timeout)


def _caller(request: HttpRequest) -> str:
    """Who is asking, for the mesh's per-client limits: the peer address (all callers share the node's key)."""
    return request.client.host if request.client is not None else "?"


def _finish_reason(meta: dict[str, Any]) -> Literal["stop", "length"]:
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


def _guidance_param(shape: AnswerShape) -> str:
    """The request field a grammar the node refused came from."""
    return "tools" if shape.expects_calls else "response_format"


def _chat_answer(reader: AnswerReader, meta: dict[str, Any], legacy: bool) -> tuple[AssistantMessage, FinishReason]:
    """A whole chat answer in OpenAI's shape: content, or tool calls (or the deprecated function_call)."""
    cut = _finish_reason(meta) == "length"
    if not reader.calls:
        return AssistantMessage(content=reader.content), _finish_reason(meta)
    calls = [ToolCall(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in reader.calls]
    content = reader.content or None
    if legacy:
        message = AssistantMessage(content=content, function_call=calls[0].function)
        return message, "length" if cut else "function_call"
    return AssistantMessage(content=content, tool_calls=calls), "length" if cut else "tool_calls"


def _delta(delta: Delta, legacy: bool) -> dict[str, Any]:
    """One piece of a streamed chat answer as OpenAI's `delta`."""
    if isinstance(delta, ContentDelta):
        return {"content": delta.text}
    if legacy:
        if isinstance(delta, CallStart):
            return {"function_call": {"name": delta.name, "arguments": ""}}
        return {"function_call": {"arguments": delta.text}}
    if isinstance(delta, CallStart):
        start = {"index": delta.index, "id": delta.id, "type": "function"}
        return {"tool_calls": [{**start, "function": {"name": delta.name, "arguments": ""}}]}
    assert isinstance(delta, ArgumentsDelta)
    return {"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]}


# ---------------------------------------------------------------- the app


def build_app(api: MeshApi, api_key: str = "") -> FastAPI:
    """The FastAPI app: OpenAI-compatible routes, /health, /metrics and the web console; every route but /health
    and the console's static files (which hold no data) needs the key, and /health says more with it."""
    app = FastAPI(
        title="lanmesh",
        version="1",
        summary="OpenAI-compatible API of a lanmesh node; requests are routed across the whole mesh.",
        docs_url=None,
        redoc_url=None,
    )
    guarded: list[Any] = [Depends(_key_check(api_key, api.metrics))] if api_key else []
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
        summary="Chat with a model served anywhere in the mesh (tools and JSON output included)",
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: HttpRequest, response: Response, timeout: float | None = timeout_header
    ) -> Any:
        body.check()
        shape = body.answer_shape()
        params = {**body.mesh_params(body.max_completion_tokens), **shape.params()}
        messages = body.wire_messages()
        seconds = timeout or DEFAULT_TIMEOUT_S
        caller = _caller(request)
        if body.streams:
            chat = ChatStream(shape.expects_calls, body.legacy_functions)
            return await _stream(api, chat, caller, body.model, Task.CHAT, messages, params, seconds, body, shape)
        try:
            result = await api.serve(caller, body.model, Task.CHAT, messages, params, seconds)
        except BadRequest as exc:
            raise api_error(exc, _guidance_param(shape)) from None
        reader = read_answer(_text(result, body.model), shape.expects_calls)
        message, finish = _chat_answer(reader, result.meta, body.legacy_functions)
        api.metrics.count_tokens(body.model, result.usage)
        _served_headers(response, result)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=[ChatChoice(index=0, message=message, finish_reason=finish)],
            usage=_usage(result.meta),
        )

    @router.post(
        "/v1/completions",
        response_model=Completion,
        responses={**_served(Completion, True), **inference},
        summary="Continue a prompt",
    )
    async def completions(
        body: CompletionRequest, request: HttpRequest, response: Response, timeout: float | None = timeout_header
    ) -> Any:
        body.check()
        prompts = body.prompts()
        params = body.mesh_params()
        seconds = timeout or DEFAULT_TIMEOUT_S
        caller = _caller(request)
        if body.max_tokens == 0:  # nothing to generate: the prompt (with echo) or nothing, from a known model
            return await _no_new_tokens(api, body, prompts)
        if body.streams:
            shaper = TextStream(prompts[0] if body.echo else "")
            return await _stream(api, shaper, caller, body.model, Task.COMPLETE, prompts[0], params, seconds, body)
        tasks = [
            asyncio.ensure_future(api.serve(caller, body.model, Task.COMPLETE, p, params, seconds)) for p in prompts
        ]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()  # one prompt failed (or the caller left): the others' answers would be thrown away
        usage = Usage()
        choices = []
        for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            text = (prompt if body.echo else "") + _text(result, body.model)
            choices.append(CompletionChoice(index=i, text=text, finish_reason=_finish_reason(result.meta)))
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
    async def embeddings(
        body: EmbeddingRequest, request: HttpRequest, response: Response, timeout: float | None = timeout_header
    ) -> Any:
        batch = body.texts()
        result = await api.serve(_caller(request), body.model, Task.EMBED, batch, {}, timeout or DEFAULT_TIMEOUT_S)
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
        response_model_exclude_none=True,
        responses={503: {"model": Health, "description": "Not ready: the mesh loop does not answer, or leaving."}},
        summary="Up or down (no key needed); with the key (or on a node without one) also the node and its models",
    )
    async def health(request: HttpRequest) -> Any:
        rows = await api.rows(max_age=0.5)
        me = rows[0] if rows else {}
        if api.leaving or me.get("state") == "leaving":
            status: Literal["ready", "unavailable", "leaving"] = "leaving"
        else:
            status = "ready" if me.get("state") == "self" else "unavailable"
        body = Health(status=status, ready=status == "ready")
        # Read by hand, not through BEARER: /health declares no security, since it answers without a key.
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if not api_key or (scheme.lower() == "bearer" and _key_matches(given.strip(), api_key)):
            body.node, body.models = api.node_id, sorted(me.get("models") or {})
        return body if body.ready else JSONResponse(body.model_dump(exclude_none=True), status_code=503)

    app.include_router(router)
    install_console(app, api, guarded)  # the web console at / (nodes/webconsole.py)
    _install_error_handlers(app)
    _install_openapi(app)
    return app


async def _no_new_tokens(api: MeshApi, body: CompletionRequest, prompts: list[str]) -> Any:
    """A completion with max_tokens 0 (scoring a prompt, in OpenAI's use): no model runs; the model must exist."""
    note_model(body.model)
    rows = await api.rows(max_age=0.5)
    known, _live = live_servers(rows or [], body.model)
    if not known:
        raise ApiError(404, f"no node serves model {body.model!r}", param="model", code="model_not_found")
    texts = [p if body.echo else "" for p in prompts]
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.streams:
        choices = [CompletionChoice(index=i, text=t, finish_reason="length") for i, t in enumerate(texts)]
        return Completion(id=ident, created=created, model=body.model, choices=choices, usage=Usage())
    base = {"id": ident, "object": "text_completion", "created": created, "model": body.model}

    async def events() -> AsyncIterator[str]:
        choice = {"index": 0, "text": texts[0], "finish_reason": "length", "logprobs": None}
        yield _sse({**base, "choices": [choice]})
        if body.include_usage:
            yield _sse({**base, "choices": [], "usage": Usage().model_dump()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- streams


class ChatStream:
    """Turns a chat model's text pieces into OpenAI chat.completion.chunk deltas (tool calls included)."""

    kind = "chat"

    def __init__(self, expects_calls: bool, legacy: bool) -> None:
        self.reader = AnswerReader(expects_calls)
        self.legacy = legacy
        self._role_sent = False

    def deltas(self, piece: str | None) -> list[dict[str, Any]]:
        """The deltas for one piece; None: the answer has ended (flush what was held back)."""
        found = self.reader.feed(piece) if piece is not None else self.reader.finish()
        out = [_delta(d, self.legacy) for d in found]
        if piece is None and not self._role_sent:
            out.append({"content": ""})  # an empty answer still says who spoke
        if out and not self._role_sent:
            self._role_sent = True
            out[0] = {"role": "assistant", **out[0]}
            if "content" not in out[0]:
                out[0]["content"] = None  # a call begins the answer: no content, as OpenAI sends it
        return out

    def finish(self, meta: dict[str, Any]) -> str:
        cut = _finish_reason(meta) == "length"
        if cut or not self.reader.calls:
            return _finish_reason(meta)
        return "function_call" if self.legacy else "tool_calls"

    def choice(self, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "delta": delta or {}, "finish_reason": finish, "logprobs": None}


class TextStream:
    """Turns a completion's text pieces into OpenAI text_completion chunks (the prompt first, with echo)."""

    kind = "text"

    def __init__(self, echo: str) -> None:
        self._echo = echo

    def deltas(self, piece: str | None) -> list[dict[str, Any]]:
        text = self._echo + (piece or "")
        self._echo = ""
        return [{"text": text}] if text else []

    def finish(self, meta: dict[str, Any]) -> str:
        return _finish_reason(meta)

    def choice(self, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": (delta or {}).get("text", ""), "finish_reason": finish, "logprobs": None}


async def _stream(
    api: MeshApi,
    shaper: ChatStream | TextStream,
    caller: str,
    model: str,
    task: Task,
    payload: Any,
    params: dict[str, Any],
    timeout: float,
    body: ChatCompletionRequest | CompletionRequest,
    shape: AnswerShape | None = None,
) -> StreamingResponse:
    try:
        stream, first, lease = await api.open_stream(caller, model, task, payload, params, timeout)
    except BadRequest as exc:
        raise api_error(exc, _guidance_param(shape) if shape is not None else None) from None
    kind = shaper.kind
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    base: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    base |= {"created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [shaper.choice(delta, finish)]}

    async def events() -> AsyncIterator[str]:
        pieces = 0
        try:
            piece = first
            while piece is not None:
                for delta in shaper.deltas(piece):
                    yield _sse(chunk(delta))
                pieces += 1
                piece = await api.next_piece(stream, model)
            for delta in shaper.deltas(None):
                yield _sse(chunk(delta))
            result = stream.result
            meta = result.meta if result is not None else {}
            last = chunk(None, shaper.finish(meta))
            if result is not None:
                last["lanmesh"] = {"node": result.node, "route": result.route}
                api.metrics.count_tokens(model, result.usage)
                note_served(result, pieces)
            yield _sse(last)
            if body.include_usage:
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
            lease.release()

    headers = {"X-Lanmesh-Node": stream.node, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# ---------------------------------------------------------------- the key

# Module level: FastAPI evaluates the string annotation below in this module's globals.
BEARER = HTTPBearer(auto_error=False, description="The node's API key (--api-key, LANMESH_API_KEY or --api-key-file).")


def _key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _key_check(api_key: str, metrics: NodeMetrics) -> Callable[..., Awaitable[None]]:
    refusals = RejectionLog()  # the first refusal from an address is logged at once, then a count per period

    async def check(
        request: HttpRequest, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> None:
        if credentials is not None and _key_matches(credentials.credentials, api_key):
            return
        why = "no API key" if credentials is None else "wrong API key"
        metrics.http_unauthorized.inc()
        line = refusals.note("http_unauthorized", _caller(request), f"{why} for {request.method} {request.url.path}")
        if line is not None:
            log.warning("refused an HTTP request: %s", line, extra={"source": _caller(request)})
        message = "missing API key: send Authorization: Bearer KEY" if credentials is None else "wrong API key"
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

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


class GatewayServer(uvicorn.Server):
    """uvicorn's server with our `Listener` accepting on its socket (uvicorn itself listens on nothing)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, book: ConnectionBook) -> None:
        super().__init__(config)
        self.sock = sock
        self.book = book
        self.listener: Listener | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        config = self.config
        make = functools.partial(
            config.http_protocol_class,  # type: ignore[call-arg]  # uvicorn's protocols take these, asyncio's not
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        self.listener = Listener(self.sock, self.book, make)
        self.listener.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.listener is not None:
            self.listener.stop()  # accept nothing more; requests in flight get their grace
        await super().shutdown()


class Gateway:
    """The HTTP server of one node: its own thread and event loop; `start()` returns once it accepts."""

    def __init__(self, settings: GatewaySettings, metrics: NodeMetrics) -> None:
        if settings.api_key:
            check_api_key(settings.api_key, "the gateway's API key")  # NodeConfig checks it at start already
        self.settings = settings
        self.api = MeshApi(settings.node_id, metrics)
        self.app = build_app(self.api, settings.api_key)
        self.connections = ConnectionBook(metrics=metrics)
        self.port = settings.port
        self._server: GatewayServer | None = None
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
            BodyGuard(self.app, self.api.metrics, self.api.feed, _ENDPOINTS),
            http=functools.partial(GuardedH11, book=self.connections),  # type: ignore[arg-type]
            loop="asyncio",  # zmq.asyncio needs a loop with add_reader; the stdlib one is the one it is tested on
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            timeout_graceful_shutdown=max(1, int(self.settings.grace)),
        )
        self._server = GatewayServer(config, sock, self.connections)
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
        endpoint, node = self.settings.mesh_endpoint, self.api.node_id
        # learn=False: the gateway enters the mesh at its own node and dies with it, so learning other nodes would
        # only open (and keep handshaking) up to 16 more connections per caller's client.
        # One ZeroMQ context for all of them: a client per caller costs sockets, not two more threads each.
        ctx = zmq.asyncio.Context()
        own = AsyncClient(endpoint, timeout=DEFAULT_TIMEOUT_S, client_id=f"http@{node}", learn=False, context=ctx)

        def caller_client(caller: str) -> AsyncClient:
            return AsyncClient(endpoint, timeout=DEFAULT_TIMEOUT_S, client_id=f"http:{caller}@{node}", learn=False,
                               context=ctx)  # fmt: skip

        callers = CallerClients(caller_client, own)
        self.api.connect(own, callers)
        sweeper = asyncio.ensure_future(callers.sweep_forever())
        try:
            await self._server.serve()
        finally:
            self.api.connect(None)
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await callers.close()
            await own.close()
            ctx.destroy(linger=100)  # every client closed its sockets; this closes any a bug left open


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
