"""What a model needs in memory once loaded, estimated from file headers and sizes (no weights are read): its
weights as the engine holds them, the engine's own share (runtime libraries, tokenizers, step buffers), and for the
onnxruntime chat engine the key/value cache it may fill, which it never passes (`chat_scheduler`).

The factors below were measured on the default models (SmolLM2-135M int4: a 106 MiB build takes 181 MiB in an
onnxruntime session, its tokenizer 42 MiB, llguidance's view of the vocabulary 29 MiB; MiniLM likewise); the budget
test (tests/models/test_memory_budget.py) holds a node under a real cgroup limit to them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gguf_header import GGUFHeaderError, read_header
from .specs import DEFAULT_PRECISION, ModelSpec, resolve_path, stage_range

if TYPE_CHECKING:
    from .backends.onnx_stage_graph import LayerCosts

MIB = 1 << 20
_HEADROOM = 1.2  # the transformers engine: activations, its own growing cache, allocator slack
_SESSION_FACTOR = 1.75  # an onnxruntime session holds its weights file this many times (copies, prepacked blocks)
_SESSION_BASE = 40 * MIB  # onnxruntime's own code and arenas
_CHAT_BASE = 72 * MIB  # a chat engine's tokenizer and llguidance's vocabulary
_TOKENIZER = 42 * MIB  # of which the tokenizer (a pipeline's first and last stages hold one each)
# A stage's session: its layers' weights are prepacked as the whole model's are; the embeddings table is read as it
# is (a gather); the head's matmul keeps less than the layers' do. Measured on SmolLM2's int4 stages: 0-14 88.6 MiB,
# 15-29 98.9, 10-19 43.4 MiB held for 68.9, 68.9 and 25.2 MiB of weights.
_EMBED_FACTOR = 1.0
_HEAD_FACTOR = 1.3
_EMBED_BASE = 48 * MIB  # an embedding engine's tokenizer and batch buffers
# Share of the fp32 bytes a build holds, scales included (int4 keeps its sensitive layers at int8).
_PRECISION_SHARE = {"int4": 0.21, "int8": 0.28, "fp16": 0.5, "fp32": 1.0}
_GGUF_FALLBACK_EXPANSION = 7.0  # 4-bit file to fp32 weights, when the header cannot be read
DEFAULT_KV_CACHE_MIB = 1024  # a chat model's key/value cache when neither its spec nor the node sets one
MIN_KV_CACHE_TOKENS = 2048  # below this a chat model cannot hold one usual conversation: refuse rather than shrink
_VOCAB_GUESS = 50_000


@dataclass(frozen=True)
class KVShape:
    """What one token of a chat model costs in its key/value cache, and its context, from the model's config."""

    layers: int
    heads: int
    head_size: int
    context: int
    vocab: int = _VOCAB_GUESS
    itemsize: int = 4

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.heads * self.head_size * self.itemsize


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a model holds once loaded; `kv_cache` is the cap of a chat engine's cache (0 for the others)."""

    weights: int
    runtime: int
    kv_cache: int = 0
    kv_adjustable: bool = False  # the cache was left to the node (not set by the spec): it may shrink to fit

    @property
    def total(self) -> int:
        return self.weights + self.runtime + self.kv_cache

    def describe(self) -> str:
        parts = [f"{self.weights / MIB:.0f} MiB weights", f"{self.runtime / MIB:.0f} MiB engine"]
        if self.kv_cache:
            parts.append(f"{self.kv_cache / MIB:.0f} MiB key/value cache")
        return " + ".join(parts) + f" = {self.total / MIB:.0f} MiB"


def onnx_chat(spec: ModelSpec) -> bool:
    """Whether the spec runs on the onnxruntime chat engine (the one with a capped cache)."""
    return spec.kind == "onnx-chat" or (
        spec.kind in ("gguf", "transformers") and spec.options.get("engine", "auto") != "transformers"
    )


def estimate_memory(spec: ModelSpec) -> MemoryNeed:
    """What `spec` will hold once loaded (see the module docstring), from headers and sizes only."""
    if spec.kind in ("echo", "sleep"):
        return MemoryNeed(0, 0)
    layers = stage_range(spec)
    if layers is not None:
        return _stage_memory(spec, *layers)
    path = resolve_path(spec)
    if spec.kind == "onnx-embed":  # an exported ONNX file, or an HF folder (exported once, in a child process)
        fp32 = path.stat().st_size if path.is_file() else _folder_fp32_bytes(path)
        return MemoryNeed(int(fp32 * _SESSION_FACTOR), _SESSION_BASE + _EMBED_BASE)
    if spec.kind == "onnx-chat":
        weights = sum(f.stat().st_size for f in path.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
    else:
        gguf = (path if path.is_file() else _single(path, "*.gguf")) if spec.kind == "gguf" else None
        weights = _gguf_fp32_bytes(gguf) if gguf is not None else _folder_fp32_bytes(path)
        if not onnx_chat(spec):  # transformers holds them as fp32, and its cache grows without a cap
            return MemoryNeed(weights, int(weights * (_HEADROOM - 1)))
        weights = int(weights * _PRECISION_SHARE.get(spec.options.get("precision", DEFAULT_PRECISION), 1.0))
    shape = kv_shape(spec)
    kv = kv_cache_bytes(spec, shape)
    steps = 0
    if shape is not None:  # the logits of a prompt chunk and of a full decode step, with a copy each
        steps = 2 * 4 * shape.vocab * (128 + int(spec.max_batch or 16))
    return MemoryNeed(int(weights * _SESSION_FACTOR), _SESSION_BASE + _CHAT_BASE + steps, kv,
                      kv_adjustable="kv_cache" not in spec.options)  # fmt: skip


def stage_need(costs: LayerCosts, first: int, last: int, kv_cache: int, vocab: int, slots: int = 16) -> MemoryNeed:
    """What a pipeline stage of layers first..last holds once loaded: its weights as its session holds them, the
    engine (the first and last stages hold a tokenizer; the last also llguidance's vocabulary when a request asks for
    a grammar, and the logits of a prompt chunk), and `kv_cache` bytes of key/value cache."""
    layers = sum(costs.layer_bytes[first : last + 1]) + costs.shared_bytes
    weights = int(layers * _SESSION_FACTOR)
    if first == 0:
        weights += int(costs.embed_bytes * _EMBED_FACTOR)
    if last == costs.layers - 1:
        weights += int(costs.head_bytes * _HEAD_FACTOR)
    runtime = _SESSION_BASE
    if first == 0:
        runtime += _TOKENIZER
    if last == costs.layers - 1:
        runtime += _CHAT_BASE + 2 * 4 * vocab * (128 + slots)
    else:
        runtime += 2 * 4 * costs.hidden * (128 + slots)
    return MemoryNeed(weights, runtime, kv_cache)


def stage_kv_cache(spec: ModelSpec, first: int, last: int, layers: int, smallest_per_token: int = 0) -> int:
    """A stage's key/value cache cap in bytes: its spec's `kv_cache` MiB when set, else the whole model's default
    for its share of the layers (the same tokens per request as the unsplit engine). With `smallest_per_token` (the
    whole model's bytes per cached token): the least a stage may be cut to (MIN_KV_CACHE_TOKENS), what the automatic
    split plans with."""
    mib = spec.options.get("kv_cache")
    if mib:
        return int(mib) * MIB
    share = (last - first + 1) / layers
    if smallest_per_token:
        return int(MIN_KV_CACHE_TOKENS * smallest_per_token * share)
    return int(DEFAULT_KV_CACHE_MIB * MIB * share)


def whole_build(spec: ModelSpec) -> Path | None:
    """The folder of the whole model's onnxruntime build a stage spec is cut from, when it is built already."""
    from .backends.onnx_build import built_entry
    from .cache import cache_ready

    path = resolve_path(spec)
    if (path / "genai_config.json").exists():
        return path
    name = str(spec.options.get("model", spec.name))
    entry = built_entry(name, path, spec.options.get("precision", DEFAULT_PRECISION), "cpu", None)
    return entry if cache_ready(entry) else None


def _stage_memory(spec: ModelSpec, first: int, last: int) -> MemoryNeed:
    """A stage spec's need, from its build's graph (or, before the model is built, from the whole model's need).
    A cache left to the node may shrink to fit, as a whole model's does."""
    from .backends.onnx_stage_graph import layer_costs

    built = whole_build(spec)
    shape = kv_shape(spec)
    vocab = shape.vocab if shape else _VOCAB_GUESS
    layers = shape.layers if shape else last + 1
    kv = stage_kv_cache(spec, first, last, layers)
    adjustable = "kv_cache" not in spec.options
    if built is not None:
        need = stage_need(layer_costs(built), first, last, kv, vocab, int(spec.max_batch or 16))
        return replace(need, kv_adjustable=adjustable)
    whole = estimate_memory(replace(spec, name=str(spec.options.get("model", spec.name)), options={
        k: v for k, v in spec.options.items() if k != "layers"}))  # fmt: skip
    share = (last - first + 1) / layers
    return MemoryNeed(int(whole.weights * share) + 32 * MIB, whole.runtime, kv, adjustable)


def kv_cache_bytes(spec: ModelSpec, shape: KVShape | None) -> int:
    """The cap of a chat model's key/value cache: what its spec says (`kv_cache=MiB`), else the default, and never
    more than every slot holding the whole context."""
    mib = spec.options.get("kv_cache")
    cap = int(mib) * MIB if mib else DEFAULT_KV_CACHE_MIB * MIB
    if shape is not None:
        full = int(spec.max_batch or 16) * shape.context * shape.bytes_per_token
        cap = min(cap, full)
    return cap


def fit_kv_cache(spec: ModelSpec, need: MemoryNeed, free: int) -> tuple[ModelSpec, MemoryNeed] | None:
    """`spec` with a key/value cache shrunk so the model fits in `free` bytes, or None when even the smallest
    useful cache (MIN_KV_CACHE_TOKENS) does not fit, or the cache was set by hand."""
    shape = kv_shape(spec)
    if not need.kv_adjustable or shape is None:
        return None
    room = free - need.weights - need.runtime
    per_token = shape.bytes_per_token
    layers = stage_range(spec)
    if layers is not None:  # a stage caches its own layers only
        per_token = per_token * (layers[1] - layers[0] + 1) // shape.layers
    smallest = MIN_KV_CACHE_TOKENS * per_token
    if room < smallest:
        return None
    mib = max(room // MIB, -(-smallest // MIB))
    fitted = replace(spec, options={**spec.options, "kv_cache": mib})
    return fitted, replace(need, kv_cache=mib * MIB, kv_adjustable=False)


def kv_shape(spec: ModelSpec) -> KVShape | None:
    """The model's cache shape from its config (GGUF header, HF config.json, or a built genai_config.json; a stage
    reads its build's, which is quicker than a GGUF header)."""
    try:
        if stage_range(spec) is not None and spec.kind != "onnx-chat":
            built = whole_build(spec)
            if built is not None:
                return kv_shape(replace(spec, kind="onnx-chat", path=str(built)))
        path = resolve_path(spec)
        if spec.kind == "onnx-chat":
            model = json.loads((path / "genai_config.json").read_text())["model"]
            decoder = model["decoder"]
            itemsize = 2 if spec.options.get("precision") == "fp16" else 4
            return KVShape(int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]),
                           int(decoder["head_size"]), int(model.get("context_length") or 2048),
                           int(model.get("vocab_size") or _VOCAB_GUESS), itemsize)  # fmt: skip
        itemsize = 2 if spec.options.get("precision") == "fp16" else 4
        if spec.kind == "gguf":
            return _gguf_shape(path if path.is_file() else _single(path, "*.gguf"), itemsize)
        return _hf_shape(json.loads((path / "config.json").read_text()), itemsize)
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _hf_shape(config: dict[str, Any], itemsize: int) -> KVShape:
    heads = int(config["num_attention_heads"])
    head_size = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    return KVShape(int(config["num_hidden_layers"]), int(config.get("num_key_value_heads") or heads), head_size,
                   int(config.get("max_position_embeddings") or 2048), int(config.get("vocab_size") or _VOCAB_GUESS),
                   itemsize)  # fmt: skip


def _gguf_shape(path: Path, itemsize: int) -> KVShape | None:
    try:
        header = read_header(path)
    except GGUFHeaderError:
        return None
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def value(key: str) -> Any:  # a per-layer array (some architectures' head counts): its largest
        found = header.get(f"{arch}.{key}")
        return max(found, default=None) if isinstance(found, list) else found

    heads = int(value("attention.head_count"))
    kv_heads = int(value("attention.head_count_kv") or heads)
    head_size = int(value("attention.key_length") or int(value("embedding_length")) // heads)
    vocab = header.array_lengths.get("tokenizer.ggml.tokens", _VOCAB_GUESS)
    return KVShape(int(value("block_count")), kv_heads, head_size, int(value("context_length") or 2048), vocab,
                   itemsize)  # fmt: skip


def _single(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    if len(files) != 1:
        raise ValueError(f"{folder}: expected exactly one {pattern} file, found {len(files)}")
    return files[0]


def _gguf_fp32_bytes(path: Path) -> int:
    try:
        return sum(4 * n for n in read_header(path).tensor_elements.values())
    except GGUFHeaderError:
        return int(path.stat().st_size * _GGUF_FALLBACK_EXPANSION)


def _folder_fp32_bytes(folder: Path) -> int:
    total = 0
    files = list(folder.glob("*.safetensors"))
    for f in files:
        total += 4 * _safetensors_elements(f)
    if not files:  # .bin / .pt checkpoints: assume they hold fp32 already
        total = sum(f.stat().st_size for f in folder.glob("*.bin"))
    return total


def _safetensors_elements(path: Path) -> int:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    count = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for dim in info["shape"]:
            n *= int(dim)
        count += n
    return count
