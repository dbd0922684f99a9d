"""Answers validate against OpenAI's published schemas (vendored in openai_schemas/): JSON answers against the
response schemas, every streamed chunk against the stream-chunk schema, every error against ErrorResponse."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gateway_nodes import GatewayNode
from openai_spec import problems

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
HI = [{"role": "user", "content": "hi there"}]
STREAMED = {"stream": True, "stream_options": {"include_usage": True}}

CHATS: dict[str, dict[str, Any]] = {
    "text": {"messages": HI},
    "sampling": {"messages": HI, "temperature": 6.6e-290, "top_p": 0, "seed": 7, "stop": ["x"], "max_tokens": 9},
    "tool call": {"messages": [{"role": "user", "content": CALL}], "tools": [WEATHER]},
    "parallel tool calls": {"messages": [{"role": "user", "content": CALL + CALL}], "tools": [WEATHER]},
    "text while tools are offered": {"messages": HI, "tools": [WEATHER], "tool_choice": "auto"},
    "functions (deprecated)": {"messages": [{"role": "user", "content": CALL}], "functions": [WEATHER["function"]]},
    "json object": {"messages": [{"role": "user", "content": '{"a": 1}'}], "response_format": {"type": "json_object"}},
    "tool result": {
        "messages": [
            *HI,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],  # fmt: skip
        "tools": [WEATHER],
    },
}
COMPLETIONS: dict[str, dict[str, Any]] = {
    "one prompt": {"prompt": "continue"},
    "several prompts": {"prompt": ["a", "b"]},
    "null prompt": {"prompt": None},
    "echo": {"prompt": "say", "echo": True},
    "max_tokens 0": {"prompt": "score me", "max_tokens": 0, "echo": True},
}
ERRORS: list[tuple[str, str, Any]] = [
    ("post", "/v1/chat/completions", {"model": "echo", "messages": []}),
    ("post", "/v1/chat/completions", {"model": "echo", "messages": HI, "n": 3}),
    ("post", "/v1/chat/completions", {"model": "no-such-model", "messages": HI}),
    ("post", "/v1/completions", {"model": "echo", "prompt": [[1, 2]]}),
    ("post", "/v1/embeddings", {"model": "echo", "input": "a"}),
    ("post", "/v1/embeddings", {"model": "echo", "input": [1, 2]}),
    ("get", "/v1/no-such-path", None),
]


def _events(node: GatewayNode, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{node.url}{path}", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("case", list(CHATS))
def test_chat_answers_validate_whole_and_streamed(echo_node: GatewayNode, case: str) -> None:
    body = {"model": "echo", **CHATS[case]}
    r = httpx.post(f"{echo_node.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert problems("CreateChatCompletionResponse", r.json()) == []
    chunks = _events(echo_node, "/v1/chat/completions", {**body, **STREAMED})
    assert chunks and chunks[-1]["usage"] is not None
    for chunk in chunks:
        assert problems("CreateChatCompletionStreamResponse", chunk) == [], chunk


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completion_answers_validate_whole_and_streamed(echo_node: GatewayNode, case: str) -> None:
    body = {"model": "echo", **COMPLETIONS[case]}
    r = httpx.post(f"{echo_node.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert problems("CreateCompletionResponse", r.json()) == []
    if isinstance(body["prompt"], list):
        return  # a stream takes one prompt
    for chunk in _events(echo_node, "/v1/completions", {**body, **STREAMED}):
        assert problems("CreateCompletionStreamChunk", chunk) == [], chunk


def test_the_model_list_validates(echo_node: GatewayNode) -> None:
    r = httpx.get(f"{echo_node.url}/v1/models", timeout=10)
    assert r.status_code == 200 and problems("ListModelsResponse", r.json()) == []
    assert r.json()["data"]


@pytest.mark.parametrize(("method", "path", "body"), ERRORS)
def test_errors_validate(echo_node: GatewayNode, method: str, path: str, body: Any) -> None:
    r = httpx.request(method, f"{echo_node.url}{path}", json=body, timeout=10)
    assert 400 <= r.status_code < 500, r.text
    assert problems("ErrorResponse", r.json()) == []
