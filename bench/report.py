"""What every benchmark result records: the machine, versions, repetitions; and where results are written."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = os.getloadavg()[0]  # this process starts with its scenario: the load before the run added any
RESULTS_ENV = "LANMESH_BENCH_RESULTS"  # another folder for results (CI's smoke test must not overwrite ours)


def results_dir() -> Path:
    """Where results go: $LANMESH_BENCH_RESULTS, else bench/results/."""
    return Path(os.environ.get(RESULTS_ENV) or RESULTS)


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in ("lanmesh", "pyzmq", "msgpack", "zeroconf", "torch", "transformers", "onnxruntime", "ray"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0],
        "load_avg_1m_at_start": _LOAD_AT_START,
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


def write(scenario: str, result: dict[str, Any], plot: Callable[[dict[str, Any], Path], None] | None = None) -> Path:
    """Write `<scenario>.json` (latest), a timestamped copy under history/, and `plot(result, <scenario>.png)`."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    result = {
        "scenario": scenario,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **result,
    }
    text = json.dumps(result, indent=2, sort_keys=False)
    latest = folder / f"{scenario}.json"
    latest.write_text(text + "\n")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (folder / "history").mkdir(exist_ok=True)
    (folder / "history" / f"{scenario}-{stamp}.json").write_text(text + "\n")
    if plot is not None:
        plot(result, folder / f"{scenario}.png")
    return latest


def progress(done: int, total: int, what: str) -> None:
    """A one-line progress bar on stderr."""
    frac = done / total if total else 1.0
    sys.stderr.write(f"\r{what[:40]:<40} [{'#' * int(frac * 30):<30}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
