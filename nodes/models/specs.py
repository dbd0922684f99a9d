"""What `--model SPEC` means: the `ModelSpec` a node serves, parsed from the command line or a config file, and the
default models a node serves when none are named.

Nothing here imports torch, transformers or onnxruntime: a light install serves `echo`/`sleep` and can still parse
specs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from protocol import name_problem

from .packaged import MINILM, SMOLLM2, minilm_folder, smollm2_gguf

KINDS = ("echo", "sleep", "transformers", "gguf", "onnx-chat", "onnx-embed")
ENGINES = ("auto", "onnx", "transformers")  # chat engines; auto: onnx, or transformers where it cannot build
TASKS = ("chat", "complete", "embed")
DEFAULT_PRECISION = "int4"  # of chat models built for onnxruntime; the quality test holds it to fp32


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


_INT_KEYS = {"max_batch", "concurrency", "cap", "max_tokens", "threads", "context", "kv_cache", "prefix_cache"}
_FLOAT_KEYS = {"ms"}
_STR_KEYS = {"name", "kind", "path", "task", "device", "engine", "precision", "layers"}
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


def split_model_specs(text: str) -> list[str]:
    """The model specs in one string (`LANMESH_MODELS`, a TOML string): separated by `;` or new lines, since a spec's
    own key=value pairs are separated by commas. Without `;` a comma list still works: short specs
    (`smollm2,minilm`) stand alone, and a key=value part joins the spec before it unless that spec is a short one or
    already has that key, so `name=x,path=/m.gguf` is one spec and `name=a,path=/a.gguf,name=b,path=/b.gguf` two."""
    if ";" in text or "\n" in text:
        return [part.strip() for part in text.replace("\n", ";").split(";") if part.strip()]
    specs: list[list[str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key = _keyed_part(part)
        current = specs[-1] if specs else None
        if key and current and _keyed_part(current[0]) and key not in {_keyed_part(p) for p in current}:
            current.append(part)
        else:
            specs.append([part])
    return [",".join(spec) for spec in specs]


def _keyed_part(part: str) -> str:
    """The key of a `key=value` part of a spec ("" for a short spec such as `echo` or `sleep:50:cap=4`)."""
    key, sep, _ = part.partition("=")
    return "" if not sep or part.startswith("sleep:") else _KEY_ALIASES.get(key.strip(), key.strip())


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
    given = values.pop("name", None)
    name = given or (_name_from_path(path) if path else kind)
    if kind == "sleep" and name == "sleep" and "ms" in values:
        name = f"sleep:{values['ms']:g}"
    problem = name_problem(name, "model name" if given else "model name (from its file name)")
    if problem is not None:  # names become folder names and lane names: checked once, here where they enter
        raise ValueError(f"{problem}; give the model a name with name=NAME in {text!r}")
    max_batch = values.pop("max_batch", None)
    concurrency = values.pop("concurrency", None)
    options = dict(values)
    if kind == "sleep":
        if "ms" not in options:
            raise ValueError(f"model spec {text!r}: kind sleep needs ms=MS")
        if "cap" in options:
            options["capacity"] = options.pop("cap")
        _check_sleep(options, text)
    if "kv_cache" in options and options["kv_cache"] < 1:
        raise ValueError(f"kv_cache is in MiB and must be at least 1, got {options['kv_cache']} in {text!r}")
    if "prefix_cache" in options and options["prefix_cache"] < 0:
        raise ValueError(f"prefix_cache is in MiB (0: none), got {options['prefix_cache']} in {text!r}")
    if "layers" in options:
        if kind not in ("gguf", "transformers", "onnx-chat") or task not in (None, "chat", "complete"):
            raise ValueError(f"model spec {text!r}: layers= splits a chat model; {kind} models are served whole")
        options["layers"] = parse_layers(options["layers"], text)
    if task is None:
        task = {"onnx-embed": "embed", "transformers": "chat", "gguf": "chat", "onnx-chat": "chat"}.get(kind)
    spec = ModelSpec(
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
    return with_layers(spec, options.pop("layers")) if "layers" in options else spec


def parse_layers(value: str, text: str = "") -> str:
    """`A-B` (layers A to B, from 0) or `auto`; ValueError otherwise."""
    if value == "auto":
        return value
    first, sep, last = value.partition("-")
    if not sep or not first.isdigit() or not last.isdigit() or int(first) > int(last):
        where = f" in {text!r}" if text else ""
        raise ValueError(f"layers must be A-B (e.g. 0-14, counted from 0) or auto, got {value!r}{where}")
    return f"{int(first)}-{int(last)}"


def with_layers(spec: ModelSpec, layers: str) -> ModelSpec:
    """A chat spec as one stage of its model (`layers` A-B: served as `name[A-B]`), or as a wish to hold a stage of
    it by the automatic plan (`auto`). Other models are returned as they are."""
    if not layers or spec.kind not in ("gguf", "transformers", "onnx-chat") or "layers" in spec.options:
        return spec
    layers = parse_layers(layers)
    if spec.options.get("engine") == "transformers":
        raise ValueError(f"model {spec.name}: only the onnx engine serves a range of layers (drop engine=transformers)")
    options = {**spec.options, "layers": layers, "model": spec.options.get("model", spec.name)}
    if layers == "auto":
        return replace(spec, options=options)
    first, _, last = layers.partition("-")
    return replace(spec, name=f"{options['model']}[{first}-{last}]", options=options)


def stage_range(spec: ModelSpec) -> tuple[int, int] | None:
    """The layers a stage spec holds (None: a whole model, or `auto`)."""
    layers = spec.options.get("layers", "")
    if not layers or layers == "auto":
        return None
    first, _, last = layers.partition("-")
    return int(first), int(last)


def spec_text(spec: ModelSpec) -> str:
    """A chat spec written back as `--model` text (what a node loads a stage by)."""
    parts = [f"name={spec.options.get('model', spec.name)}", f"path={resolve_path(spec)}", f"kind={spec.kind}"]
    for key in ("precision", "kv_cache", "context", "threads", "max_tokens", "layers"):
        if key in spec.options:
            parts.append(f"{key}={spec.options[key]}")
    if spec.max_batch:
        parts.append(f"max_batch={spec.max_batch}")
    return ",".join(parts)


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


def with_precision(spec: ModelSpec, precision: str) -> ModelSpec:
    """A chat spec with the node's default precision where the spec names none."""
    if spec.kind not in ("gguf", "transformers") or "precision" in spec.options:
        return spec
    return replace(spec, options={**spec.options, "precision": precision})


def with_prefix_cache(spec: ModelSpec, mib: int) -> ModelSpec:
    """A chat spec with the node's prefix cache (`--prefix-cache`, MiB of the key/value cache; 0: none) where the
    spec sets none (-1: the engine's default, half the key/value cache)."""
    if mib < 0 or spec.kind not in ("gguf", "transformers", "onnx-chat") or "prefix_cache" in spec.options:
        return spec
    return replace(spec, options={**spec.options, "prefix_cache": mib})


def with_kv_cache(spec: ModelSpec, mib: int) -> ModelSpec:
    """A chat spec with the node's key/value cache cap (`--kv-cache`, MiB) where the spec sets none (0: left to the
    node's memory budget)."""
    if not mib or spec.kind not in ("gguf", "transformers", "onnx-chat") or "kv_cache" in spec.options:
        return spec
    return replace(spec, options={**spec.options, "kv_cache": mib})
