"""What a model needs in memory once loaded, estimated from file headers and sizes (no weights are read)."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

from .specs import DEFAULT_PRECISION, ModelSpec, resolve_path

_RUNTIME_HEADROOM = 1.2  # activations, KV cache of a full batch, allocator slack
# Share of the fp32 bytes a build holds, scales included (int4 keeps its sensitive layers at int8).
_PRECISION_SHARE = {"int4": 0.21, "int8": 0.28, "fp16": 0.5, "fp32": 1.0}
_GGUF_FALLBACK_EXPANSION = 7.0  # 4-bit file to fp32 weights, when the header cannot be read


def estimate_memory(spec: ModelSpec) -> int:
    """Bytes a model needs once loaded (weights at the precision it runs + headroom), from headers and sizes only."""
    if spec.kind in ("echo", "sleep"):
        return 0
    path = resolve_path(spec)
    if spec.kind == "onnx-chat":
        weights = sum(f.stat().st_size for f in path.iterdir() if f.name.endswith((".onnx", ".onnx.data")))
    elif spec.kind in ("gguf", "transformers"):
        gguf = (path if path.is_file() else _single(path, "*.gguf")) if spec.kind == "gguf" else None
        weights = _gguf_fp32_bytes(gguf) if gguf is not None else _folder_fp32_bytes(path)
        if spec.options.get("engine", "auto") != "transformers":  # the onnx engine holds them at its precision
            weights = int(weights * _PRECISION_SHARE.get(spec.options.get("precision", DEFAULT_PRECISION), 1.0))
    else:  # onnx-embed: an exported ONNX file, or an HF folder (torch copy + ONNX copy while exporting)
        weights = path.stat().st_size if path.is_file() else 2 * _folder_fp32_bytes(path)
    return int(weights * _RUNTIME_HEADROOM)


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
