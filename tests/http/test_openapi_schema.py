"""The published OpenAPI schema is the truth: schemathesis sends bounded generated requests, none gets a 5xx,
and every response (status, headers, body) matches what /openapi.json declares."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from gateway_nodes import GatewayNode, scrape, value
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
EXAMPLES = {"positive": 50, "negative": 25}


def _steer(case: schemathesis.Case) -> schemathesis.Case:
    """Valid cases only: random model names all end in a 404, so send 2 in 3 to a model that exists; and
    drop generated X-Lanmesh-Timeout values, whose tiny deadlines make legitimate 504s (deadlines have their own test).
    """
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and sum(map(ord, body["model"])) % 3 != 1:
        case.body = {**body, "model": "echo"}
    if case.headers:
        case.headers.pop("X-Lanmesh-Timeout", None)
    return case


@pytest.fixture(scope="module")
def api_schema(echo_node: GatewayNode) -> Any:
    return schemathesis.openapi.from_url(f"{echo_node.url}/openapi.json")


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(m, p, "positive") for m, p in OPERATIONS] + [(m, p, "negative") for m, p in OPERATIONS if m == "POST"],
)
def test_generated_requests_get_no_5xx_and_answers_match_the_schema(
    echo_node: GatewayNode, api_schema: Any, method: str, path: str, mode: str
) -> None:
    node = echo_node
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))
    if mode == "positive":
        strategy = strategy.map(_steer)

    @given(case=strategy)
    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        # Valid input may still be refused (an unknown model is a 404), so "valid input succeeds" does not apply.
        case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=30)

    ok = {"endpoint": path, "status": "200"}
    before = value(scrape(node), "lanmesh_http_requests_total", **ok)
    check()
    if mode == "positive" and path not in ("/metrics", "/v1/embeddings"):  # echo cannot embed: 400 is its success
        # The fuzzing reached the success path, not only the refusals.
        assert value(scrape(node), "lanmesh_http_requests_total", **ok) > before


def test_schema_declares_openai_errors_and_no_422(echo_node: GatewayNode) -> None:
    doc = httpx.get(f"{echo_node.url}/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "404", "413", "429", "503", "504"} <= set(chat["responses"])
    assert "422" not in chat["responses"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
