"""The HTTP routes of a node: OpenAI's chat, completions, embeddings and models, plus /health and /metrics, and the
API key every route but /health and the console's static files needs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request as HttpRequest

from mesh import BadRequest, RejectionLog, Result
from protocol import Task

from .answers import (
    ChatStream,
    TextStream,
    b64_vector,
    chat_answer,
    checked_chat,
    finish_reason,
    guidance_param,
    sse,
    stream_response,
    text_of,
    usage_of,
    vectors_of,
    whole_as_stream,
)
from .bodies import (
    DEFAULT_PROMPT,
    ApiError,
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
    Health,
    ModelCard,
    ModelList,
    Usage,
    unsupported,
)
from .errors import api_error, install_error_handlers
from .feed import note_caller, note_model
from .keys import CallerKeys
from .mesh_api import MeshApi, live_servers, model_names
from .metrics import CONTENT_TYPE, NodeMetrics
from .openapi import error_responses, install_openapi, served_responses
from .structured_output import read_answer
from .webconsole import install_console

log = logging.getLogger("lanmesh.gateway")

DEFAULT_TIMEOUT_S = 300.0  # a request's deadline when the caller sets no X-Lanmesh-Timeout
MAX_TIMEOUT_S = 86_400.0  # the wire's limit (one day)
MIN_TIMEOUT_S = 0.1


def _caller(request: HttpRequest) -> str:
    """Who is asking, for the mesh's per-client limits: the peer address (all callers share the node's key)."""
    return request.client.host if request.client is not None else "?"


def _served_headers(response: Response, result: Result) -> None:
    response.headers["X-Lanmesh-Node"] = result.node
    response.headers["X-Lanmesh-Route"] = result.route


def build_app(api: MeshApi, api_key: str | CallerKeys = "") -> FastAPI:
    """The FastAPI app: OpenAI-compatible routes, /health, /metrics and the web console; every route but /health
    and the console's static files (which hold no data) needs a key, and /health says more with one. `api_key`:
    the one key, or the keys per caller (`CallerKeys`, which holds the one key too)."""
    keys = api_key if isinstance(api_key, CallerKeys) else CallerKeys(None, api_key)
    app = FastAPI(
        title="lanmesh",
        version="1",
        summary="OpenAI-compatible API of a lanmesh node; requests are routed across the whole mesh.",
        docs_url=None,
        redoc_url=None,
    )
    guarded: list[Any] = [Depends(_key_check(keys, api.metrics))] if keys.configured() else []
    auth = (401,) if guarded else ()
    router = APIRouter(dependencies=guarded)
    inference = error_responses(400, *auth, 404, 408, 413, 429, 500, 502, 503, 504)
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
        responses={**served_responses(ChatCompletion, True), **inference},
        summary="Chat with a model served anywhere in the mesh (tools and JSON output included)",
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: HttpRequest, response: Response, timeout: float | None = timeout_header
    ) -> Any:
        body.check()
        shape = body.answer_shape()
        checks = body.answer_checks(shape)
        params = {**body.mesh_params(body.max_completion_tokens), **shape.params()}
        messages = body.wire_messages()
        seconds = timeout or DEFAULT_TIMEOUT_S
        caller = _caller(request)
        if checks.needed:  # the grammar cannot promise all of the schema: answers are checked, then sent
            result, text = await checked_chat(api, caller, body, shape, checks, messages, params, seconds)
            if body.streams:
                chat = ChatStream(shape.expects_calls, body.legacy_functions)
                return whole_as_stream(chat, result, text, body.model, body.include_usage)
        elif body.streams:
            chat = ChatStream(shape.expects_calls, body.legacy_functions)
            return await stream_response(
                api, chat, caller, body.model, Task.CHAT, messages, params, seconds, body, shape
            )
        else:
            try:
                result = await api.serve(caller, body.model, Task.CHAT, messages, params, seconds)
            except BadRequest as exc:
                raise api_error(exc, guidance_param(shape)) from None
            text = text_of(result, body.model)
            api.metrics.count_tokens(body.model, result.usage)
        reader = read_answer(text, shape.expects_calls)
        message, finish = chat_answer(reader, result.meta, body.legacy_functions)
        _served_headers(response, result)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=[ChatChoice(index=0, message=message, finish_reason=finish)],
            usage=usage_of(result.meta),
        )

    @router.post(
        "/v1/completions",
        response_model=Completion,
        responses={**served_responses(Completion, True), **inference},
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
            return await stream_response(
                api, shaper, caller, body.model, Task.COMPLETE, _model_prompt(prompts[0]), params, seconds, body
            )
        tasks = [
            asyncio.ensure_future(api.serve(caller, body.model, Task.COMPLETE, _model_prompt(p), params, seconds))
            for p in prompts
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
            text = (prompt if body.echo else "") + text_of(result, body.model)
            choices.append(CompletionChoice(index=i, text=text, finish_reason=finish_reason(result.meta)))
            api.metrics.count_tokens(body.model, result.usage)
            u = usage_of(result.meta)
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
        responses={**served_responses(EmbeddingList, False), **inference},
        summary="Embed one text or a list of texts",
    )
    async def embeddings(
        body: EmbeddingRequest, request: HttpRequest, response: Response, timeout: float | None = timeout_header
    ) -> Any:
        batch = body.texts()
        result = await api.serve(_caller(request), body.model, Task.EMBED, batch, {}, timeout or DEFAULT_TIMEOUT_S)
        vectors = vectors_of(result.output, len(batch))
        if vectors is None:
            raise ApiError(
                400,
                f"model {body.model!r} did not answer with one embedding vector per input; is it an embedding model?",
                param="model",
                code="not_an_embedding_model",
            )
        if body.dimensions is not None and body.dimensions != len(vectors[0]):
            # Shortening vectors is sound only for models trained for it (OpenAI's text-embedding-3); a model here
            # answers its own size, or the request is refused.
            size = f"dimensions={body.dimensions} (model {body.model!r} makes {len(vectors[0])})"
            raise unsupported("dimensions", size)
        api.metrics.count_tokens(body.model, result.usage)
        _served_headers(response, result)
        data = [
            Embedding(index=i, embedding=b64_vector(v) if body.encoding_format == "base64" else v)
            for i, v in enumerate(vectors)
        ]
        u = usage_of(result.meta)
        usage = EmbeddingUsage(prompt_tokens=u.prompt_tokens, total_tokens=u.total_tokens or u.prompt_tokens)
        return EmbeddingList(data=data, model=body.model, usage=usage)

    @router.get(
        "/v1/models",
        response_model=ModelList,
        responses=error_responses(*auth, 503),
        summary="Every model served anywhere in the mesh, with the nodes serving it",
    )
    async def models() -> ModelList:
        rows = await api.rows(max_age=0.5)
        if rows is None:
            raise ApiError(503, "this node's mesh loop did not answer", "service_unavailable_error", code="unavailable")
        names = model_names(rows)
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
            **error_responses(*auth),
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
        if not guarded or (scheme.lower() == "bearer" and keys.caller(given.strip()) is not None):
            body.node, body.models = api.node_id, sorted(me.get("models") or {})
        return body if body.ready else JSONResponse(body.model_dump(exclude_none=True), status_code=503)

    app.include_router(router)
    install_console(app, api, guarded)  # the web console at / (nodes/webconsole.py)
    install_error_handlers(app)
    install_openapi(app)
    return app


def _model_prompt(prompt: str) -> str:
    """What the model continues: an empty prompt is the start of a document, as OpenAI serves it."""
    return prompt or DEFAULT_PROMPT


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
        yield sse({**base, "choices": [choice]})
        if body.include_usage:
            yield sse({**base, "choices": [], "usage": Usage().model_dump()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- the key

# Module level: FastAPI evaluates the string annotation below in this module's globals.
BEARER = HTTPBearer(auto_error=False, description="The node's API key (--api-key, LANMESH_API_KEY or --api-key-file).")


def _key_check(keys: CallerKeys, metrics: NodeMetrics) -> Callable[..., Awaitable[None]]:
    refusals = RejectionLog()  # the first refusal from an address is logged at once, then a count per period
    arrivals = RejectionLog(every=600.0)  # each caller's name and address once per ten minutes: who uses the API

    async def check(
        request: HttpRequest, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> None:
        name = keys.caller(credentials.credentials) if credentials is not None else None
        if name is not None:
            request.state.api_caller = name
            note_caller(name)
            metrics.http_caller(name)
            if arrivals.note("http caller", f"{name}@{_caller(request)}", name) is not None:
                log.info("HTTP caller %s from %s", name, _caller(request), extra={"caller": name})
            return
        owner = keys.revoked_owner(credentials.credentials) if credentials is not None else None
        why = "no API key" if credentials is None else f"the revoked API key of {owner}" if owner else "wrong API key"
        kind = "http_unauthorized_revoked" if owner else "http_unauthorized"  # a revoked key in use: its own line
        metrics.http_unauthorized.inc()
        line = refusals.note(kind, _caller(request), f"{why} for {request.method} {request.url.path}")
        if line is not None:
            log.warning("refused an HTTP request: %s", line, extra={"source": _caller(request)})
        message = "missing API key: send Authorization: Bearer KEY" if credentials is None else "wrong API key"
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return check
