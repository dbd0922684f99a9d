"""schemathesis with OpenAI's own schemas (vendored in openai_schemas/): requests generated from OpenAI's request
schemas get no 5xx from the gateway, and every answer it gives validates against OpenAI's response schemas.

OpenAI's spec lists only 200 and 429 for these operations, so a 400 (a field lanmesh refuses, by name) or a 404
(a generated model name) is not held against the gateway; a 5xx or a malformed answer is.
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import schemathesis
from gateway_nodes import GatewayNode, scrape, value
from hypothesis import HealthCheck, given, settings
from openai_spec import problems, spec, sse_chunks
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

OPERATIONS = [
    ("POST", "/chat/completions"),
    ("POST", "/completions"),
    ("POST", "/embeddings"),
    ("GET", "/models"),
]
EXAMPLES = 50
# Fields a request keeps when steered towards an answer: the ones lanmesh serves (others are 400s, by name).
SERVED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "response_format", "prompt", "echo", "input",
    "encoding_format", "user", "metadata", "service_tier",
}  # fmt: skip


def _steer(case: schemathesis.Case) -> schemathesis.Case:
    """Most cases to a model that exists; half of them without the fields lanmesh refuses, so answers (not only
    refusals) are generated and checked; a fifth streamed."""
    body = case.body
    if not isinstance(body, dict):
        return case
    draw = zlib.crc32(repr(sorted(body)).encode() + repr(body.get("model")).encode())
    if draw % 3 != 0:
        body = {**body, "model": "echo"}
    if draw % 2 == 0:
        body = {k: v for k, v in body.items() if k in SERVED}
    if draw % 5 == 1 and "input" not in body:
        body["stream"] = True  # rare in generated bodies; streamed answers must hold up too
    case.body = body
    return case


@pytest.fixture(scope="module")
def openai_schema() -> Any:
    return schemathesis.openapi.from_dict(spec())


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_openais_valid_requests_get_no_5xx_and_answers_match_openais_schemas(
    echo_node: GatewayNode, openai_schema: Any, method: str, path: str
) -> None:
    strategy = openai_schema[path][method].as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)

    @given(case=strategy.map(_steer))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=f"{echo_node.url}/v1", timeout=30)
        streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
        # schemathesis would hold the SSE wrapper ({data, event}) to the chunk schema; the chunks are checked below.
        case.validate_response(
            response, checks=[not_a_server_error] + ([] if streamed else [response_schema_conformance])
        )
        if streamed:
            for chunk in sse_chunks(response.text):
                schema = (
                    "CreateChatCompletionStreamResponse"
                    if path == "/chat/completions"
                    else "CreateCompletionStreamChunk"
                )
                assert problems(schema, chunk) == [], chunk

    endpoint = f"/v1{path}"
    before = value(scrape(echo_node), "lanmesh_http_requests_total", endpoint=endpoint, status="200")
    check()
    if path != "/embeddings":  # echo cannot embed: its 400 is the right answer there
        after = value(scrape(echo_node), "lanmesh_http_requests_total", endpoint=endpoint, status="200")
        assert after > before, "no generated request reached an answer"
