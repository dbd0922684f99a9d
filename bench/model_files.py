"""A real model with files, made on the spot without torch: an embedding lookup table as ONNX plus a word tokenizer.

Served by the onnx-embed backend like any exported encoder (mean pooling over the looked-up vectors), and big
enough (several 1 MiB transfer chunks) to exercise model transfers between nodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_lookup_embedder(folder: Path, megabytes: float = 4.0, seed: int = 7) -> Path:
    """Write model.onnx (a [vocab, 64] float32 table, about `megabytes` in all) and tokenizer.json into `folder`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    dim = 64
    vocab = max(16, int(megabytes * 1024 * 1024 / (dim * 4)))
    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(vocab - 2)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    table = np.random.default_rng(seed).standard_normal((vocab, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"], axis=0)],
        "lookup",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", dim])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "lanmesh-embed.json").write_text('{"max_length": 64}')
    return folder / "model.onnx"
