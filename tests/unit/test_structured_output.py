"""Tools and structured output, without a model: the grammars the gateway asks for accept exactly the answers
OpenAI's contract allows (checked with llguidance itself on a byte tokenizer), and answers are read back into
content and tool calls whether they arrive whole or a character at a time."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodes.api.structured_output import (
    AnswerReader,
    AnswerShape,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    FunctionTool,
    call_text,
    closed_schema,
    read_answer,
)

WEATHER = FunctionTool(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]},
)
CLOCK = FunctionTool("get_time", {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]})
SHOWN = tuple({"type": "function", "function": {"name": f.name, "parameters": f.parameters}} for f in (WEATHER, CLOCK))
PARIS = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TOKYO = '<tool_call>{"name": "get_time", "arguments": {"tz": "Asia/Tokyo"}}</tool_call>'


def _accepts(guidance: dict[str, Any], text: str) -> bool:
    """Whether llguidance lets a model write exactly `text` under `guidance` (one token per byte)."""
    llg = pytest.importorskip("llguidance")

    class Bytes:  # every byte a token, and an end-of-text token after them
        eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
        tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

        def __call__(self, data: bytes) -> list[int]:
            return list(data)

    tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
    if guidance["type"] == "json_schema":
        grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(guidance["grammar"]))
    else:
        grammar = llg.LLMatcher.grammar_from_lark(guidance["grammar"])
    matcher = llg.LLMatcher(tokenizer, grammar)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(list(text.encode())) and matcher.is_accepting()


def test_required_calls_must_name_an_offered_function_with_arguments_that_fit_its_schema() -> None:
    shape = AnswerShape(SHOWN, (WEATHER, CLOCK), "required")
    grammar = shape.guidance()
    assert grammar is not None
    assert _accepts(grammar, PARIS)
    assert _accepts(grammar, PARIS + TOKYO)  # parallel calls
    assert not _accepts(grammar, "It is sunny.")
    assert not _accepts(grammar, PARIS.replace("get_weather", "get_wether"))
    assert not _accepts(grammar, PARIS.replace('{"city": "Paris"}', "{}"))  # city is required
    assert not _accepts(grammar, PARIS.replace('"Paris"', '"Paris", "mood": "sunny"'))  # no invented arguments
    assert not _accepts(grammar, PARIS.replace('"Paris"', '"Paris", "days": "two"'))


def test_auto_allows_text_or_calls_but_never_a_call_inside_text() -> None:
    grammar = AnswerShape(SHOWN, (WEATHER, CLOCK), "optional").guidance()
    assert grammar is not None
    assert _accepts(grammar, "I cannot tell the weather; try a window.")
    assert _accepts(grammar, PARIS)
    assert not _accepts(grammar, "Let me look. " + PARIS)
    assert not _accepts(grammar, "")


def test_one_call_only_without_parallel_calls_and_a_named_function_only() -> None:
    one = AnswerShape(SHOWN, (WEATHER, CLOCK), "required", parallel=False).guidance()
    assert one is not None and _accepts(one, TOKYO) and not _accepts(one, PARIS + TOKYO)
    named = AnswerShape(SHOWN, (CLOCK,), "required").guidance()
    assert named is not None and _accepts(named, TOKYO) and not _accepts(named, PARIS)


def test_json_answers_follow_the_schema_and_may_sit_beside_calls() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    plain = AnswerShape(json_schema=schema).guidance()
    assert plain == {"type": "json_schema", "grammar": {**schema, "additionalProperties": False}}
    assert _accepts(plain, '{"answer": 42}') and not _accepts(plain, '{"answer": 42, "why": "because"}')
    with_tools = AnswerShape(SHOWN, (WEATHER,), "optional", json_schema=schema).guidance()
    assert with_tools is not None
    assert _accepts(with_tools, '{"answer": 42}') and _accepts(with_tools, PARIS)
    assert not _accepts(with_tools, "forty-two")


def test_json_object_is_any_json_object_not_just_an_empty_one() -> None:
    pytest.importorskip("fastapi")
    from nodes.api.bodies import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "a cat, as JSON"}],
            "response_format": {"type": "json_object"},
        }
    )
    grammar = body.answer_shape().guidance()
    assert grammar is not None
    assert _accepts(grammar, '{"name": "Whiskers", "age": 3, "toys": ["ball", {"kind": "mouse", "new": true}]}')
    assert _accepts(grammar, "{}")
    assert not _accepts(grammar, "[1, 2]") and not _accepts(grammar, '"a cat"')


def test_no_calls_means_no_tools_shown_and_text_without_calls() -> None:
    assert AnswerShape().params() == {}
    none = AnswerShape(SHOWN, (WEATHER,), "none")
    assert "tools" not in none.params()
    grammar = none.guidance()
    assert grammar is not None and _accepts(grammar, "It is sunny.") and not _accepts(grammar, PARIS)
    shape = AnswerShape(SHOWN, (WEATHER,), "optional")
    assert shape.params()["tools"] == [dict(t) for t in SHOWN]


def test_closing_schemas_leaves_explicit_choices_and_allof_branches_alone() -> None:
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"a": {"type": "string"}}}},
        "$defs": {"open": {"type": "object", "additionalProperties": True}},
        "anyOf": [{"properties": {"b": {}}}],
        "allOf": [{"type": "object", "properties": {"c": {}}}],
    }
    closed = closed_schema(schema)
    assert "additionalProperties" not in closed  # it has allOf: closing it would refuse the branches' keys
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert closed["$defs"]["open"]["additionalProperties"] is True
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]


def _feed_by_character(text: str, expects_calls: bool = True) -> tuple[AnswerReader, list[Any]]:
    reader = AnswerReader(expects_calls)
    deltas = [d for ch in text for d in reader.feed(ch)]
    deltas += reader.finish()
    return reader, deltas


def test_streamed_calls_give_each_name_first_then_arguments_piece_by_piece() -> None:
    reader, deltas = _feed_by_character(PARIS + TOKYO)
    starts = [d for d in deltas if isinstance(d, CallStart)]
    assert [s.name for s in starts] == ["get_weather", "get_time"] and [s.index for s in starts] == [0, 1]
    assert len({s.id for s in starts}) == 2 and all(s.id.startswith("call_") and len(s.id) == 29 for s in starts)
    pieces = [d for d in deltas if isinstance(d, ArgumentsDelta)]
    assert len([p for p in pieces if p.index == 0]) > 3  # streamed, not in one lump
    assert "".join(p.text for p in pieces if p.index == 0) == '{"city": "Paris"}'
    assert "".join(p.text for p in pieces if p.index == 1) == '{"tz": "Asia/Tokyo"}'
    assert not any(isinstance(d, ContentDelta) for d in deltas)
    assert reader.finished_calls and reader.content == ""


def test_text_answers_are_content_even_when_they_start_like_a_tag() -> None:
    reader, deltas = _feed_by_character("<tool is what I would use>")
    assert reader.content == "<tool is what I would use>" and not reader.calls
    assert "".join(d.text for d in deltas if isinstance(d, ContentDelta)) == reader.content
    assert read_answer("  plain", expects_calls=True).content == "  plain"
    assert read_answer(PARIS, expects_calls=False).content == PARIS  # no tools: the text is the answer


def test_a_call_cut_short_keeps_what_was_written_and_is_not_finished() -> None:
    reader = read_answer(PARIS[:53], expects_calls=True)
    (call,) = reader.calls
    assert call.name == "get_weather" and call.arguments == '{"cit' and not call.complete
    assert not reader.finished_calls


def test_a_call_with_its_keys_in_another_order_is_still_read() -> None:
    reader = read_answer('<tool_call>{"arguments": {"tz": "UTC"}, "name": "get_time"}</tool_call>', True)
    (call,) = reader.calls
    assert (call.name, json.loads(call.arguments), call.complete) == ("get_time", {"tz": "UTC"}, True)


def test_earlier_calls_are_written_back_as_the_model_writes_them() -> None:
    assert call_text("get_weather", '{"city":"Paris"}') == PARIS
    assert call_text("get_weather", "not json").startswith('<tool_call>{"name": "get_weather", "arguments": "not')
    assert call_text("ping", "") == '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'


@settings(max_examples=500, deadline=None)
@example(["<tool_call>", '{"name": ', '"\\q"', ', "arguments": ', "{", "}", "}", "</tool_call>"], 3)
@given(
    st.lists(
        st.sampled_from(
            [
                "<tool_call>",
                "</tool_call>",
                '{"name": ',
                '"get_weather"',
                '"\\q"',
                ', "arguments": ',
                "{",
                "}",
                "[",
                '"',
                "\\",
                " ",
                "x",
                "é",
            ]
        ),  # fmt: skip
        max_size=30,
    ),
    st.integers(1, 7),
)
def test_any_answer_is_read_without_error_and_nothing_is_lost(parts: list[str], step: int) -> None:
    # A model that ignored its grammar (or echo) may write anything: the reader never fails, and every character
    # of text that is not a call reaches the content.
    text = "".join(parts)
    reader = AnswerReader(expects_calls=True)
    deltas = [d for i in range(0, len(text), step) for d in reader.feed(text[i : i + step])] + reader.finish()
    assert "".join(d.text for d in deltas if isinstance(d, ContentDelta)) == reader.content
    if not reader.calls:
        assert reader.content == text or not text.strip()
