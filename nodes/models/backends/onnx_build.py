"""Build a chat model for onnxruntime once, with onnxruntime-genai's model builder, into the model cache.

It runs in a child process (`python -m nodes.models.backends.onnx_build`): building needs torch and transformers
(GGUF -> HF folder -> ONNX), and a node that imported them would keep ~400 MB of memory it never uses again.
The child prints one JSON line per step on stdout; the last one names the built folder or the error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cache import cache_entry, publish_cache

PRECISIONS = ("int4", "int8", "fp16", "fp32")
_BUILD_FORMAT = "ortgenai-v2"  # bump when what we put in an entry changes: old entries are then ignored
# int4 as llama.cpp's mixed strategy: the body at int4, the most quantization-sensitive matmuls (first and last
# eighth of the layers, every third layer's qkv/v/down projections) and the output head at int8. Measured on
# SmolLM2-135M (a Q4_1 GGUF, de-quantized), perplexity on unseen prose against fp32: 1.13x, where every plain
# int4 build tried (rtn, k_quant, block 16/32, int8 head only, fp32 activations) was 1.23-1.34x. Decoding it
# costs ~30% of plain int4's speed; the quality test (int4 <= 1.15x fp32) holds it.
_EXTRA_OPTIONS = {"int4": ["algo_config=rtn", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"]}
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


def build_key(precision: str, provider: str) -> str:
    """What besides the source's bytes decides a built model: precision, provider, builder version."""
    return f"{_BUILD_FORMAT}-{precision}-{provider}-{builder_version()}"


def built_entry(name: str, source: Path, precision: str, provider: str, cache_dir: str | Path | None) -> Path:
    """Where the build of `source` at `precision` lives in the cache (whether built yet or not)."""
    return cache_entry(f"{name}-onnx", source, build_key(precision, provider), cache_dir)


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
    """Build in a child process, relaying its progress; returns the published cache entry."""
    cmd = [sys.executable, "-m", "nodes.models.backends.onnx_build", "--name", name, "--source", str(source)]
    cmd += ["--precision", precision, "--provider", provider]
    if cache_dir:
        cmd += ["--cache-dir", str(cache_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last: dict[str, Any] = {}
    assert proc.stdout is not None and proc.stderr is not None
    try:
        for line in proc.stdout:
            try:
                last = json.loads(line)
            except ValueError:
                continue
            if "stage" in last:
                report(last["stage"], float(last.get("fraction", 0.0)))
        errors = proc.stderr.read()
        code = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (the node is stopping): the half-built entry is never published
            proc.kill()
            proc.wait()
    if code == 0 and "built" in last:
        return Path(last["built"])
    reason = last.get("error") or _last_line(errors) or f"builder exited with status {code}"
    raise BuildError(reason)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


# ---------------------------------------------------------------- the child


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _hf_source(name: str, source: Path, cache_dir: str | None) -> Path:
    """The HF folder to build from: `source` itself, or the fp32 folder converted once from a GGUF."""
    if source.is_dir() and (source / "config.json").exists():
        return source
    gguf = source if source.is_file() else next(iter(sorted(source.glob("*.gguf"))), None)
    if gguf is None or gguf.suffix != ".gguf":
        raise BuildError(f"{source}: expected an HF model folder (config.json) or a .gguf file")
    from .transformers_chat import convert_gguf

    # The parent puts the model's name before every stage: the converter's own "NAME: " would say it twice.
    return convert_gguf(
        name,
        gguf,
        cache_dir,
        lambda stage, fraction: _emit(stage=stage.removeprefix(f"{name}: "), fraction=0.3 * fraction),
    )


def _run_builder(hf: Path, out: Path, precision: str, provider: str, layers: int) -> None:
    """onnxruntime-genai's model builder, as its command line (its stable interface), with progress."""
    with tempfile.TemporaryDirectory(prefix="lanmesh-build-") as scratch:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
        cmd += ["-p", precision, "-e", provider, "-c", scratch]
        if precision in _EXTRA_OPTIONS:
            cmd += ["--extra_options", *_EXTRA_OPTIONS[precision]]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-20:]
            match = re.match(r"Reading layer (\d+)", line)
            if match and layers:
                done = (int(match.group(1)) + 1) / layers
                _emit(
                    stage=f"building ONNX {precision} model: layer {match.group(1)}/{layers}", fraction=0.3 + 0.5 * done
                )
            elif line.startswith("Saving ONNX model"):
                _emit(stage=f"building ONNX {precision} model: quantizing and saving", fraction=0.85)
        if proc.wait() != 0:
            problem = next((t for t in reversed(tail) if "Error" in t or "not supported" in t.lower()), "")
            raise BuildError(problem or "the model builder failed: " + " | ".join(tail[-3:]))
    if not (out / "genai_config.json").exists() or not any(out.glob("*.onnx")):
        raise BuildError(f"the model builder wrote no genai_config.json / .onnx into {out}")


def _child(args: argparse.Namespace) -> int:
    source = Path(args.source)
    check_precision(args.precision, args.provider)
    entry = built_entry(args.name, source, args.precision, args.provider, args.cache_dir)
    hf = _hf_source(args.name, source, args.cache_dir)
    config = json.loads((hf / "config.json").read_text())
    layers = int(config.get("num_hidden_layers") or 0)

    def build(tmp: Path) -> dict[str, Any]:
        _run_builder(hf, tmp, args.precision, args.provider, layers)
        return {
            "source": str(source),
            "hf_folder": str(hf),
            "precision": args.precision,
            "provider": args.provider,
            "builder": f"onnxruntime-genai {builder_version()}",
            "format": _BUILD_FORMAT,
        }

    publish_cache(entry, build)
    _emit(stage="built", fraction=1.0, built=str(entry))
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
        _emit(error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, BuildError) else str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
