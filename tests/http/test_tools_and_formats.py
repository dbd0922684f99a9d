"""Tools, structured output and the rest of OpenAI's request fields, as the official client sees them.

`echo` answers the last message, so it stands in for a model that answers a tool call: what the gateway makes of
`<tool_call>...</tool_call>` text (the engines' format) is exactly what it makes of a real model's. The real model
under its grammar is in test_tools_model.py.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from gateway_nodes import GatewayNode

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TWO_CALLS = CALL + CALL.replace("Paris", "Oslo")
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


def _ask(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def test_a_tool_call_comes_back_as_tool_calls_with_json_arguments_and_no_content(echo_node: GatewayNode) -> None:
    completion = echo_node.openai().chat.completions.create(model="echo", messages=_ask(CALL), tools=[WEATHER])  # type: ignore[arg-type, list-item]
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.refusal is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_parallel_calls_each_get_their_own_id(echo_node: GatewayNode) -> None:
    message = (
        echo_node.openai().chat.completions.create(model="echo", messages=_ask(TWO_CALLS), tools=[WEATHER]).choices[0]  # type: ignore[arg-type, list-item]
    ).message
    calls = message.tool_calls or []
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Oslo"]  # type: ignore[union-attr]
    assert len({c.id for c in calls}) == 2


def test_streamed_tool_calls_arrive_as_openais_deltas(echo_node: GatewayNode) -> None:
    stream = echo_node.openai().chat.completions.create(
        model="sleep:200",
        messages=_ask(TWO_CALLS.replace('"city": "', '"city":  "')),  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        stream=True,
    )
    chunks = list(stream)
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content is None and first.tool_calls
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:
                assert not entry["id"], "the id comes once, with the name"
                entry["id"], entry["name"] = delta.id, delta.function.name  # type: ignore[union-attr]
            entry["arguments"] += (delta.function.arguments if delta.function else None) or ""
    assert [c["name"] for c in calls.values()] == ["get_weather", "get_weather"]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert all(c["id"].startswith("call_") for c in calls.values())
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_a_tool_conversation_goes_back_to_the_model_in_its_own_format(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    first = client.chat.completions.create(model="echo", messages=_ask(CALL), tools=[WEATHER]).choices[0].message  # type: ignore[arg-type, list-item]
    (call,) = first.tool_calls or []
    history: list[Any] = [*_ask("What is the weather in Paris?"), first.model_dump(exclude_none=True)]
    # The assistant's call, written back as the model writes it, reads back as the same call: echo returns it.
    again = client.chat.completions.create(model="echo", messages=history, tools=[WEATHER]).choices[0].message  # type: ignore[list-item]
    assert again.tool_calls and again.tool_calls[0].function.arguments == call.function.arguments  # type: ignore[union-attr]
    result = {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}
    answer = client.chat.completions.create(model="echo", messages=[*history, result], tools=[WEATHER])  # type: ignore[list-item]
    assert answer.choices[0].message.content == "18 C and sunny"
    assert answer.choices[0].finish_reason == "stop"


def test_with_tool_choice_none_the_answer_is_text_even_if_it_looks_like_a_call(echo_node: GatewayNode) -> None:
    message = (
        echo_node.openai()
        .chat.completions.create(model="echo", messages=_ask(CALL), tools=[WEATHER], tool_choice="none")  # type: ignore[arg-type, list-item]
        .choices[0]
        .message
    )
    assert message.content == CALL and not message.tool_calls


def test_the_deprecated_functions_api_answers_function_call(echo_node: GatewayNode) -> None:
    raw = httpx.post(
        f"{echo_node.url}/v1/chat/completions",
        json={"model": "echo", "messages": _ask(CALL), "functions": [WEATHER["function"]]},
        timeout=10,
    ).json()
    choice = raw["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"]["name"] == "get_weather"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "free"}}]}, "tools.0"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"messages": [{"role": "user", "content": [IMAGE]}]}, "messages.0.content.0"),
    ],
)
def test_what_lanmesh_cannot_do_is_a_400_naming_the_field(
    echo_node: GatewayNode, change: dict[str, Any], param: str
) -> None:
    body = {"model": "echo", "messages": _ask("hi"), "tools": [WEATHER], **change}
    with pytest.raises(openai.BadRequestError) as err:
        echo_node.openai().chat.completions.create(**body)
    assert err.value.param == param, err.value.message
    assert param.split(".")[0] in err.value.message


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),  # nothing to call
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"functions": [WEATHER["function"]], "function_call": {"name": "get_time"}}, "function_call"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_a_value_that_names_nothing_offered_is_invalid_value(
    echo_node: GatewayNode, change: dict[str, Any], param: str
) -> None:
    body = {"model": "echo", "messages": _ask("hi"), **change}
    with pytest.raises(openai.BadRequestError) as err:
        echo_node.openai().chat.completions.create(**body)
    assert (err.value.code, err.value.param) == ("invalid_value", param), err.value.message


def test_an_empty_prompt_is_the_start_of_a_document(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    # echo continues with what the model was given: OpenAI's start-of-document marker, as for a null prompt
    assert client.completions.create(model="echo", prompt="").choices[0].text == "<|endoftext|>"
    texts = [c.text for c in client.completions.create(model="echo", prompt=["", "a"], echo=True).choices]
    assert texts == ["<|endoftext|>", "aa"]  # echo shows the prompt as the caller sent it
    streamed = client.completions.create(model="sleep:200", prompt="", stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "<|endoftext|>"


@pytest.mark.parametrize(
    "change",
    [
        {"stream": None},
        {"top_p": 0},
        {"temperature": 6.6e-290},
        {"n": 1, "logprobs": False, "presence_penalty": 0, "logit_bias": {}, "store": False, "modalities": ["text"]},
        {"user": "someone", "metadata": {"a": "b"}, "service_tier": "flex", "prompt_cache_key": "k"},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True}}},
        {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False},
        {
            "tools": [WEATHER],
            "tool_choice": {
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
            },
        },  # fmt: skip
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *_ask("hi")]},
    ],
)
def test_valid_requests_are_served(echo_node: GatewayNode, change: dict[str, Any]) -> None:
    body = {"model": "echo", "messages": _ask("hi"), **change}
    r = httpx.post(f"{echo_node.url}/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] == "hi" and "refusal" in message and message["refusal"] is None


def test_completions_take_a_null_prompt_echo_and_max_tokens_zero(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    assert client.completions.create(model="echo", prompt=None).choices[0].text == "<|endoftext|>"  # type: ignore[arg-type]
    echoed = client.completions.create(model="echo", prompt="say this", echo=True)
    assert echoed.choices[0].text == "say thissay this"  # the prompt, then echo's continuation (the prompt again)
    scored = client.completions.create(model="echo", prompt=["a", "b"], echo=True, max_tokens=0)
    assert [(c.text, c.finish_reason) for c in scored.choices] == [("a", "length"), ("b", "length")]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="a", max_tokens=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="echo", prompt=[1, 2, 3])
    assert err.value.param == "prompt" and err.value.code == "unsupported_parameter"
    streamed = client.completions.create(model="sleep:200", prompt="x y", echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "x yx y"


# ---------------------------------------------------------------- schema keywords the grammar cannot enforce

WEEK = {
    "type": "object",
    "properties": {"days": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
    "required": ["days"],
}
PLAN = {"type": "function", "function": {"name": "plan", "parameters": WEEK}}


def _week(strict: bool | None = None) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "week", "schema": WEEK, "strict": strict}}


def test_an_answer_that_breaks_a_keyword_the_grammar_cannot_enforce_is_never_handed_out(
    echo_node: GatewayNode,
) -> None:
    # echo answers the last message whatever the grammar says: it stands in for a model that broke uniqueItems
    client = echo_node.openai()
    good = '{"days": ["mon", "thu"]}'
    for stream in (False, True):
        answer = client.chat.completions.create(
            model="echo",
            messages=_ask(good),
            response_format=_week(),
            stream=stream,  # type: ignore[call-overload]
        )
        if stream:
            chunks = list(answer)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == good
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        else:
            assert answer.choices[0].message.content == good
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(
                model="echo",
                messages=_ask('{"days": ["mon", "thu", "thu"]}'),
                response_format=_week(),  # type: ignore[arg-type]
                stream=stream,
            )
        assert (failed.value.code, failed.value.param) == ("schema_not_met", "response_format")
        assert "3 tries (the answer: uniqueItems at /days" in failed.value.message


def test_tool_call_arguments_are_checked_the_same_way(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    call = '<tool_call>{"name": "plan", "arguments": {"days": ["fri", "fri"]}}</tool_call>'
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="echo", messages=_ask(call), tools=[PLAN])  # type: ignore[list-item]
    assert (failed.value.code, failed.value.param) == ("schema_not_met", "tools")
    assert "the arguments of plan: uniqueItems at /days" in failed.value.message
    fine = client.chat.completions.create(model="echo", messages=_ask(call.replace('"fri"]', '"sat"]')), tools=[PLAN])  # type: ignore[list-item]
    (made,) = fine.choices[0].message.tool_calls or []
    assert json.loads(made.function.arguments) == {"days": ["fri", "sat"]}  # type: ignore[union-attr]
    metrics = httpx.get(f"{echo_node.url}/metrics", timeout=5).text
    assert 'lanmesh_http_schema_checks_total{result="failed"}' in metrics


def test_strict_refuses_a_keyword_the_grammar_cannot_enforce(echo_node: GatewayNode) -> None:
    client = echo_node.openai()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="echo", messages=_ask("{}"), response_format=_week(strict=True))  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.param) == ("invalid_json_schema", "response_format")
    assert "'uniqueItems' is not permitted" in refused.value.message
    strict_tool = {"type": "function", "function": {**PLAN["function"], "strict": True}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="echo", messages=_ask("{}"), tools=[strict_tool])  # type: ignore[list-item]
    assert (refused.value.code, refused.value.param) == ("invalid_function_parameters", "tools.0.function.parameters")
