"""What every benchmark result records: the machine, versions, repetitions; and where results are written."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    versions = {}
    for pkg in ("lanmesh", "pyzmq", "msgpack", "zeroconf", "torch", "transformers", "onnxruntime"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "versions": versions,
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; values need not be sorted."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write(scenario: str, result: dict[str, Any]) -> Path:
    """Write `<scenario>.json` (latest) and a timestamped copy under bench/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **result,
    }
    text = json.dumps(result, indent=2, sort_keys=False)
    latest = RESULTS / f"{scenario}.json"
    latest.write_text(text + "\n")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (RESULTS / "history").mkdir(exist_ok=True)
    (RESULTS / "history" / f"{scenario}-{stamp}.json").write_text(text + "\n")
    return latest


def progress(done: int, total: int, what: str) -> None:
    """A one-line progress bar on stderr."""
    frac = done / total if total else 1.0
    sys.stderr.write(f"\r{what[:40]:<40} [{'#' * int(frac * 30):<30}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
