"""Build a chat model for onnxruntime once, with onnxruntime-genai's model builder, into the model cache.

It runs in a child process (`python -m nodes.models.backends.onnx_build`): building needs torch and transformers
(GGUF -> HF folder -> ONNX), and a node that imported them would keep ~400 MB of memory it never uses again.
The child prints one JSON line per step on stdout; the last one names the built folder or the error.

A GGUF source at int4 keeps its own quantized blocks (`gguf_blocks`): the builder makes the graph, then the
GGUF's blocks replace the weights it re-quantized.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cache import cache_entry, publish_cache
from .child import ChildError, emit, run_child

PRECISIONS = ("int4", "int8", "fp16", "fp32")
_BUILD_FORMAT = "ortgenai-v2"  # bump when what we put in an entry changes: old entries are then ignored
# The recipes, versioned: a change to one changes the cache key, so models built the old way are built again.
# - "gguf-blocks" (int4 from a GGUF): the builder's plain int4 graph, the head at int8, gate and up fused; then
#   the GGUF's own blocks replace every weight (`gguf_blocks`). SmolLM2-135M's Q4_1 GGUF: perplexity 1.00x of
#   fp32 on two passages, as llama.cpp on the same file. A GGUF with no Q4_0/Q4_1/Q4_K/Q8_0 weight (F16, F32,
#   other quantizations only) is built as "mixed".
# - "mixed" (int4 from float weights): llama.cpp's mixed strategy, the body at int4, the most
#   quantization-sensitive matmuls (first and last eighth of the layers, every third layer's qkv/v/down) and the
#   head at int8: 1.12-1.17x of fp32 on the same model, where every plain int4 build tried was 1.23-1.34x.
RECIPES = {"gguf-blocks": "v1", "mixed": "v1"}
_EXTRA_OPTIONS = {
    "gguf-blocks": ["algo_config=rtn", "matmul_mixed_precision=last_matmul:int8", "fuse_mlp_gate_up=true"],
    "mixed": ["algo_config=rtn", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"],
}
_CHILD = "nodes.models.backends.onnx_build"
_GPU_ONLY = {"fp16": "fp16 runs on a GPU (CUDA) only; on a CPU use int4, int8 or fp32"}


class BuildError(RuntimeError):
    """The builder could not make an ONNX model of this source (unsupported architecture, bad files, ...)."""


def builder_version() -> str:
    """The installed onnxruntime-genai version, read without importing it ('' when not installed)."""
    for dist in ("onnxruntime-genai", "onnxruntime-genai-cuda"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def recipe(source: Path, precision: str) -> str:
    """How `source` is built at `precision`: "gguf-blocks" (int4 from a GGUF), "mixed" (int4 from an HF folder)
    or the precision itself."""
    if precision != "int4":
        return precision
    return "gguf-blocks" if _gguf_file(source) is not None else "mixed"


def build_key(precision: str, provider: str, recipe_name: str = "") -> str:
    """What besides the source's bytes decides a built model: precision, recipe and its version, provider,
    builder version."""
    how = f"{recipe_name}.{RECIPES[recipe_name]}-" if recipe_name in RECIPES else ""
    return f"{_BUILD_FORMAT}-{precision}-{how}{provider}-{builder_version()}"


def built_entry(name: str, source: Path, precision: str, provider: str, cache_dir: str | Path | None) -> Path:
    """Where the build of `source` at `precision` lives in the cache (whether built yet or not)."""
    key = build_key(precision, provider, recipe(source, precision))
    return cache_entry(f"{name}-onnx", source, key, cache_dir)


def check_precision(precision: str, provider: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if provider == "cpu" and precision in _GPU_ONLY:
        raise ValueError(_GPU_ONLY[precision])


def build_in_child(
    name: str,
    source: Path,
    precision: str,
    provider: str,
    cache_dir: str | Path | None,
    report: Callable[[str, float], None],
) -> Path:
    """Build in a child process (`child.run_child`: both its pipes drained), relaying its progress; returns the
    published cache entry."""
    args = ["--name", name, "--source", str(source), "--precision", precision, "--provider", provider]
    if cache_dir:
        args += ["--cache-dir", str(cache_dir)]
    try:
        result = run_child(_CHILD, args, report)
    except ChildError as exc:
        raise BuildError(str(exc)) from None
    if "built" not in result:
        raise BuildError(f"the build of {name} ended without naming what it built")
    return Path(result["built"])


# ---------------------------------------------------------------- the child


def _gguf_file(source: Path) -> Path | None:
    """The .gguf file a source is (or that a folder without config.json holds); None for an HF folder."""
    if source.is_dir() and (source / "config.json").exists():
        return None
    gguf = source if source.is_file() else next(iter(sorted(source.glob("*.gguf"))), None)
    return gguf if gguf is not None and gguf.suffix == ".gguf" else None


def _hf_source(name: str, source: Path, cache_dir: str | None) -> Path:
    """The HF folder to build from: `source` itself, or the fp32 folder converted once from a GGUF."""
    if source.is_dir() and (source / "config.json").exists():
        return source
    gguf = _gguf_file(source)
    if gguf is None:
        raise BuildError(f"{source}: expected an HF model folder (config.json) or a .gguf file")
    from .transformers_chat import convert_gguf

    # The parent puts the model's name before every stage: the converter's own "NAME: " would say it twice.
    return convert_gguf(
        name,
        gguf,
        cache_dir,
        lambda stage, fraction: emit(stage=stage.removeprefix(f"{name}: "), fraction=0.3 * fraction),
    )


def _run_builder(hf: Path, out: Path, precision: str, how: str, provider: str, layers: int) -> None:
    """onnxruntime-genai's model builder, as its command line (its stable interface), with progress."""
    with tempfile.TemporaryDirectory(prefix="lanmesh-build-") as scratch:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
        cmd += ["-p", precision, "-e", provider, "-c", scratch]
        if how in _EXTRA_OPTIONS:
            cmd += ["--extra_options", *_EXTRA_OPTIONS[how]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            match = re.match(r"Reading layer (\d+)", line)
            if match and layers:
                done = (int(match.group(1)) + 1) / layers
                emit(
                    stage=f"building ONNX {precision} model: layer {match.group(1)}/{layers}", fraction=0.3 + 0.5 * done
                )
            elif line.startswith("Saving ONNX model"):
                emit(stage=f"building ONNX {precision} model: quantizing and saving", fraction=0.85)
        if proc.wait() != 0:
            problem = next((t for t in reversed(tail) if "Error" in t or "not supported" in t.lower()), "")
            raise BuildError(problem or "the model builder failed: " + " | ".join(tail[-3:]))
    if not (out / "genai_config.json").exists() or not any(out.glob("*.onnx")):
        raise BuildError(f"the model builder wrote no genai_config.json / .onnx into {out}")


def _child(args: argparse.Namespace) -> int:
    source = Path(args.source)
    check_precision(args.precision, args.provider)
    entry = built_entry(args.name, source, args.precision, args.provider, args.cache_dir)
    how = recipe(source, args.precision)
    gguf = _gguf_file(source)
    if how == "gguf-blocks" and gguf is not None:
        from .gguf_blocks import carriable

        if not carriable(gguf):
            how = "mixed"  # nothing in it to carry over: quantize its float weights once
    hf = _hf_source(args.name, source, args.cache_dir)
    config = json.loads((hf / "config.json").read_text())
    layers = int(config.get("num_hidden_layers") or 0)

    def build(tmp: Path) -> dict[str, Any]:
        _run_builder(hf, tmp, args.precision, how, args.provider, layers)
        facts: dict[str, Any] = {}
        if how == "gguf-blocks" and gguf is not None:
            from .gguf_blocks import CarryError, carry_blocks

            emit(stage="carrying the GGUF's quantized blocks into the ONNX model", fraction=0.9)
            try:
                facts["carried"] = carry_blocks(tmp, gguf, hf)
            except CarryError as exc:
                raise BuildError(f"{gguf.name}: {exc}") from None
        return {
            "source": str(source),
            "hf_folder": str(hf),
            "precision": args.precision,
            "recipe": f"{how} {RECIPES[how]}" if how in RECIPES else how,
            **facts,
            "provider": args.provider,
            "builder": f"onnxruntime-genai {builder_version()}",
            "format": _BUILD_FORMAT,
        }

    publish_cache(entry, build)
    emit(stage="built", fraction=1.0, built=str(entry))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a chat model for lanmesh's onnxruntime engine (internal).")
    parser.add_argument("--name", required=True)
    parser.add_argument("--source", required=True, help="a .gguf file or an HF model folder")
    parser.add_argument("--precision", default="int4", choices=PRECISIONS)
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    try:
        return _child(args)
    except (BuildError, ValueError, OSError, ImportError) as exc:
        emit(error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, BuildError) else str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
