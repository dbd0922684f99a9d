"""Loading a model: the backend a spec asks for, built and loaded; real models import torch or onnxruntime only here,
and a chat model onnxruntime-genai cannot build falls back to transformers (engine=auto only)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .hardware import cuda_gpu_name
from .memory import kv_cache_bytes, kv_shape
from .packaged import MODELS_EXTRA_HINT
from .specs import DEFAULT_PRECISION, ENGINES, KINDS, ModelSpec, resolve_path, stage_range

if TYPE_CHECKING:
    from .backends.base import Backend, ProgressFn

log = logging.getLogger(__name__)


def build_backend(spec: ModelSpec, cache_dir: str | Path | None = None) -> Backend:
    """Make the (not yet loaded) backend for a spec; real models import torch/onnxruntime only here."""
    backend: Backend
    if spec.kind == "echo":
        from .backends.synthetic import EchoBackend

        backend = EchoBackend(spec.name)
    elif spec.kind == "sleep":
        from .backends.synthetic import SleepBackend

        backend = SleepBackend(float(spec.options["ms"]), int(spec.options.get("capacity", 1)), name=spec.name)
    elif spec.kind in ("transformers", "gguf", "onnx-chat"):
        backend = _chat_backend(spec, cache_dir)
    elif spec.kind == "onnx-embed":
        _require("onnxruntime", "tokenizers", "numpy")
        path = resolve_path(spec)
        if path.is_dir() and not any(path.glob("*.onnx")):
            _require("torch", "transformers", "onnx", "onnxscript")  # needed once, to export
        from .backends.onnx_embed import OnnxEmbedder

        backend = OnnxEmbedder(
            spec.name,
            path,
            cache_dir=cache_dir,
            max_batch=spec.max_batch or 32,
            concurrency=spec.concurrency or 1,
            threads=spec.options.get("threads"),
        )
    else:
        raise ValueError(f"model {spec.name}: unknown kind {spec.kind!r}; expected one of {', '.join(KINDS)}")
    if spec.max_batch is not None:
        backend.max_batch = spec.max_batch
    if spec.concurrency is not None:
        backend.concurrency = spec.concurrency
    backend.labels.update(spec.labels)
    return backend


def _chat_backend(spec: ModelSpec, cache_dir: str | Path | None) -> Backend:
    engine = spec.options.get("engine", "auto")
    if engine not in ENGINES:
        raise ValueError(f"model {spec.name}: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if spec.kind == "onnx-chat" and engine == "transformers":
        raise ValueError(f"model {spec.name}: {spec.path} is an ONNX build; only the onnx engine serves it")
    missing = _missing("onnxruntime", "tokenizers", "jinja2", "numpy")
    staged = "layers" in spec.options  # a pipeline stage runs on the onnx engine only
    gpu = cuda_gpu_name() if engine == "auto" and spec.kind != "onnx-chat" and not missing and not staged else None
    if not staged and (engine == "transformers" or (engine == "auto" and (missing or gpu))):
        if missing and engine == "auto":
            log.warning("model %s: transformers engine, because %s is not installed", spec.name, ", ".join(missing))
        elif gpu:
            # The onnx engine's continuous batching runs on CPUs; on a GPU transformers (torch CUDA) is faster.
            log.warning("model %s: transformers engine on the GPU (%s); the onnx engine runs on CPUs", spec.name, gpu)
        _require("torch", "transformers")
        if spec.kind == "gguf":
            _require("gguf", "accelerate")
        from .backends.transformers_chat import TransformersChat

        return TransformersChat(
            spec.name,
            resolve_path(spec),
            cache_dir=cache_dir,
            max_batch=spec.max_batch or 8,
            concurrency=spec.concurrency or 1,
            max_tokens_limit=spec.options.get("max_tokens"),
            context=spec.options.get("context"),
            device=spec.options.get("device"),
            threads=spec.options.get("threads"),
        )
    _require("onnxruntime", "tokenizers", "jinja2", "numpy")
    layers = stage_range(spec)
    if layers is not None:
        _require("onnx")
        from .backends.onnx_stage import DEFAULT_SLOTS as STAGE_SLOTS
        from .backends.onnx_stage import OnnxStage

        kv_mib = spec.options.get("kv_cache")
        return OnnxStage(
            spec.name,
            str(spec.options.get("model", spec.name)),
            resolve_path(spec),
            *layers,
            cache_dir=cache_dir,
            precision=spec.options.get("precision", DEFAULT_PRECISION),
            max_batch=spec.max_batch or STAGE_SLOTS,
            max_tokens_limit=spec.options.get("max_tokens"),
            context=spec.options.get("context"),
            threads=spec.options.get("threads"),
            kv_cache_bytes=int(kv_mib) << 20 if kv_mib else None,
        )
    if spec.options.get("layers") == "auto":
        raise ValueError(f"model {spec.name}: layers=auto is a stage the automatic plan gives; it is not loaded as is")
    from .backends.onnx_chat import DEFAULT_SLOTS, OnnxChat

    return OnnxChat(
        spec.name,
        resolve_path(spec),
        cache_dir=cache_dir,
        precision=spec.options.get("precision", DEFAULT_PRECISION),
        max_batch=spec.max_batch or DEFAULT_SLOTS,
        max_tokens_limit=spec.options.get("max_tokens"),
        context=spec.options.get("context"),
        threads=spec.options.get("threads"),
        kv_cache_bytes=kv_cache_bytes(spec, kv_shape(spec)),
        prefix_cache_bytes=spec.options["prefix_cache"] << 20 if "prefix_cache" in spec.options else None,
    )


def load_backend(spec: ModelSpec, cache_dir: str | Path | None = None, progress: ProgressFn | None = None) -> Backend:
    """Build and load the backend for a spec; a chat model onnxruntime-genai cannot build is served by transformers.

    That fallback happens only where the engine was left to choose (engine=auto), with one log line saying why.
    """
    from .backends.onnx_build import BuildError

    backend = build_backend(spec, cache_dir)
    try:
        backend.load(progress)
    except BuildError as exc:
        if spec.options.get("engine", "auto") != "auto" or spec.kind == "onnx-chat":
            raise
        log.warning("model %s: transformers engine, because onnxruntime-genai cannot build it: %s", spec.name, exc)
        backend = build_backend(replace(spec, options={**spec.options, "engine": "transformers"}), cache_dir)
        backend.load(progress)
    return backend


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _require(*modules: str) -> None:
    missing = _missing(*modules)
    if missing:
        raise ImportError(f"real models need {', '.join(missing)}: {MODELS_EXTRA_HINT}")
