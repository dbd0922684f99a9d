"""What a user would run instead of lanmesh on one machine, measured in the same run as lanmesh.

- chat: onnxruntime-genai's own `Generator` on the very model lanmesh built and on its model builder's default
  int4 build of the same source (what a user of onnxruntime-genai gets), and llama.cpp (llama-cpp-python) on
  the packaged GGUF when it is installed (extra `anchors`);
- embeddings: onnxruntime on the very ONNX file lanmesh exported, batches of 32, pooled like lanmesh;
- quality: perplexity of each engine's model on two passages (`quality.py`).

Every anchor runs with the threads our engine uses (`engine_threads()`): onnxruntime-genai's builder writes no
thread count into its config and then uses one core per session here, which made it look slower than it is.
llama.cpp's prompt cache is emptied before each timed run: the warm-up would otherwise have read the first
prompt already, and its first token came back without reading it.

Each anchor runs in a process of its own (`python -m bench.anchors ...`), after lanmesh's node has stopped,
so nothing else competes for the cores and each has its memory to itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .procs import ROOT


def engine_threads() -> int:
    """The threads our chat engine runs its session with when not told (nodes/models/backends/onnx_chat.py): one
    per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_default_int4(hf_folder: Path, out: Path) -> dict[str, Any]:
    """onnxruntime-genai's model builder at int4 with nothing but its defaults, from the HF folder our build read:
    what a user of onnxruntime-genai would run. {"built": folder} or {"skipped": why}."""
    with tempfile.TemporaryDirectory(prefix="lanmesh-anchor-build-") as scratch:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out)]
        cmd += ["-p", "int4", "-e", "cpu", "-c", scratch]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not (out / "genai_config.json").exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        return {"skipped": f"the model builder failed: {' | '.join(tail)}"}
    return {"built": str(out)}


def run_anchor(kind: str, *args: str, texts: list[str], timeout: float = 900) -> dict[str, Any]:
    """Run one anchor in a child process on `texts` (handed over in a file: thousands of sentences do not fit on a
    command line); its figures, or {"skipped": why}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="lanmesh-anchor-") as f:
        json.dump(texts, f)
        f.flush()
        cmd = [sys.executable, "-m", "bench.anchors", kind, *args, "--texts", f"@{f.name}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"skipped": f"{kind} failed: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------- the children


def _chat_prompts(template: Any, prompts: list[str]) -> list[str]:
    return [template.render([{"role": "user", "content": p}]) for p in prompts]


def ortgenai(model_dir: str, prompts: list[str], max_tokens: int, reps: int, threads: int) -> dict[str, Any]:
    """onnxruntime-genai's Generator, greedy: one stream, and a batch of len(prompts) (its static batching)."""
    import numpy as np
    import onnxruntime_genai as og

    from nodes.models.backends.chat_template import ChatTemplate, find_template, special_tokens

    folder = Path(model_dir)
    template = ChatTemplate(find_template(folder) or "", special_tokens(folder))
    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    texts = _chat_prompts(template, prompts)

    def generate(batch: list[str]) -> tuple[float, float, int]:
        params = og.GeneratorParams(model)
        longest = max(len(tokenizer.encode(t)) for t in batch)
        params.set_search_options(max_length=longest + max_tokens, do_sample=False, batch_size=len(batch))
        generator = og.Generator(model, params)
        t0 = time.monotonic()
        if len(batch) == 1:
            generator.append_tokens(tokenizer.encode(batch[0]))
        else:
            generator.append_tokens(tokenizer.encode_batch(batch))
        first = 0.0
        tokens = 0
        for step in range(max_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
            tokens += len(batch)
            if step == 0:
                first = time.monotonic() - t0
        return time.monotonic() - t0, first, tokens

    generate(texts[:1])  # warm-up
    single = [generate([texts[r % len(texts)]]) for r in range(reps)]
    batch = [generate(texts) for _ in range(reps)]
    del np
    return {
        "engine": f"onnxruntime-genai {og.__version__} Generator (greedy), {threads} threads",
        "threads": threads,
        "single_tok_per_s": _median([t / w for w, _, t in single]),
        "single_ttft_ms": _median([f * 1000 for _, f, _ in single]),
        "batch": len(texts),
        "batch_tok_per_s": _median([t / w for w, _, t in batch]),
    }


def llama_cpp(gguf: str, prompts: list[str], max_tokens: int, reps: int, threads: int) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python on the packaged GGUF, greedy, one stream (it serves one at a time)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": LLAMA_CPP_MISSING}
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def one(prompt: str) -> tuple[float, float, int]:
        llm.reset()  # an empty prompt cache: every timed run reads its whole prompt, as a new conversation does
        t0 = time.monotonic()
        first = 0.0
        out = llm.create_chat_completion(
            [{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True
        )
        tokens = 0
        for chunk in out:
            delta: Any = chunk["choices"][0]["delta"]  # type: ignore[index]
            if delta.get("content"):
                tokens += 1  # llama-cpp-python streams one token per chunk
                first = first or time.monotonic() - t0
        return time.monotonic() - t0, first, tokens

    one(prompts[0])  # warm-up
    runs = [one(prompts[r % len(prompts)]) for r in range(reps)]
    return {
        "engine": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {Path(gguf).name}, {threads} threads",
        "threads": threads,
        "single_tok_per_s": _median([t / w for w, _, t in runs]),
        "single_ttft_ms": _median([f * 1000 for _, f, _ in runs]),
    }


def onnx_embed(model_dir: str, sentences: list[str], batch: int, reps: int, threads: int) -> dict[str, Any]:
    """onnxruntime on lanmesh's exported MiniLM: tokenize, run, mean-pool, normalise; one batch at a time."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder = Path(model_dir)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(256)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def embed(texts: list[str]) -> None:
        enc = tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
        }
        hidden = session.run(None, {n: feed[n] for n in names})[0]
        mask = feed["attention_mask"][..., None]
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1)
        _ = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)

    embed(sentences[:batch])  # warm-up
    rates = []
    for _ in range(reps):
        t0 = time.monotonic()
        for start in range(0, len(sentences), batch):
            embed(sentences[start : start + batch])
        rates.append(len(sentences) / (time.monotonic() - t0))
    engine = f"onnxruntime {ort.__version__}, batches of {batch}, {threads} threads"
    return {"engine": engine, "threads": threads, "sentences_per_s": _median(rates)}


def step_profile(model_dir: str, threads: int, past: int = 128, steps: int = 50) -> dict[str, Any]:
    """Where one decode step of a built model goes: onnxruntime's own profile of `steps` steps at batch 1 and 8,
    `past` tokens already in the cache; the median step and each operator type's share of the kernels' time."""
    import numpy as np
    import onnxruntime as ort

    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    layers, heads, size = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]
    result: dict[str, Any] = {"threads": threads, "past_tokens": past}
    for batch in (1, 8):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "lanmesh-step-profile")
        session = ort.InferenceSession(str(Path(model_dir) / decoder["filename"]), options)
        feed = {"input_ids": np.ones((batch, 1), np.int64), "attention_mask": np.ones((batch, past + 1), np.int64)}
        for i in range(layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = np.zeros((batch, heads, past, size), np.float32)
        if "position_ids" in {i.name for i in session.get_inputs()}:
            feed["position_ids"] = np.full((batch, 1), past, np.int64)
        for _ in range(steps):
            session.run(["logits"], feed)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        runs = [e["dur"] for e in events if e.get("name") == "model_run"][5:]  # the first runs warm up
        ops: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                ops[e["args"]["op_name"]] = ops.get(e["args"]["op_name"], 0.0) + e["dur"]
        total = sum(ops.values())
        result[f"batch_{batch}"] = {
            "step_ms_median": _median(runs) / 1000,
            "kernels_per_step": sum(1 for e in events if e.get("cat") == "Node" and "kernel_time" in e["name"])
            // max(1, len(runs) + 5),
            "share": {op: t / total for op, t in sorted(ops.items(), key=lambda kv: -kv[1]) if t / total >= 0.005},
        }
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


LLAMA_CPP_MISSING = "llama-cpp-python is not installed (pip install -e '.[anchors]'; it builds llama.cpp)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anchors", description=__doc__)
    kinds = ["ortgenai", "llama-cpp", "onnx-embed", "perplexity", "llama-cpp-perplexity", "step-profile"]
    parser.add_argument("kind", choices=kinds)
    parser.add_argument("path", help="built model folder (ortgenai, onnx-embed, perplexity) or GGUF file (llama-cpp)")
    parser.add_argument("--texts", default="[]", help="JSON list of prompts or sentences, or @FILE holding one")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=engine_threads())
    parser.add_argument("--tokenizer", default="", help="llama-cpp-perplexity: a folder with the tokenizer.json")
    args = parser.parse_args(argv)
    texts = json.loads(Path(args.texts[1:]).read_text() if args.texts.startswith("@") else args.texts)
    if args.kind == "ortgenai":
        result = ortgenai(args.path, texts, args.max_tokens, args.reps, args.threads)
    elif args.kind == "llama-cpp":
        result = llama_cpp(args.path, texts, args.max_tokens, args.reps, args.threads)
    elif args.kind == "onnx-embed":
        result = onnx_embed(args.path, texts, args.batch, args.reps, args.threads)
    elif args.kind == "perplexity":
        from .quality import onnx_perplexity

        result = onnx_perplexity(args.path, args.threads)
    elif args.kind == "step-profile":
        result = step_profile(args.path, args.threads)
    elif importlib.util.find_spec("llama_cpp") is None:
        result = {"skipped": LLAMA_CPP_MISSING}
    else:
        from .quality import llama_cpp_perplexity

        result = llama_cpp_perplexity(args.path, args.tokenizer, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
