"""How a chat model is told about tools, and how its tool calls look: one format, shared by engines and gateway.

A model whose chat template renders `tools` (Qwen, Llama 3.1, ...) gets them through its template. For the
others (SmolLM2), the tools are described in a system message and the model answers a call as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

(the Hermes/Qwen convention, which many small models have seen). Either way the gateway constrains the answer
with a grammar (params["guidance"]) so every call parses and its arguments validate against the schema.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def tool_instructions(tools: list[dict[str, Any]]) -> str:
    """The system text that describes `tools` (OpenAI tool objects) to a model whose template has no tools."""
    lines = [
        "You can call these functions. To call one, answer with exactly",
        f'{TOOL_CALL_OPEN}{{"name": <function name>, "arguments": <JSON object>}}{TOOL_CALL_CLOSE}',
        "and nothing else. Otherwise, answer normally.",
        "",
        "Functions:",
    ]
    for tool in tools:
        fn = tool.get("function", {}) if isinstance(tool, dict) else {}
        entry = {"name": fn.get("name"), "description": fn.get("description", ""), "parameters": fn.get("parameters")}
        lines.append(json.dumps({k: v for k, v in entry.items() if v not in (None, "")}, ensure_ascii=False))
    return "\n".join(lines)


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """params["tools"], validated (ValueError for the client): a list of {"type": "function", "function": {...}}."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {type: function, function: {name, parameters}}")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
    return tools


def with_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tool instructions in its system message (added, or put before the given one)."""
    text = tool_instructions(tools)
    if messages and messages[0].get("role") == "system":
        return [{"role": "system", "content": f"{text}\n\n{messages[0].get('content', '')}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
