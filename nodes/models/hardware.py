"""What a node says about its machine in its labels: GPU or not, accelerator, memory, cores."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import psutil


def detect_labels(check_gpu: bool) -> dict[str, str]:
    """Labels every node gossips. `check_gpu` asks the NVIDIA driver whether a CUDA GPU is there (skipped for
    synthetic-only nodes, so they start fast); when skipped, `gpu` is "false" unless torch is already loaded."""
    labels = {
        "gpu": "false",
        "accelerator": "cpu",
        "memory_gib": str(round(psutil.virtual_memory().total / 2**30)),
        "cores": str(os.cpu_count() or 1),
    }
    name = cuda_gpu_name() if check_gpu or "torch" in sys.modules else None
    if name is not None:
        labels.update(gpu="true", accelerator="cuda", gpu_name=name.replace(" ", "-"))
    return labels


def cuda_gpu_name() -> str | None:
    """The first CUDA GPU's name, or None. Asks torch when it is already loaded, else the driver's nvidia-smi:
    importing torch only to ask would cost a node ~300 MB of memory it never uses (the onnx engine has no torch).
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    return names[0] if names else None


def unmet(requires: dict[str, str], labels: dict[str, str]) -> dict[str, str]:
    """The requirements `labels` do not satisfy, as {key: wanted}."""
    return {k: v for k, v in requires.items() if labels.get(k) != v}
