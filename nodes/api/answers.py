"""A mesh `Result` as OpenAI's answers: whole chat and completion answers, embeddings' vectors, and the streams of
server-sent events (chat deltas with tool calls, text completions)."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import StreamingResponse

from mesh import BadRequest, LanmeshError, Result
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
from .structured_output import AnswerReader, AnswerShape, ArgumentsDelta, CallStart, ContentDelta, Delta


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
        raise ApiError(400, f"model {model!r} did not answer with text; is it a chat model?", param="model") from None


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
        raise api_error(exc, guidance_param(shape) if shape is not None else None) from None
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
                    yield sse(chunk(delta))
                pieces += 1
                piece = await api.next_piece(stream, model)
            for delta in shaper.deltas(None):
                yield sse(chunk(delta))
            result = stream.result
            meta = result.meta if result is not None else {}
            last = chunk(None, shaper.finish(meta))
            if result is not None:
                last["lanmesh"] = {"node": result.node, "route": result.route}
                api.metrics.count_tokens(model, result.usage)
                note_served(result, pieces)
            yield sse(last)
            if body.include_usage:
                yield sse({**base, "choices": [], "usage": usage_of(meta).model_dump()})
            yield "data: [DONE]\n\n"
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


def b64_vector(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
