"""Tools and structured output for the OpenAI API, as the chat engines understand them.

The gateway turns OpenAI's `tools`, `tool_choice`, `parallel_tool_calls` and `response_format` into an
`AnswerShape`: the grammar the answer must follow (`params["guidance"]`, compiled by llguidance on the serving
node, so every answer is well-formed whatever the model) and the tools the model is shown (`params["tools"]`).
A tool call travels as text in the engines' one format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(`nodes/backends/tools.py`); `AnswerReader` reads an answer, whole or streamed, back into OpenAI's content and
`tool_calls`, and `wire_messages` writes a caller's earlier calls back into that format for the next turn.

Objects in the caller's schemas that do not say `additionalProperties` are closed (`false`) in the grammar: the
answer still validates against the caller's schema, and a small model cannot invent arguments (SmolLM2, left
free, adds keys such as `"additionalProperties": false` to a call's arguments). OpenAI's strict mode means the
same, so `strict` changes nothing here: every answer is constrained.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..models.backends.guidance import JSON_STYLE
from ..models.backends.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# JSON_STYLE: JSON as the engines write it for `json_schema` guidance, mirrored into `%json` of tool grammars.
# A text answer, when the model may also call a tool: anything not empty that holds no tool call at all, so a
# call is either made whole (and constrained) or not begun.
_FREE_TEXT = f"/(?s:.+)/ & ~/(?s:.*){re.escape(TOOL_CALL_OPEN)}(?s:.*)/"
_ID_ALPHABET = string.ascii_letters + string.digits

Calls = Literal["none", "optional", "required"]
# `response_format: json_object`: any JSON object, whatever keys the prompt asked for (said open, or the grammar
# would close it to `{}`).
ANY_OBJECT = {"type": "object", "additionalProperties": True}


def call_id() -> str:
    """A tool call's id, shaped like OpenAI's (`call_` and 24 letters or digits)."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# ---------------------------------------------------------------- schemas


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "unevaluatedProperties")


def closed_schema(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object schema that does not say otherwise.

    `allOf` branches are left open: closing each would refuse the properties the other branches add.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"])
    if (is_object or "properties" in out) and "additionalProperties" not in out and "allOf" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(sub) for sub in out[key]]
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    return out


def _lark_json(schema: Any) -> str:
    """A `%json{...}` item of a Lark grammar, written the way the engines write JSON."""
    styled = {**schema, "x-guidance": JSON_STYLE} if isinstance(schema, dict) else schema
    return "%json " + json.dumps(styled, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- what an answer may be


@dataclass(frozen=True)
class FunctionTool:
    """One function the caller offers: its name and the JSON schema of its arguments."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class AnswerShape:
    """What a chat answer may be: text (or JSON of a schema), and tool calls to some of the offered functions.

    `calls`: none (text only), optional (text or calls: OpenAI's `auto`), required (one call or more).
    """

    shown: tuple[Mapping[str, Any], ...] = ()  # OpenAI tool objects the model is shown (params.tools)
    callable: tuple[FunctionTool, ...] = ()  # the functions it may call now (tool_choice narrows `shown`)
    calls: Calls = "none"
    parallel: bool = True
    json_schema: Mapping[str, Any] | None = None  # a text answer must be JSON of this schema (response_format)

    @property
    def expects_calls(self) -> bool:
        return self.calls != "none" and bool(self.callable)

    def params(self) -> dict[str, Any]:
        """The mesh params that ask a chat engine for this shape: `tools` and `guidance`, when needed."""
        out: dict[str, Any] = {}
        if self.shown and self.calls != "none":
            out["tools"] = [dict(tool) for tool in self.shown]
        guidance = self.guidance()
        if guidance is not None:
            out["guidance"] = guidance
        return out

    def guidance(self) -> dict[str, Any] | None:
        if not self.expects_calls:
            if self.json_schema is not None:
                return {"type": "json_schema", "grammar": closed_schema(dict(self.json_schema))}
            if self.shown:
                # Tools offered but not to be called now (tool_choice none): text, without the call a model that
                # has seen calls in the conversation would otherwise imitate (and garble).
                return {"type": "lark", "grammar": f"start: TEXT\nTEXT: {_FREE_TEXT}\n"}
            return None
        lines = ["start: calls" if self.calls == "required" else "start: answer | calls"]
        lines.append("calls: call+" if self.parallel else "calls: call")
        names = [f"fn{i}" for i in range(len(self.callable))]
        lines.append(f"call: {json.dumps(TOOL_CALL_OPEN)} ({' | '.join(names)}) {json.dumps(TOOL_CALL_CLOSE)}")
        for rule, fn in zip(names, self.callable, strict=True):
            call = {
                "type": "object",
                "properties": {"name": {"const": fn.name}, "arguments": closed_schema(dict(fn.parameters))},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            lines.append(f"{rule}: {_lark_json(call)}")
        if self.calls != "required":
            if self.json_schema is not None:
                lines.append(f"answer: {_lark_json(closed_schema(dict(self.json_schema)))}")
            else:
                lines += ["answer: TEXT", f"TEXT: {_FREE_TEXT}"]
        return {"type": "lark", "grammar": "\n".join(lines) + "\n"}


# ---------------------------------------------------------------- the conversation, as the wire carries it


def call_text(name: str, arguments: str) -> str:
    """One tool call in the engines' format, as the model itself writes it."""
    try:
        args: Any = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        args = arguments  # not JSON: kept as a string, so the call still reads as one
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False, separators=(", ", ": "))
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def assistant_text(content: str, calls: Iterable[tuple[str, str]]) -> str:
    """An assistant turn that made tool calls, as text: its content (if any), then each call."""
    return content + "".join(call_text(name, arguments) for name, arguments in calls)


# ---------------------------------------------------------------- reading an answer back


@dataclass
class ReadCall:
    """A tool call read from an answer; `complete` once its closing tag arrived."""

    index: int
    id: str
    name: str = ""
    arguments: str = ""
    complete: bool = False


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


Delta = ContentDelta | CallStart | ArgumentsDelta

# A call's name, and the whitespace before its arguments (the lookahead waits for their first character).
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
_CALL_TAIL = re.compile(r"\s*\}\s*" + re.escape(TOOL_CALL_CLOSE))


@dataclass
class AnswerReader:
    """Reads a chat answer, streamed or whole, into OpenAI's content and tool calls.

    With `expects_calls`, an answer that begins with `<tool_call>` is read as calls: each call's name as soon as
    it is known, then its arguments piece by piece as the model writes them (OpenAI's streaming shape). Anything
    else is content. Text that is neither (a model that ignored its grammar) is passed on as content.
    """

    expects_calls: bool
    calls: list[ReadCall] = field(default_factory=list)
    content: str = ""
    _mode: Literal["deciding", "text", "between", "head", "arguments", "tail"] = "deciding"
    _pending: str = ""
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    def __post_init__(self) -> None:
        if not self.expects_calls:
            self._mode = "text"

    def feed(self, piece: str) -> list[Delta]:
        if self._mode == "text":
            return self._text(piece)
        self._pending += piece
        out: list[Delta] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Delta]:
        """What is left once the answer has ended (an undecided or unfinished piece is content or arguments)."""
        rest, self._pending = self._pending, ""
        if self._mode == "deciding" and rest:
            return self._text(rest)
        if self._mode == "between" and rest.strip():
            return self._text(rest)
        if self._mode == "head" and rest.strip():
            return self._whole_call(rest)  # cut short before its arguments began: what there is
        return []  # arguments are passed on as they come; a cut-off closing tag holds nothing

    @property
    def finished_calls(self) -> bool:
        return bool(self.calls) and all(c.complete for c in self.calls)

    # ------------------------------------------------------------ inside

    def _text(self, text: str) -> list[Delta]:
        if not text:
            return []
        self.content += text
        return [ContentDelta(text)]

    def _step(self, out: list[Delta]) -> bool:
        """Consume what the pending text allows; True when another step may consume more."""
        pending = self._pending
        if self._mode in ("deciding", "between"):
            stripped = pending.lstrip()
            if not stripped or TOOL_CALL_OPEN.startswith(stripped):
                return False  # maybe the beginning of a call: wait for more
            if stripped.startswith(TOOL_CALL_OPEN):
                self._pending = stripped[len(TOOL_CALL_OPEN) :]
                self._mode = "head"
                self.calls.append(ReadCall(len(self.calls), call_id()))
                return True
            # Text: all of it from here on (after calls, a model that ignored its grammar).
            self._mode, self._pending = "text", ""
            out += self._text(pending)
            return False
        call = self.calls[-1]
        if self._mode == "head":
            head = _CALL_HEAD.match(pending)
            if head is not None:
                try:
                    call.name = json.loads(head.group(1))
                except ValueError:  # a bad escape (no grammar held this model): the name as written
                    call.name = head.group(1)[1:-1]
                out.append(CallStart(call.index, call.id, call.name))
                self._pending = pending[head.end() :]
                self._mode, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
                return True
            end = pending.find(TOOL_CALL_CLOSE)
            if end >= 0:  # another key order: read the whole call at once
                out += self._whole_call(pending[:end])
                call.complete = True
                self._pending, self._mode = pending[end + len(TOOL_CALL_CLOSE) :], "between"
                return True
            return False
        if self._mode == "arguments":
            used = self._scan_arguments(pending)
            if used:
                out += self._arguments(pending[:used])
                self._pending = pending[used:]
            if self._depth == 0 and call.arguments.strip():
                self._mode = "tail"
                return True
            return False
        tail = _CALL_TAIL.match(pending)
        if tail is not None:
            call.complete = True
            self._pending, self._mode = pending[tail.end() :], "between"
            return True
        return False

    def _scan_arguments(self, text: str) -> int:
        """How much of `text` belongs to the arguments' JSON value (which ends when its braces balance)."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return len(text)

    def _arguments(self, text: str) -> list[Delta]:
        call = self.calls[-1]
        call.arguments += text
        return [ArgumentsDelta(call.index, text)]

    def _whole_call(self, body: str) -> list[Delta]:
        call = self.calls[-1]
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
            call.name = parsed["name"]
            args = parsed.get("arguments", {})
            call.arguments = json.dumps(args, ensure_ascii=False, separators=(", ", ": "))
        else:
            call.arguments = body  # unreadable: the caller gets what the model wrote
        return [CallStart(call.index, call.id, call.name), ArgumentsDelta(call.index, call.arguments)]


def read_answer(text: str, expects_calls: bool) -> AnswerReader:
    """A whole answer, read."""
    reader = AnswerReader(expects_calls)
    reader.feed(text)
    reader.finish()
    return reader
