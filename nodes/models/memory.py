"""What a model needs in memory once loaded, estimated from file headers and sizes (no weights are read): its
weights as the engine holds them, the engine's own share (runtime libraries, tokenizers, step buffers), and for the
onnxruntime chat engine the key/value cache it may fill, which it never passes (`chat_scheduler`).

The factors below were measured on the default models (SmolLM2-135M int4: a 106 MiB build takes 181 MiB in an
onnxruntime session, its tokenizer 42 MiB, llguidance's view of the vocabulary 29 MiB; MiniLM likewise); the budget
test (tests/models/test_memory_budget.py) holds a node under a real cgroup limit to them.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .specs import DEFAULT_PRECISION, ModelSpec, resolve_path

MIB = 1 << 20
_HEADROOM = 1.2  # the transformers engine: activations, its own growing cache, allocator slack
_SESSION_FACTOR = 1.75  # an onnxruntime session holds its weights file this many times (copies, prepacked blocks)
_SESSION_BASE = 40 * MIB  # onnxruntime's own code and arenas
_CHAT_BASE = 72 * MIB  # a chat engine's tokenizer and llguidance's vocabulary
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
    smallest = MIN_KV_CACHE_TOKENS * shape.bytes_per_token
    if room < smallest:
        return None
    mib = max(room // MIB, -(-smallest // MIB))
    fitted = replace(spec, options={**spec.options, "kv_cache": mib})
    return fitted, replace(need, kv_cache=mib * MIB, kv_adjustable=False)


def kv_shape(spec: ModelSpec) -> KVShape | None:
    """The model's cache shape from its config (GGUF header, HF config.json, or a built genai_config.json)."""
    try:
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
    if importlib.util.find_spec("gguf") is None:
        return None
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        return field.parts[field.data[0]].tolist()[0] if field.data else None

    raw = reader.fields["general.architecture"]
    arch = bytes(raw.parts[raw.data[0]]).decode()
    heads = int(value(f"{arch}.attention.head_count"))
    kv_heads = int(value(f"{arch}.attention.head_count_kv") or heads)
    head_size = int(value(f"{arch}.attention.key_length") or int(value(f"{arch}.embedding_length")) // heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else _VOCAB_GUESS
    return KVShape(int(value(f"{arch}.block_count")), kv_heads, head_size, int(value(f"{arch}.context_length") or 2048),
                   vocab, itemsize)  # fmt: skip


def _single(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    if len(files) != 1:
        raise ValueError(f"{folder}: expected exactly one {pattern} file, found {len(files)}")
    return files[0]


def _gguf_fp32_bytes(path: Path) -> int:
    if importlib.util.find_spec("gguf") is None:
        return int(path.stat().st_size * _GGUF_FALLBACK_EXPANSION)
    from gguf import GGUFReader  # reads the header and memory-maps the tensors; no weights are decoded

    reader = GGUFReader(str(path))
    return sum(4 * int(t.n_elements) for t in reader.tensors)


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
