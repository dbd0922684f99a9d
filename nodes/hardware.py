"""What a node says about its machine in its labels: GPU or not, accelerator, memory, cores."""

from __future__ import annotations

import os
import sys

import psutil


def detect_labels(check_gpu: bool) -> dict[str, str]:
    """Labels every node gossips. `check_gpu` imports torch to ask CUDA (skipped for synthetic-only nodes,
    so they start fast without torch); when skipped, `gpu` is "false" unless torch is already loaded."""
    labels = {
        "gpu": "false",
        "accelerator": "cpu",
        "memory_gib": str(round(psutil.virtual_memory().total / 2**30)),
        "cores": str(os.cpu_count() or 1),
    }
    if check_gpu or "torch" in sys.modules:
        try:
            import torch
        except ImportError:
            return labels
        if torch.cuda.is_available():
            labels.update(gpu="true", accelerator="cuda", gpu_name=torch.cuda.get_device_name(0).replace(" ", "-"))
    return labels


def unmet(requires: dict[str, str], labels: dict[str, str]) -> dict[str, str]:
    """The requirements `labels` do not satisfy, as {key: wanted}."""
    return {k: v for k, v in requires.items() if labels.get(k) != v}
