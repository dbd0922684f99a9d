"""What runs a range of a model's layers fastest here: the stage's ONNX graph cut from the build (what a stage node
serves) or the same layers in torch (the transformers model the build came from). One process, one thread, a decode
step with `--past` tokens cached, batch 1 and 4; medians of `--reps` steps. `bench split` runs it pinned to one core.

    python -m bench.stage_engines BUILT_FOLDER --first 0 --last 14
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _median_ms(step: Any, reps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def onnx_step_ms(stage: Path, first: int, last: int, batch: int, past: int, reps: int) -> float:
    import numpy as np
    import onnxruntime as ort

    from nodes.models.backends.onnx_stage_graph import HIDDEN_IN

    config = json.loads((stage / "genai_config.json").read_text())["model"]["decoder"]
    heads, size, hidden = int(config["num_key_value_heads"]), int(config["head_size"]), int(config["hidden_size"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(stage / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds: dict[str, Any] = {"attention_mask": np.ones((batch, past + 1), np.int64)}
    if first == 0:
        feeds["input_ids"] = np.full((batch, 1), 5, np.int64)
    else:
        feeds[HIDDEN_IN] = rng.standard_normal((batch, 1, hidden)).astype(np.float32)
    for i in range(first, last + 1):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((batch, heads, past, size)).astype(np.float32)
    out = [session.get_outputs()[0].name]
    return _median_ms(lambda: session.run(out, feeds), reps)


def torch_step_ms(hf: Path, first: int, last: int, batch: int, past: int, reps: int, dtype: str) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    torch.set_num_threads(1)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=kind).eval()
    body = model.model
    with torch.inference_mode():
        cache = DynamicCache()
        model(torch.randint(10, 1000, (batch, past)), past_key_values=cache, use_cache=True)
        hidden = torch.randn(batch, 1, body.config.hidden_size, dtype=kind)
        positions = torch.full((batch, 1), past)
        rotary = body.rotary_emb(hidden, positions)

        def step() -> None:
            x = hidden
            for i in range(first, last + 1):
                out = body.layers[i](
                    x,
                    attention_mask=None,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                    cache_position=torch.tensor([past]),
                    position_embeddings=rotary,
                )
                x = out[0] if isinstance(out, tuple) else out
            if last == body.config.num_hidden_layers - 1:
                model.lm_head(body.norm(x))

        return _median_ms(step, reps)


def measure(built: Path, hf: Path | None, first: int, last: int, past: int, reps: int) -> dict[str, Any]:
    from nodes.models.backends.onnx_stage_runner import stage_folder

    _, stage = stage_folder("smollm2", built, first, last, "int4", None, None)
    out: dict[str, Any] = {"layers": f"{first}-{last}", "past_tokens": past, "threads": 1, "ms_per_step": {}}
    for batch in (1, 4):
        row = {"onnx stage graph (the build's int4)": onnx_step_ms(stage, first, last, batch, past, reps)}
        if hf is not None:
            for dtype in ("fp32", "bf16"):
                row[f"torch {dtype} (transformers layers)"] = torch_step_ms(hf, first, last, batch, past, reps, dtype)
        out["ms_per_step"][f"batch {batch}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stage_engines", description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("built", help="the onnxruntime-genai build of the model")
    p.add_argument("--hf", help="the HF folder it was built from (torch's side; omitted: ONNX only)")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--last", type=int, default=14)
    p.add_argument("--past", type=int, default=200)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    result = measure(Path(args.built), Path(args.hf) if args.hf else None, args.first, args.last, args.past, args.reps)
    sys.stdout.write(json.dumps({"event": "summary", **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
