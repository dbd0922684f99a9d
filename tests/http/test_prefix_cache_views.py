"""What a user sees of the prefix cache: /metrics, the web console's node rows, and OpenAI's usage field."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from nodes.api.answers import usage_of
from nodes.api.metrics import NodeMetrics
from nodes.api.webconsole import _node_row

ENGINE = {
    "batches": 10, "batched_requests": 30, "max_batch": 16, "prefix_lookups": 8, "prefix_hits": 7,
    "prefix_prompt_tokens": 4000, "prefix_reused_tokens": 3400, "prefix_evictions": 2,
    "prefix_cache_bytes": 1 << 20, "prefix_cache_capacity_bytes": 1 << 29,
}  # fmt: skip
ROW = {"node": "n1", "state": "self", "models": {"smollm2": [0, 0, 16, "abcd1234"]}, "executor": {"smollm2": ENGINE}}


def test_metrics_show_each_models_prefix_cache() -> None:
    text = NodeMetrics("n1").render([ROW]).decode()
    samples = {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.labels.get("model")
    }
    assert samples["lanmesh_prefix_cache_reused_tokens_total"] == 3400
    assert samples["lanmesh_prefix_cache_prompt_tokens_total"] == 4000
    assert samples["lanmesh_prefix_cache_hits_total"] == 7 and samples["lanmesh_prefix_cache_evictions_total"] == 2
    assert samples["lanmesh_prefix_cache_capacity_bytes"] == 1 << 29


def test_the_console_shows_the_share_of_prompt_tokens_the_cache_spared() -> None:
    assert _node_row(ROW)["prefix_reused"] == {"smollm2": 0.85}
    assert "prefix_reused" not in _node_row({**ROW, "executor": {"echo": {"batches": 1}}})


def test_answers_say_how_many_prompt_tokens_were_cached_as_openai_does() -> None:
    usage = usage_of({"usage": {"prompt_tokens": 500, "completion_tokens": 20, "cached_tokens": 480}})
    assert usage.prompt_tokens_details.cached_tokens == 480
    assert usage_of({"usage": {"prompt_tokens": 5}}).model_dump()["prompt_tokens_details"] == {"cached_tokens": 0}
