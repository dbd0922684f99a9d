"""A stage's graph cut out of a built model: chained stages compute the whole model's logits to the bit, and each
holds only its own layers' weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from model_jobs import requires

from nodes.models.backends.onnx_stage_graph import (
    HIDDEN_IN,
    HIDDEN_OUT,
    StageGraphError,
    cut_stage,
    layer_costs,
)

LAYERS = 4


@pytest.fixture(scope="module", params=["fp32", "int4"])
def built(request: pytest.FixtureRequest, tiny_deep_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-layer tiny Llama built by onnxruntime-genai's builder, at fp32 and at int4 (quantized blocks and the
    head's table shared with the embeddings)."""
    requires("onnxruntime", "onnxruntime_genai", "onnx")
    from nodes.models.backends.onnx_chat import OnnxChat

    engine = OnnxChat("deep", tiny_deep_dir, cache_dir=tmp_path_factory.mktemp("deep"), precision=request.param)
    engine.load()
    assert engine.model_dir is not None
    folder = engine.model_dir
    engine.close()
    return folder


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _generate(run_layers: Any, prompt: list[int], steps: int) -> list[Any]:
    """Greedy decoding through `run_layers(ids, mask, cache) -> logits`; the last position's logits of each step."""
    import numpy as np

    cache: dict[int, tuple[Any, Any]] = {
        i: (np.zeros((1, 2, 0, 16), np.float32), np.zeros((1, 2, 0, 16), np.float32)) for i in range(LAYERS)
    }
    ids = np.asarray([prompt], dtype=np.int64)
    total, out = len(prompt), []
    for _ in range(steps):
        logits = run_layers(ids, np.ones((1, total), np.int64), cache)
        out.append(logits[0, -1].copy())
        ids = np.asarray([[int(logits[0, -1].argmax())]], dtype=np.int64)
        total += 1
    return out


def _run(session: Any, feeds: dict[str, Any], layers: range, cache: dict[int, tuple[Any, Any]], out: str) -> Any:
    for i in layers:
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = cache[i]
    names = [out] + [n for i in layers for n in (f"present.{i}.key", f"present.{i}.value")]
    results = session.run(names, feeds)
    for j, i in enumerate(layers):
        cache[i] = (results[1 + 2 * j], results[2 + 2 * j])
    return results[0]


@pytest.mark.parametrize("split", [[(0, 1), (2, 3)], [(0, 0), (1, 2), (3, 3)]], ids=["2 stages", "3 stages"])
def test_chained_stages_give_the_whole_models_logits_bit_for_bit(built: Path, tmp_path: Path, split: list) -> None:
    import numpy as np

    whole = _session(built / "model.onnx")
    prompt = [5, 17, 42, 99, 7, 300, 12, 64, 3]
    expected = _generate(
        lambda ids, mask, cache: _run(whole, {"input_ids": ids, "attention_mask": mask}, range(LAYERS), cache,
                                      "logits"), prompt, 6)  # fmt: skip
    stages = []
    for first, last in split:
        folder = tmp_path / f"{first}-{last}"
        folder.mkdir()
        cut_stage(built, first, last, folder)
        stages.append((first, last, _session(folder / "model.onnx")))

    def chained(ids: Any, mask: Any, cache: dict[int, tuple[Any, Any]]) -> Any:
        hidden = None
        for first, last, session in stages:
            feeds = {"attention_mask": mask, **({"input_ids": ids} if first == 0 else {HIDDEN_IN: hidden})}
            hidden = _run(session, feeds, range(first, last + 1), cache, "logits" if last == LAYERS - 1 else HIDDEN_OUT)
        return hidden

    got = _generate(chained, prompt, 6)
    assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_a_stage_holds_its_own_layers_weights_and_no_others(built: Path, tmp_path: Path) -> None:
    costs = layer_costs(built)
    assert costs.layers == LAYERS and len(costs.layer_bytes) == LAYERS and all(costs.layer_bytes)
    whole = sum(f.stat().st_size for f in built.glob("model.onnx.data"))
    for first, last in [(0, 0), (1, 2), (3, 3)]:
        folder = tmp_path / f"{first}-{last}"
        folder.mkdir()
        facts = cut_stage(built, first, last, folder)
        held = (folder / "model.onnx.data").stat().st_size
        # Its bytes are what the cost table says (up to the 64-byte alignment of each tensor), well under the whole.
        assert costs.stage_bytes(first, last) <= held < costs.stage_bytes(first, last) + 64 * 64
        assert held < whole
        assert (facts["first"], facts["last"], facts["layers"]) == (first, last, LAYERS)
        assert (folder / "tokenizer.json").exists()  # the first and last stages read and write text
    assert costs.stage_bytes(0, LAYERS - 1) >= whole - 64 * 64  # every weight belongs to some part


def test_a_range_outside_the_model_or_the_whole_model_is_refused(built: Path, tmp_path: Path) -> None:
    with pytest.raises(StageGraphError, match="not a range of this model's 0-3"):
        cut_stage(built, 2, 4, tmp_path)
    with pytest.raises(StageGraphError, match="whole model"):
        cut_stage(built, 0, 3, tmp_path)
