"""A pipeline stage's runner: its session (a stage's graph, `onnx_stage_graph`) and its layers' key/value arrays,
held and bound as the chat engine's runner holds them (`onnx_runner.OnnxRunner`, whose arrays it reuses), and the
runs a stage plan names: a prompt chunk of one row, a decode batch of contiguous rows, row swaps. It decides nothing.
Also where a stage's files come from (`stage_folder`: the whole model built once, the stage cut from it, both cached)
and how its session opens (`open_stage`).

Input is token ids (the first stage) or the residual stream (`hidden_states`, [rows, tokens, hidden]); output is the
residual stream (`hidden_states_out`) or, at the last stage, the logits. The attention mask is built exactly as the
unsplit runner builds it, so a stage computes what the same layers compute in the whole model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cache import cache_entry, cache_ready, publish_cache
from .base import ProgressFn, page_out_file
from .onnx_build import build_in_child, build_key, built_entry, check_precision
from .onnx_runner import KVLayout, OnnxRunner
from .onnx_stage_graph import HIDDEN_IN, HIDDEN_OUT, cut_stage_in_child

if TYPE_CHECKING:
    import numpy as np


class StageRunner(OnnxRunner):
    """One stage's session and key/value arrays; used by the stage engine's thread only."""

    def __init__(
        self,
        session: Any,
        names: list[tuple[str, str, str, str]],
        layout: KVLayout,
        dtype: Any,
        vocab_size: int,
        positions: bool,
        hidden: int,
        first: bool,
        last: bool,
    ) -> None:
        super().__init__(session, names, layout, dtype, vocab_size, positions)
        self.hidden = hidden
        self.first = first
        self.last = last

    def swap(self, a: int, b: int, tokens: int) -> None:
        """Exchange the first `tokens` positions of two rows (a decode batch must be contiguous rows)."""
        for keys, values in self.arrays:
            for arr in (keys, values):
                held = arr[a, :, :tokens].copy()
                arr[a, :, :tokens] = arr[b, :, :tokens]
                arr[b, :, :tokens] = held

    def run(self, start: int, inputs: np.ndarray, cached: list[int]) -> np.ndarray:
        """Rows `start` .. `start + len(cached) - 1`: row i holds `cached[i]` positions and reads `inputs[i]` (token
        ids [tokens], or hidden states [tokens, hidden]) after them. Returns [rows, tokens, hidden] or the logits
        [rows, tokens, vocab] (the last stage)."""
        import numpy as np

        n, width = len(cached), inputs.shape[1]
        lengths = np.asarray(cached, dtype=np.int64)
        total = int(lengths.max()) + width
        mask = (np.arange(total)[None, :] < (lengths[:, None] + width)).astype(np.int64)
        binding = self._binding(start, n)
        if self.first:
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(inputs, dtype=np.int64))
        else:
            binding.bind_cpu_input(HIDDEN_IN, np.ascontiguousarray(inputs, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", mask)
        if self.positions:
            positions = lengths[:, None] + np.arange(width, dtype=np.int64)[None, :]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        if self.last:
            out = np.empty((n, width, self.vocab_size), dtype=np.float32 if self.dtype == np.float32 else np.float16)
            name = "logits"
        else:
            out = np.empty((n, width, self.hidden), dtype=np.float32)
            name = HIDDEN_OUT
        binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(binding)
        return out


@dataclass(frozen=True)
class StageFacts:
    """What a stage learns of its whole model when it opens."""

    layers: int  # of the whole model
    context: int
    vocab_size: int
    eos: frozenset[int]


def stage_folder(model: str, path: Path, first: int, last: int, precision: str, cache_dir: str | Path | None,
                 progress: ProgressFn | None) -> tuple[Path, Path]:  # fmt: skip
    """(the whole build, the stage's folder): the model built once by onnxruntime-genai's builder (in a child
    process, cached) unless `path` is a build already, and layers first..last cut from it (cached beside it)."""
    report: ProgressFn = progress or (lambda _stage, _fraction: None)
    if (path / "genai_config.json").exists():
        built = path
    else:
        check_precision(precision, "cpu")
        built = built_entry(model, path, precision, "cpu", cache_dir)
        if not cache_ready(built):
            report(f"{model}: building the {precision} ONNX model (first start only)", 0.0)
            built = build_in_child(model, path, precision, "cpu", cache_dir,
                                   lambda stage, fraction: report(f"{model}: {stage}", 0.8 * fraction))  # fmt: skip
    entry = cache_entry(f"{model}-stage-{first}-{last}", built, build_key(precision, "cpu"), cache_dir)
    if not cache_ready(entry):
        report(f"{model}[{first}-{last}]: cutting its layers out of the build", 0.85)
        publish_cache(entry, lambda tmp: cut_stage_in_child(built, first, last, tmp))
    report(f"{model}[{first}-{last}]: starting onnxruntime", 0.92)
    return built, entry


def open_stage(folder: Path, first: int, last: int, threads: int | None) -> tuple[StageRunner, StageFacts]:
    """The stage's session and its runner (arrays empty until the first step)."""
    import numpy as np
    import onnxruntime as ort

    config = json.loads((folder / "genai_config.json").read_text())
    model = config["model"]
    decoder = model["decoder"]
    layers = int(decoder["num_hidden_layers"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
    if threads:
        options.intra_op_num_threads = threads
    # A stage waits for the other stages between its runs: threads that spin after a run (onnxruntime's default)
    # would burn the cores the other stages need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No memory arena: an arena keeps the most a run ever took (about 10 MiB for SmolLM2 whatever the layers, once 8
    # streams have run) for good, a fixed cost that a few layers' stage felt as 12% more than its share; without it a
    # run's buffers go back when it ends (measured: the same tokens/s).
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    # onnxruntime maps the weights file and reads it to prepack the weights into copies of its own, but keeps the
    # mapping, and the pages it read stay resident: the quantization scales, which MatMulNBits copies into its packed
    # weights and never reads again (5.5 MiB of SmolLM2's layers 12-24, 16% of that stage's weights). They go; the
    # few pages a run does read (0.3 MiB) come back from the file.
    page_out_file(folder / "model.onnx.data")
    inputs = {i.name: i for i in session.get_inputs()}
    names = decoder.get("inputs", {})
    outputs = decoder.get("outputs", {})
    kv_names = [
        (names.get("past_key_names", "past_key_values.%d.key") % i,
         names.get("past_value_names", "past_key_values.%d.value") % i,
         outputs.get("present_key_names", "present.%d.key") % i,
         outputs.get("present_value_names", "present.%d.value") % i)
        for i in range(first, last + 1)
    ]  # fmt: skip
    dtype = np.float16 if "float16" in inputs[kv_names[0][0]].type else np.float32
    vocab = int(model["vocab_size"])
    layout = KVLayout(len(kv_names), int(decoder["num_key_value_heads"]), int(decoder["head_size"]),
                      np.dtype(dtype).itemsize)  # fmt: skip
    runner = StageRunner(session, kv_names, layout, dtype, vocab, "position_ids" in inputs,
                         int(decoder["hidden_size"]), first == 0, last == layers - 1)  # fmt: skip
    eos = model.get("eos_token_id")
    context = int(model.get("context_length") or config.get("search", {}).get("max_length") or 2048)
    return runner, StageFacts(
        layers, context, vocab, frozenset(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    )
