"""`bench models` compares lanmesh with every chat anchor a user could run instead, and its goal with the fastest."""

from __future__ import annotations

from typing import Any

from bench.models import CHAT_ANCHORS, _summary


def runs(single: float, aggregate: float) -> dict[str, list[dict[str, Any]]]:
    return {
        "single": [{"tok_per_s": single, "decode_tok_per_s": single, "ttft_ms": 100.0}],
        "aggregate": [{"tok_per_s": aggregate}],
        "embed_batched": [{"sentences_per_s": 200.0}],
        "embed_single": [{"sentences_per_s": 150.0}],
    }


def test_the_goal_is_measured_against_the_fastest_anchor_of_each_figure() -> None:
    anchors = {
        "onnxruntime_genai": {"single_tok_per_s": 100.0, "batch_tok_per_s": 200.0, "batch": 8},
        "onnxruntime_genai_default_int4": {"single_tok_per_s": 120.0, "batch_tok_per_s": 250.0, "batch": 8},
        "llama_cpp": {"single_tok_per_s": 90.0, "single_ttft_ms": 200.0},
        "onnxruntime_embed": {"sentences_per_s": 250.0},
    }
    quality = {"lanmesh": {"perplexity": [10.0, 11.0], "over_fp32": [1.0, 1.02]}}
    s = _summary(runs(96.0, 225.0), anchors, quality, 90.0, 2.0, 1.5, 450.0)
    assert set(s["over_anchor"]) == set(CHAT_ANCHORS)
    assert s["fastest_single_anchor"] == "onnxruntime_genai_default_int4"
    assert s["over_fastest_single"] == 96.0 / 120.0
    assert s["fastest_batch_anchor"] == "onnxruntime_genai_default_int4"
    assert s["over_fastest_batch"] == 225.0 / 250.0
    assert s["over_anchor"]["llama_cpp"] == {"single": 96.0 / 90.0, "batch": None}  # it serves one at a time
    assert s["perplexity_over_fp32"] == 1.02  # the worse passage


def test_an_anchor_that_could_not_run_is_left_out_of_the_comparison() -> None:
    anchors = {
        "onnxruntime_genai": {"single_tok_per_s": 100.0, "batch_tok_per_s": 200.0, "batch": 8},
        "onnxruntime_genai_default_int4": {"skipped": "the model builder failed"},
        "llama_cpp": {"skipped": "llama-cpp-python is not installed"},
        "onnxruntime_embed": {"skipped": "no export"},
    }
    s = _summary(runs(110.0, 180.0), anchors, {"lanmesh": {"skipped": "no fp32"}}, 90.0, 2.0, 1.5, 450.0)
    assert s["fastest_single_anchor"] == "onnxruntime_genai" and s["over_fastest_single"] == 1.1
    assert s["over_anchor"]["llama_cpp"] == {"single": None, "batch": None}
    assert s["perplexity_over_fp32"] is None and s["embed_over_raw"] is None
