"""A mesh `Result` as OpenAI's answers: whole chat and completion answers, embeddings' vectors, and the streams of
server-sent events (chat deltas with tool calls, text completions)."""

from __future__ import annotations

import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi.responses import StreamingResponse

from mesh import BadRequest, DeadlineExceeded, LanmeshError, Result
from protocol import Task

from .bodies import (
    ApiError,
    AssistantMessage,
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    FinishReason,
    FunctionCallOut,
    PromptTokensDetails,
    ToolCall,
    Usage,
)
from .errors import api_error
from .feed import note_error, note_served, note_unfinished
from .mesh_api import MeshApi
from .schema_checks import SCHEMA_TRIES, AnswerChecks, resampled
from .structured_output import (
    AnswerReader,
    AnswerShape,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Delta,
    read_answer,
)

log = logging.getLogger("lanmesh.gateway")


def finish_reason(meta: dict[str, Any]) -> Literal["stop", "length"]:
    return "length" if meta.get("finish_reason") == "length" else "stop"


def usage_of(meta: dict[str, Any]) -> Usage:
    raw = meta.get("usage")
    if not isinstance(raw, dict):
        return Usage()

    def count(key: str) -> int:
        n = raw.get(key)
        return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0

    prompt, completion = count("prompt_tokens"), count("completion_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=count("total_tokens") or prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=count("cached_tokens")),
    )


def text_of(result: Result, model: str) -> str:
    try:
        return result.text
    except TypeError:
        why = f"model {model!r} did not answer with text; is it a chat model?"
        raise ApiError(400, why, param="model", code="not_a_chat_model") from None


def vectors_of(output: Any, count: int) -> list[list[float]] | None:
    out = output.get("embeddings") if isinstance(output, dict) else output
    if not isinstance(out, list) or len(out) != count:
        return None
    for vec in out:
        if not isinstance(vec, list) or not vec:
            return None
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vec):
            return None
    return out


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def guidance_param(shape: AnswerShape) -> str:
    """The request field a grammar the node refused came from."""
    return "tools" if shape.expects_calls else "response_format"


def chat_answer(reader: AnswerReader, meta: dict[str, Any], legacy: bool) -> tuple[AssistantMessage, FinishReason]:
    """A whole chat answer in OpenAI's shape: content, or tool calls (or the deprecated function_call)."""
    cut = finish_reason(meta) == "length"
    if not reader.calls:
        return AssistantMessage(content=reader.content), finish_reason(meta)
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
        cut = finish_reason(meta) == "length"
        if cut or not self.reader.calls:
            return finish_reason(meta)
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
        return finish_reason(meta)

    def choice(self, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": (delta or {}).get("text", ""), "finish_reason": finish, "logprobs": None}


async def stream_response(
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
        prompt = "messages" if shaper.kind == "chat" else "prompt"
        raise api_error(exc, guidance_param(shape) if shape is not None else None, prompt) from None
    base, chunk = _chunks(shaper, model)

    async def events() -> AsyncIterator[str]:
        pieces = 0
        try:
            piece = first
            while piece is not None:
                for delta in shaper.deltas(piece):
                    yield sse(chunk(delta))
                pieces += 1
                piece = await api.next_piece(stream, model)
            for delta in shaper.deltas(None):
                yield sse(chunk(delta))
            result = stream.result
            if result is not None:
                api.metrics.count_tokens(model, result.usage)
                note_served(result, pieces)
            for event in _last_events(shaper, base, chunk, result, body.include_usage):
                yield event
        except LanmeshError as exc:
            # The status line went out with the first event: a later failure can only be an error event.
            note_error(str(exc))
            yield sse(ErrorResponse(error=api_error(exc).detail).model_dump())
        finally:
            if stream.result is None:
                note_unfinished(stream.node, pieces)
            await stream.aclose()
            lease.release()

    headers = {"X-Lanmesh-Node": stream.node, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _chunks(
    shaper: ChatStream | TextStream, model: str
) -> tuple[dict[str, Any], Callable[[dict[str, Any] | None, str | None], dict[str, Any]]]:
    """The fields every chunk of one stream shares, and how to make a chunk of a delta (and finish reason)."""
    kind = shaper.kind
    ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    base: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
    base |= {"created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [shaper.choice(delta, finish)]}

    return base, chunk


def _last_events(
    shaper: ChatStream | TextStream,
    base: dict[str, Any],
    chunk: Callable[[dict[str, Any] | None, str | None], dict[str, Any]],
    result: Result | None,
    include_usage: bool,
) -> list[str]:
    """A stream's end: the chunk with the finish reason (and where it was served), usage if asked, [DONE]."""
    meta = result.meta if result is not None else {}
    last = chunk(None, shaper.finish(meta))
    if result is not None:
        last["lanmesh"] = {"node": result.node, "route": result.route}
    events = [sse(last)]
    if include_usage:
        events.append(sse({**base, "choices": [], "usage": usage_of(meta).model_dump()}))
    return [*events, "data: [DONE]\n\n"]


# ---------------------------------------------------------------- answers the grammar cannot fully promise


async def checked_chat(
    api: MeshApi,
    caller: str,
    body: ChatCompletionRequest,
    shape: AnswerShape,
    checks: AnswerChecks,
    messages: list[dict[str, str]],
    params: dict[str, Any],
    timeout: float,
) -> tuple[Result, str]:
    """A chat answer checked against what its grammar could not enforce (README: structured output): one that
    breaks it is drawn again, SCHEMA_TRIES in all, then the request fails with 500 `schema_not_met`. An answer
    cut by max_tokens is returned as it is (finish_reason "length"). Every try's tokens are counted."""
    deadline = time.monotonic() + timeout
    problem = ""
    for attempt in range(SCHEMA_TRIES):
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"deadline passed while drawing an answer again ({problem})")
        tried = params if attempt == 0 else resampled(params, attempt)
        try:
            result = await api.serve(caller, body.model, Task.CHAT, messages, tried, left)
        except BadRequest as exc:
            raise api_error(exc, guidance_param(shape)) from None
        api.metrics.count_tokens(body.model, result.usage)
        text = text_of(result, body.model)
        if finish_reason(result.meta) == "length":
            return result, text
        reader = read_answer(text, shape.expects_calls)
        found = checks.problem(reader.content, [(c.name, c.arguments) for c in reader.calls])
        if found is None:
            api.metrics.schema_checks.labels("passed" if attempt == 0 else "drawn_again").inc()
            return result, text
        problem = found
        log.info("answer %d of %s broke its schema: %s", attempt + 1, body.model, problem)
    api.metrics.schema_checks.labels("failed").inc()
    why = (
        f"the model's answer broke the schema on {SCHEMA_TRIES} tries ({problem}); the grammar cannot enforce "
        "that keyword, so answers are checked after generation: ask again, or loosen the schema"
    )
    raise ApiError(500, why, "server_error", guidance_param(shape), "schema_not_met")


def whole_as_stream(
    shaper: ChatStream, result: Result, text: str, model: str, include_usage: bool
) -> StreamingResponse:
    """A checked answer, sent as a stream once it passed (it could not be taken back once sent)."""
    base, chunk = _chunks(shaper, model)

    async def events() -> AsyncIterator[str]:
        for delta in [*shaper.deltas(text), *shaper.deltas(None)]:
            yield sse(chunk(delta))
        for event in _last_events(shaper, base, chunk, result, include_usage):
            yield event

    headers = {"X-Lanmesh-Node": result.node, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def b64_vector(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
