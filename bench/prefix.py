"""`prefix`: conversations on 3 nodes of SmolLM2, under cache-aware routing and under p2c, with and without the
engines' prefix cache, with the same seeded conversations.

Every conversation shares a ~300-token system prompt and runs 8 turns (bench/conversations.py: open loop, Poisson
starts, seeded think times, each turn entering at a random node). Three runs, each on a fresh 3-node mesh:
(a) cache-aware routing, prefix cache on (the defaults); (b) p2c, prefix cache on; (c) p2c, prefix cache off.
Reported: the share of prompt tokens the engines reused (from each answer's usage.cached_tokens), time to first token
per turn (p50/p99), completion tokens per second over the run, request latency, how the requests spread over the
nodes, and under (a) how well the gossiped summaries predicted the engines' real reuse.

Sized for a 2-core machine: each node's model runs on one onnxruntime thread and is not pinned (three nodes cannot
share two cores evenly by pinning), so the three nodes share the machine's cores as the OS schedules them.
"""

from __future__ import annotations

import os
import re
from typing import Any

from nodes.models.packaged import smollm2_gguf

from .conversations import SYSTEM_PROMPT
from .models import missing_models
from .plots import plot_prefix
from .report import median, percentile, write
from .testbed import Testbed

NODES = 3
CONFIGS = {
    "a": ("cache-aware routing, prefix cache on", ["--routing", "cache-aware"]),
    "b": ("p2c, prefix cache on", ["--routing", "p2c"]),
    "c": ("p2c, prefix cache off", ["--routing", "p2c", "--prefix-cache", "0"]),
}
GOALS = {
    "hit_rate_after_turn_1": 0.85,  # (a): prompt tokens reused, turns 2..8
    "ttft_last_over_no_cache": 0.25,  # (a) turn 8 p50 / (c) turn 8 p50
    "ttft_last_over_first": 1.5,  # (a) turn 8 p50 / (a) turn 1 p50
    "p99_over_p2c_cache": 1.2,  # (a) p99 latency / (b)
    "max_share_over_fair": 1.5,  # (a) the busiest node's requests / a third
}
_PREFIX_ROUTE = re.compile(r"prefix:([^(]+)\((\d+) msgs\)")


def run(
    quick: bool = False, mode: str = "auto", conversations: int | None = None, seed: int = 1, order: str = "abc"
) -> dict[str, Any]:
    missing = missing_models()
    if missing:
        raise RuntimeError(f"prefix needs the default chat model: {missing}")
    n = conversations or (3 if quick else 12)
    turns = 3 if quick else 8
    spec = f"name=smollm2,path={smollm2_gguf()},threads=1"
    cache = os.environ.get("LANMESH_CACHE_DIR")
    runs: dict[str, dict[str, Any]] = {}
    where: dict[str, Any] = {}
    if sorted(order) != sorted(CONFIGS):
        raise ValueError(f"order must name each of {''.join(CONFIGS)} once, got {order!r}")
    for key in order:
        label, flags = CONFIGS[key]
        print(f"prefix ({key}) {label}: {n} conversations of {turns} turns on {NODES} nodes")
        with Testbed(NODES, mode) as bed:
            if cache:
                bed.env["LANMESH_CACHE_DIR"] = cache
            for i in range(1, NODES + 1):
                bed.start_node(i, ["--model", spec, "--grace", "5", *flags])
            bed.converge(timeout=600)
            args = ["--nodes", ",".join(bed.addresses()), "--names", ",".join(bed.nodes), "--conversations", str(n),
                    "--turns", str(turns), "--seed", str(seed), "--rate", "0.2", "--think", "4"]  # fmt: skip
            # Warm-up: one short chat per node (its own text, no system prompt: nothing the run reuses).
            warm_up = f"--conversations 3 --turns 1 --seed {seed + 1000} --rate 100 --think 0 --max-tokens 4".split()
            warm_up += ["--nodes", ",".join(bed.addresses()), "--system", ""]
            bed.run_client([*_python(), "-m", "bench.conversations", *warm_up], timeout=600)
            summary = bed.run_client([*_python(), "-m", "bench.conversations", *args], timeout=3600)
            runs[key] = {"label": label, "flags": flags, **analyse(summary, turns)}
            where = bed.describe()
            _print(key, runs[key])
    result = {
        "quick": quick,
        "repetitions": 1,
        "testbed": where,
        "nodes": NODES,
        "workload": {
            "conversations": n,
            "turns": turns,
            "system_prompt_chars": len(SYSTEM_PROMPT),
            "starts": "Poisson, 0.2 conversations/s",
            "think_s": "exponential, mean 4",
            "max_tokens": 32,
            "sampling": "greedy (temperature 0): the same prompts and answers in every run",
            "entry": "a random node per turn (seeded)",
            "seed": seed,
            "model": "smollm2, one onnxruntime thread per node, not pinned; prefix cache: half the 1024 MiB kv cache",
        },
        "goals": GOALS,
        "order": order,
        "runs": {key: runs[key] for key in CONFIGS},
        "summary": _summary(runs, turns),
    }
    path = write("prefix", result, plot=plot_prefix)
    print(f"written to {path}")
    return result


def _python() -> list[str]:
    import sys

    return [sys.executable]


def analyse(summary: dict[str, Any], turns: int) -> dict[str, Any]:
    rows = summary["rows"]
    ok = [r for r in rows if r["ok"]]
    later = [r for r in ok if r["turn"] > 1]
    per_turn = {}
    for t in range(1, turns + 1):
        ttft = [r["ttft"] for r in ok if r["turn"] == t]
        hit = [r for r in ok if r["turn"] == t]
        per_turn[str(t)] = {
            "requests": len(ttft),
            "ttft_p50_ms": median(ttft) * 1000 if ttft else None,
            "ttft_p99_ms": percentile(ttft, 99) * 1000 if ttft else None,
            "prompt_tokens": median([r["prompt_tokens"] for r in hit]) if hit else None,
            "hit_rate": _hit_rate(hit),
        }
    served: dict[str, int] = {}
    for r in ok:
        served[r["node"]] = served.get(r["node"], 0) + 1
    fair = len(ok) / NODES if ok else 0
    start = min((r["sent"] for r in ok), default=0.0)
    end = max((r["sent"] + r["latency"] for r in ok), default=0.0)
    latency = [r["latency"] for r in ok]
    return {
        "requests": len(rows),
        "failed": len(rows) - len(ok),
        "errors": sorted({r["error"] for r in rows if r["error"]})[:5],
        "hit_rate_turn_1": _hit_rate([r for r in ok if r["turn"] == 1]),
        "hit_rate_after_turn_1": _hit_rate(later),
        "per_turn": per_turn,
        "tok_per_s": sum(r["completion_tokens"] for r in ok) / (end - start) if end > start else None,
        "makespan_s": end - start,
        "latency_p50_ms": median(latency) * 1000 if latency else None,
        "latency_p99_ms": percentile(latency, 99) * 1000 if latency else None,
        "served": dict(sorted(served.items())),
        "max_share_over_fair": max(served.values()) / fair if fair else None,
        "routes": _routes(ok),
        "prediction": _prediction(ok),
        "engines": {name: _engine(st) for name, st in (summary.get("status") or {}).items()},
        "rows": rows,
    }


def _hit_rate(rows: list[dict[str, Any]]) -> float | None:
    prompt = sum(r["prompt_tokens"] for r in rows)
    return sum(r["cached_tokens"] for r in rows) / prompt if prompt else None


def _routes(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        route = r["route"]
        kind = "prefix" if route.startswith("prefix:") else "prefix-busy" if "busy)" in route else route.split(":")[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def _prediction(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How well the gossiped summaries predicted the engines' reuse beyond the shared system prompt.

    Predicted: the route says the node holds at least 2 messages (more than the system prompt). Real: the engine
    reused more tokens than any first turn did (a first turn can reuse only the system prompt)."""
    shared = max((r["cached_tokens"] for r in rows if r["turn"] == 1), default=0)
    predicted = [r for r in rows if (m := _PREFIX_ROUTE.search(r["route"])) and int(m.group(2)) >= 2]
    real = [r for r in rows if r["cached_tokens"] > shared]
    hit_when_predicted = [r for r in predicted if r["cached_tokens"] > shared]
    return {
        "system_prompt_tokens_reused": shared,
        "predicted": len(predicted),
        "engine_reused_beyond_system_prompt": len(real),
        "precision": len(hit_when_predicted) / len(predicted) if predicted else None,
        "recall": len(hit_when_predicted) / len(real) if real else None,
        "tokens_reused_when_predicted": _hit_rate(predicted),
    }


def _engine(status: dict[str, Any] | None) -> dict[str, Any]:
    if not status:
        return {}
    stats = (status.get("executor") or {}).get("smollm2", {})
    mesh = status.get("stats") or {}
    return {
        **{k: v for k, v in stats.items() if k.startswith("prefix_")},
        "routed_prefix": mesh.get("routed_prefix", 0),
        "routed_prefix_busy": mesh.get("routed_prefix_busy", 0),
    }


def _summary(runs: dict[str, dict[str, Any]], turns: int) -> dict[str, Any]:
    a, b, c = runs["a"], runs["b"], runs["c"]
    last, first = str(turns), "1"

    def ttft(run: dict[str, Any], turn: str) -> float | None:
        value = run["per_turn"][turn]["ttft_p50_ms"]
        return float(value) if value is not None else None

    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x is not None and y else None

    return {
        "hit_rate_after_turn_1": {k: r["hit_rate_after_turn_1"] for k, r in runs.items()},
        "ttft_last_p50_ms": {k: ttft(r, last) for k, r in runs.items()},
        "ttft_first_p50_ms": {k: ttft(r, first) for k, r in runs.items()},
        "ttft_last_over_no_cache": ratio(ttft(a, last), ttft(c, last)),
        "ttft_last_over_first": ratio(ttft(a, last), ttft(a, first)),
        "tok_per_s": {k: r["tok_per_s"] for k, r in runs.items()},
        "latency_p99_ms": {k: r["latency_p99_ms"] for k, r in runs.items()},
        "p99_over_p2c_cache": ratio(a["latency_p99_ms"], b["latency_p99_ms"]),
        "max_share_over_fair": {k: r["max_share_over_fair"] for k, r in runs.items()},
        "failed": {k: r["failed"] for k, r in runs.items()},
        "prediction": a["prediction"],
        "met": {
            "hit_rate": (a["hit_rate_after_turn_1"] or 0) >= GOALS["hit_rate_after_turn_1"],
            "ttft_vs_no_cache": (ratio(ttft(a, last), ttft(c, last)) or 99) <= GOALS["ttft_last_over_no_cache"],
            "ttft_vs_turn_1": (ratio(ttft(a, last), ttft(a, first)) or 99) <= GOALS["ttft_last_over_first"],
            "throughput": (a["tok_per_s"] or 0) >= max(b["tok_per_s"] or 0, c["tok_per_s"] or 0),
            "p99": (ratio(a["latency_p99_ms"], b["latency_p99_ms"]) or 99) <= GOALS["p99_over_p2c_cache"],
            "spread": (a["max_share_over_fair"] or 99) <= GOALS["max_share_over_fair"],
        },
    }


def _print(key: str, r: dict[str, Any]) -> None:
    def f(v: Any, fmt: str = ".0f") -> str:
        return "-" if v is None else format(v, fmt)

    print(f"  ({key}) {r['requests'] - r['failed']} of {r['requests']} turns answered; reused "
          f"{f(r['hit_rate_after_turn_1'], '.1%')} of the prompt tokens after turn 1 (turn 1: "
          f"{f(r['hit_rate_turn_1'], '.1%')}); {f(r['tok_per_s'], '.1f')} tok/s; p99 latency "
          f"{f(r['latency_p99_ms'])} ms; served {r['served']}; routes {r['routes']}")  # fmt: skip
    print("      TTFT p50 per turn (ms): " + ", ".join(f(t["ttft_p50_ms"]) for t in r["per_turn"].values()))
