"""OpenAI's published schemas (vendored in openai_schemas/, see its README): validators for recorded answers."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema_rs

SPEC_PATH = Path(__file__).parent / "openai_schemas" / "openapi.json"


@functools.cache
def spec() -> dict[str, Any]:
    """The vendored spec, as published."""
    return json.loads(SPEC_PATH.read_text())  # type: ignore[no-any-return]


def or_null(node: Any) -> Any:
    """A schema with OpenAPI 3.0's `nullable: true` written as JSON Schema says it (null allowed too)."""
    if isinstance(node, list):
        return [or_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: or_null(value) for key, value in node.items() if key not in ("nullable", "discriminator")}
    if node.get("nullable") is not True:
        return out
    if isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [out, {"type": "null"}]}


@functools.cache
def _components() -> dict[str, Any]:
    schemas = or_null(copy.deepcopy(spec()["components"]["schemas"]))
    # /completions streams chunks of its response shape with `finish_reason: null` until the last (not in the spec).
    streamed = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = streamed["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"]["type"] = ["string", "null"]
    choice["properties"]["finish_reason"]["enum"] = [*choice["properties"]["finish_reason"]["enum"], None]
    schemas["CreateCompletionStreamChunk"] = streamed
    return {"schemas": schemas}


@functools.cache
def validator(name: str) -> Any:
    """A validator for the schema `name` of the vendored spec (its $refs resolved within the spec)."""
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": _components(),
        "$ref": f"#/components/schemas/{name}",
    }
    return jsonschema_rs.validator_for(root)


def problems(name: str, document: Any) -> list[str]:
    """Where `document` breaks the schema `name` (empty when it conforms)."""
    return [f"{list(e.instance_path)}: {e.message}" for e in validator(name).iter_errors(document)]


def sse_chunks(text: str) -> list[Any]:
    """The JSON chunks of a server-sent event stream (its closing `[DONE]` checked and left out)."""
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", text[-300:]
    return [json.loads(item) for item in data[:-1]]
