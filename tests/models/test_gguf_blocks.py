"""A GGUF's quantized blocks carried into onnxruntime's MatMulNBits: each format reads as gguf itself reads it, the
graph computes with the blocks exactly, and rows stored in llama.cpp's order come back in the model's."""

from __future__ import annotations

from typing import Any

import pytest
from model_jobs import requires

pytestmark = pytest.mark.models

ROWS, COLS = 48, 256  # 256: one Q4_K super-block per row


@pytest.fixture(scope="module")
def np() -> Any:
    requires("numpy", "gguf", "onnx", "onnxruntime")
    import numpy

    return numpy


def weight(np: Any, rows: int = ROWS, cols: int = COLS, seed: int = 7) -> Any:
    # An offset per row, as real weights have: a block's values are then often all of one sign (Q4_1's min > 0).
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 0.05, (rows, cols)) + rng.normal(0, 0.05, (rows, 1))).astype(np.float32)


def encoded(np: Any, kind: str) -> Any:
    """A [ROWS, COLS] tensor's bytes in `kind`, as a GGUF file holds them."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind != "Q4_K":  # gguf can write these
        return gguf.quants.quantize(weight(np), qtype)
    # gguf reads Q4_K but cannot write it: any bytes are a valid Q4_K block once d and dmin are finite.
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (ROWS, COLS // 256, 144), dtype=np.uint8)
    raw[..., 0:2] = np.full((ROWS, COLS // 256, 1), 0.002, np.float16).view(np.uint8)
    raw[..., 2:4] = np.full((ROWS, COLS // 256, 1), 0.003, np.float16).view(np.uint8)
    return raw.reshape(ROWS, -1)


def gguf_reads(np: Any, kind: str, raw: Any) -> Any:
    import gguf

    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).astype(np.float32)


def run_matmul(np: Any, blocks: Any, x: Any, accuracy_level: int) -> Any:
    """y = x @ W^T through the nodes the build puts in the graph, run by onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nodes.models.backends.gguf_blocks import matmul_nodes

    nodes, inits = matmul_nodes("mm", "x", "y", blocks, ("w", "s"), accuracy_level)
    graph = helper.make_graph(
        nodes, "carry", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_each_carried_format_reads_as_gguf_reads_it(np: Any, kind: str) -> None:
    from nodes.models.backends.gguf_blocks import decode

    raw = encoded(np, kind)
    blocks = decode(kind, raw, (ROWS, COLS))
    assert blocks.bits == (8 if kind == "Q8_0" else 4) and blocks.kind == kind
    reference = gguf_reads(np, kind, raw)
    assert np.abs(blocks.weights() - reference).max() <= 1e-6 * np.abs(reference).max()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "rounded"])
def test_the_graph_computes_with_the_blocks_exactly(np: Any, kind: str) -> None:
    from nodes.models.backends.gguf_blocks import decode, rounded

    blocks = rounded(weight(np)) if kind == "rounded" else decode(kind, encoded(np, kind), (ROWS, COLS))
    x = np.random.default_rng(11).normal(0, 1, (2, 3, COLS)).astype(np.float32)
    expected = x @ blocks.weights().T
    exact = run_matmul(np, blocks, x, accuracy_level=0)  # fp32 activations: only float rounding differs
    assert np.abs(exact - expected).max() <= 1e-4 * np.abs(expected).max()
    served = run_matmul(np, blocks, x, accuracy_level=4)  # int8 activations, as the chat engine runs it
    assert np.abs(served - expected).max() <= 2e-2 * np.abs(expected).max()


def test_rows_stored_in_llama_cpp_rotary_order_come_back_in_the_models_order(np: Any) -> None:
    import gguf

    from nodes.models.backends.gguf_blocks import matching

    heads, rows = 3, ROWS
    model_rows = weight(np, rows)
    # llama.cpp's convert script stores attn_q/attn_k rows per head as (i, i + half) pairs for its rotary layout.
    stored = model_rows.reshape(heads, 2, rows // heads // 2, COLS).swapaxes(1, 2).reshape(rows, COLS)
    raw = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
    read = gguf_reads(np, "Q8_0", raw)
    # what transformers hands the builder: the GGUF's values, rows back in the model's order
    given = read.reshape(heads, rows // heads // 2, 2, COLS).swapaxes(1, 2).reshape(rows, COLS)
    blocks = matching("Q8_0", raw, given, {heads, 9})
    assert blocks.kind == "Q8_0"
    assert np.array_equal(blocks.weights(), given)


def test_a_tensor_in_another_format_is_rounded_to_8_bits(np: Any) -> None:
    import gguf

    from nodes.models.backends.gguf_blocks import matching

    given = weight(np)
    raw = gguf.quants.quantize(given, gguf.GGMLQuantizationType.F16)
    blocks = matching("F16", raw, given, set())
    assert blocks.kind == "rounded" and blocks.bits == 8 and blocks.mins is None
    step = np.abs(given.reshape(ROWS, -1, 32)).max(axis=-1, keepdims=True) / 127
    assert (np.abs(blocks.weights() - given).reshape(ROWS, -1, 32) <= step / 2 + 1e-7).all()


def test_blocks_that_do_not_reproduce_the_weight_are_not_carried(np: Any) -> None:
    """A GGUF tensor in an order not known here is never copied blindly: the fp32 weight is rounded instead."""
    import gguf

    from nodes.models.backends.gguf_blocks import matching

    raw = gguf.quants.quantize(weight(np), gguf.GGMLQuantizationType.Q4_1)
    shuffled = gguf_reads(np, "Q4_1", raw)[::-1].copy()
    blocks = matching("Q4_1", raw, shuffled, {3})
    assert blocks.kind == "rounded"
