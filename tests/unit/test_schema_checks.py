"""Schema keywords the grammar cannot enforce (nodes/api/schema_checks.py): found wherever they are, refused under
`strict: true` in OpenAI's words, and otherwise checked in the answer, which is drawn again when it breaks them."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("jsonschema_rs")

from nodes.api.bodies import ApiError, ChatCompletionRequest  # noqa: E402
from nodes.api.schema_checks import (  # noqa: E402
    CHECKED_ONLY,
    ENFORCED_FORMATS,
    RESAMPLE_TEMPERATURE,
    UNENFORCED,
    resampled,
    unenforced,
)
from nodes.models.backends.guidance import JSON_STYLE  # noqa: E402

DAYS = {
    "type": "object",
    "properties": {
        "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "uniqueItems": True}
    },
    "required": ["days"],
}
# Each keyword the gateway says the grammar cannot enforce, in a schema that uses it.
USES = {
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "contains": {"type": "array", "contains": {"const": 1}},
    "minContains": {"type": "array", "contains": {"const": 1}, "minContains": 2},
    "maxContains": {"type": "array", "contains": {"const": 1}, "maxContains": 2},
    "not": {"not": {"type": "string"}},
    "if": {"if": {"type": "string"}, "then": {"minLength": 2}},
    "then": {"if": {"type": "string"}, "then": {"minLength": 2}},
    "else": {"if": {"type": "string"}, "else": {"type": "number"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "dependentSchemas": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "dependencies": {"type": "object", "dependencies": {"a": ["b"]}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^a"}},
    "unevaluatedProperties": {"type": "object", "unevaluatedProperties": False},
    "unevaluatedItems": {"type": "array", "unevaluatedItems": False},
    "$dynamicRef": {"$dynamicAnchor": "n", "type": "object", "properties": {"a": {"$dynamicRef": "#n"}}},
    "$dynamicAnchor": {"$dynamicAnchor": "n", "type": "object"},
    "$recursiveRef": {"type": "object", "properties": {"a": {"$recursiveRef": "#"}}},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "number"}]},
}
# Keywords the grammar does enforce: no check needed for them.
ENFORCED = [
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    {"type": "array", "prefixItems": [{"type": "string"}], "items": False},
    {"type": "string", "minLength": 1, "maxLength": 9, "pattern": "^[a-z]+$"},
    {"type": "number", "minimum": 0, "exclusiveMaximum": 10, "multipleOf": 0.5},
    {"type": "object", "minProperties": 1, "maxProperties": 2, "patternProperties": {"^x": {"type": "integer"}}},
    {"anyOf": [{"const": 1}, {"enum": ["a", None]}]},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
    {"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n", "title": "t", "description": "d", "default": 1},
    {"oneOf": [{"type": "string"}, {"type": "integer"}]},  # disjoint: the same as anyOf
    *({"type": "string", "format": f} for f in sorted(ENFORCED_FORMATS)),
]


def _llguidance_warnings(schema: dict[str, Any]) -> list[str]:
    llg = pytest.importorskip("llguidance")

    class Bytes:
        eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
        tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

        def __call__(self, data: bytes) -> list[int]:
            return list(data)

    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
    _error, warnings = llg.LLMatcher.validate_grammar_with_warnings(
        grammar, llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))
    )
    return list(warnings)


@pytest.mark.parametrize("keyword", sorted(UNENFORCED | CHECKED_ONLY))
def test_every_keyword_said_unenforced_is_one_llguidance_ignores(keyword: str) -> None:
    warnings = _llguidance_warnings(USES[keyword])
    assert any(keyword in w for w in warnings), warnings
    assert keyword in [k for _where, k in unenforced(USES[keyword])]


@pytest.mark.parametrize("schema", ENFORCED, ids=lambda s: json.dumps(s)[:60])
def test_what_llguidance_enforces_needs_no_check(schema: dict[str, Any]) -> None:
    assert _llguidance_warnings(schema) == []
    assert [k for _where, k in unenforced(schema) if k != "oneOf"] == []


def test_a_format_the_grammar_does_not_know_is_unenforced() -> None:
    schema = {"type": "string", "format": "uri-reference"}
    assert any("uri-reference" in w for w in _llguidance_warnings(schema))
    assert unenforced(schema) == [((), "format 'uri-reference'")]


def test_keywords_are_found_wherever_they_are_nested() -> None:
    schema = {
        "type": "object",
        "properties": {"days": DAYS["properties"]["days"], "meta": {"properties": {"tag": {"not": {"const": ""}}}}},
        "$defs": {"later": {"type": "array", "items": {"type": "object", "propertyNames": {"maxLength": 3}}}},
        "anyOf": [{"dependentRequired": {"a": ["b"]}}],
    }
    assert unenforced(schema) == [
        (("properties", "days"), "uniqueItems"),
        (("properties", "meta", "properties", "tag"), "not"),
        (("$defs", "later", "items"), "propertyNames"),
        (("anyOf", "0"), "dependentRequired"),
    ]


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_strict_refuses_what_the_grammar_cannot_enforce_in_openais_words() -> None:
    strict = _chat(
        response_format={"type": "json_schema", "json_schema": {"name": "week", "schema": DAYS, "strict": True}}
    )
    with pytest.raises(ApiError) as refused:
        strict.check()
    error = refused.value.detail
    assert refused.value.status == 400
    assert (error.code, error.param) == ("invalid_json_schema", "response_format")
    assert error.message.startswith(
        "Invalid schema for response_format 'week': In context=('properties', 'days'), 'uniqueItems' is not permitted"
    )
    tool = {"type": "function", "function": {"name": "plan", "parameters": DAYS, "strict": True}}
    with pytest.raises(ApiError) as refused:
        _chat(tools=[tool]).check()
    assert (refused.value.detail.code, refused.value.detail.param) == (
        "invalid_function_parameters",
        "tools.0.function.parameters",
    )
    assert "Invalid schema for function 'plan'" in refused.value.detail.message


def test_without_strict_the_answer_is_checked_instead() -> None:
    loose = _chat(response_format={"type": "json_schema", "json_schema": {"name": "week", "schema": DAYS}})
    loose.check()
    checks = loose.answer_checks(loose.answer_shape())
    assert checks.needed
    assert checks.problem('{"days": ["mon", "tue"]}', []) is None
    problem = checks.problem('{"days": ["mon", "thu", "thu"]}', [])
    assert problem is not None and problem.startswith("the answer: uniqueItems at /days")
    tool = {"type": "function", "function": {"name": "plan", "parameters": DAYS}}
    calls = _chat(tools=[tool], tool_choice="required")
    checks = calls.answer_checks(calls.answer_shape())
    problem = checks.problem("", [("plan", '{"days": ["fri", "fri"]}')])
    assert problem is not None and problem.startswith("the arguments of plan: uniqueItems at /days")
    plain = _chat(response_format={"type": "json_object"})
    assert not plain.answer_checks(plain.answer_shape()).needed  # nothing to check: no cost


def test_oneof_is_checked_even_under_strict() -> None:
    either = {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 5}]}
    body = _chat(
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": either, "strict": True}}
    )
    body.check()  # not refused: the grammar enforces at least one branch
    checks = body.answer_checks(body.answer_shape())
    assert checks.problem("2.5", []) is None
    assert checks.problem("3", []) is not None  # matches both branches


def test_an_answer_is_drawn_again_sampled_and_with_another_seed() -> None:
    assert resampled({"temperature": 0, "top_p": 0, "max_tokens": 9}, 1) == {
        "temperature": RESAMPLE_TEMPERATURE,
        "max_tokens": 9,
    }
    assert resampled({"temperature": 1.2, "seed": 7}, 2) == {"temperature": 1.2, "seed": 9}
    assert resampled({"seed": 2**63 - 1}, 1)["seed"] == -(2**63)  # still a 64-bit seed
