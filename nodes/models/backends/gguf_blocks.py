"""A GGUF's own quantized blocks, carried into the ONNX graph the model builder made, instead of quantizing twice.

The builder builds from the fp32 weights de-quantized from the GGUF; re-quantizing those to int4 loses quality
that llama.cpp, reading the GGUF's blocks, keeps (SmolLM2's Q4_1: perplexity 1.12-1.17x of fp32, llama.cpp
1.00-1.01x). So after the builder has made its int4 graph, every `MatMulNBits` gets the GGUF's blocks:

- Q4_0 (w = d * (q - 8)) is MatMulNBits' 4-bit format with its default zero point, bit for bit.
- Q4_1 and Q4_K (w = d * q + m, per block of 32) are 4 bits with a min. MatMulNBits takes only integer zero
  points on a CPU (a float one makes it de-quantize every weight at every step, ~10x slower), so the graph
  keeps w = d * (q - 8) and adds the min as one small product: (sums of x over each block) @ (m + 8 d).
- Q8_0 (w = d * q) is MatMulNBits' 8-bit format (zero point 128), bit for bit.
- Any other type (F16, Q5_x, Q6_K, ...) is rounded to 8 bits per block of 32: within 1/254 of each block's
  range, far inside what the source's own format lost.

The GGUF's rows may be stored in another order than the model's (llama.cpp permutes attn_q/attn_k for its
rotary layout; transformers undoes it when reading). Each tensor's order is found by comparing it with the fp32
weights the builder built from, so a tensor is only ever carried over when it reproduces them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 32  # MatMulNBits' block size here, and the GGUF's for every format carried over
CARRIED = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")  # formats copied exactly; any other is rounded to 8 bits
# The builder's module names (in its initializer names) -> the HF weights each one holds, in row order.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_HF_PARENT = {"attn": "self_attn", "mlp": "mlp"}


class CarryError(RuntimeError):
    """The GGUF's blocks cannot be put into this graph (an unknown architecture or a graph the builder changed)."""


@dataclass
class Blocks:
    """One weight [N, K] as MatMulNBits reads it: w = scales * values (+ mins), one scale per block of 32."""

    values: np.ndarray  # int8 [N, K/32, 32]; -8..7 for a 4-bit weight
    scales: np.ndarray  # float32 [N, K/32]
    mins: np.ndarray | None  # float32 [N, K/32], added to every weight of its block; None when there is none
    bits: int  # 4 or 8
    kind: str  # the GGUF type carried over, or "rounded" (to 8 bits, from the de-quantized weights)

    def weights(self) -> np.ndarray:
        w = self.values.astype(np.float32) * self.scales[..., None]
        if self.mins is not None:
            w += self.mins[..., None]
        return w.reshape(w.shape[0], -1)

    def rows(self, order: np.ndarray) -> Blocks:
        mins = None if self.mins is None else self.mins[order]
        return Blocks(self.values[order], self.scales[order], mins, self.bits, self.kind)

    def widened(self) -> Blocks:
        """The same weights as 8-bit blocks (4-bit values fit in 8 bits unchanged)."""
        return Blocks(self.values, self.scales, self.mins, 8, self.kind)


def carriable(gguf_path: Path) -> Counter[str]:
    """How many of the GGUF's 2-D weights are in each format that can be carried over (empty: none can)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    kinds = (t.tensor_type.name for t in reader.tensors if len(t.shape) == 2)
    return Counter(k for k in kinds if k in CARRIED)


def carry_blocks(model_dir: Path, gguf_path: Path, hf_dir: Path) -> dict[str, int]:
    """Rewrite `model_dir`/model.onnx (the builder's int4 graph) with the GGUF's blocks; how many tensors of each
    format went in. Raises CarryError when the graph or the GGUF is not what this knows how to join."""
    import gguf
    import onnx
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(gguf_path))
    source = {t.name: t for t in reader.tensors}
    arch_name = str(_field(reader, "general.architecture"))
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise CarryError(f"GGUF architecture {arch_name!r} is unknown to the gguf package")
    names = gguf.get_tensor_name_map(arch, int(_field(reader, f"{arch_name}.block_count")))
    heads = {int(_field(reader, f"{arch_name}.attention.{key}", 0)) for key in ("head_count", "head_count_kv")}
    handles = [safe_open(str(f), framework="numpy") for f in sorted(hf_dir.glob("*.safetensors"))]
    hf_index = {key: h for h in handles for key in h.keys()}

    def blocks_of(hf_name: str) -> Blocks:
        held = "model.embed_tokens.weight" if hf_name == "lm_head.weight" and hf_name not in hf_index else hf_name
        if held not in hf_index:
            raise CarryError(f"{hf_dir} has no weight {held}")
        weight = np.asarray(hf_index[held].get_tensor(held), dtype=np.float32)
        found = names.get_name(hf_name, try_suffixes=(".weight",)) or ""
        if found == "output.weight" and found not in source:
            found = "token_embd.weight"  # tied embeddings: the GGUF has no head of its own
        tensor = source.get(found)
        if tensor is None:
            return rounded(weight)
        return matching(tensor.tensor_type.name, np.asarray(tensor.data), weight, heads)

    path = model_dir / "model.onnx"
    model = onnx.load(str(path))
    initializers = {i.name: i for i in model.graph.initializer}
    carried: Counter[str] = Counter()
    graph_nodes, added = [], []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            graph_nodes.append(node)
            continue
        attrs = {a.name: a.i for a in node.attribute}
        parts = [blocks_of(hf_name) for hf_name in _hf_names(node.input[1])]
        carried.update(p.kind for p in parts)
        blocks = _join(parts)
        if node.input[1].startswith("lm_head."):  # the embedding may read the same 8-bit blocks: no mins there
            blocks = blocks.widened() if blocks.mins is None else rounded(blocks.weights())
        if blocks.values.shape[:2] != (attrs["N"], attrs["K"] // BLOCK):
            raise CarryError(f"{node.name}: the graph wants [{attrs['N']}, {attrs['K']}], the GGUF gives"
                             f" {list(blocks.weights().shape)}")  # fmt: skip
        nodes, inits = matmul_nodes(
            node.name, node.input[0], node.output[0], blocks, (node.input[1], node.input[2]),
            attrs.get("accuracy_level", 0),
        )  # fmt: skip
        graph_nodes += nodes
        for init in inits:
            if init.name in initializers:  # the builder's, maybe shared (the embedding): same name, new blocks
                initializers[init.name].CopyFrom(init)
            else:
                added.append(init)
    if not carried:
        raise CarryError(f"{path} has no MatMulNBits to carry blocks into")
    del model.graph.node[:]
    model.graph.node.extend(graph_nodes)
    model.graph.initializer.extend(added)
    for stale in model_dir.glob("model.onnx*"):
        stale.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data")
    for written in model_dir.glob("model.onnx*"):
        written.chmod(0o644)  # onnx writes its data file owner-only; the rest of the entry is world-readable
    return dict(carried)


def matmul_nodes(
    name: str, x: str, y: str, blocks: Blocks, weight_names: tuple[str, str], accuracy_level: int = 4
) -> tuple[list[Any], list[Any]]:
    """The ONNX nodes and initializers computing y = x @ W^T for W [N, K] given as Blocks: one MatMulNBits, and
    when W has mins, y += (x summed over each block of 32) @ mins^T. `weight_names`: B's and the scales' names."""
    from onnx import helper, numpy_helper

    rows, nb = blocks.scales.shape
    k = nb * BLOCK
    b_name, scales_name = weight_names
    inits = [numpy_helper.from_array(_pack(blocks), b_name), numpy_helper.from_array(blocks.scales, scales_name)]
    out = y if blocks.mins is None else f"{name}/without_mins"
    nodes = [
        helper.make_node(
            "MatMulNBits", [x, b_name, scales_name], [out], name=name, domain="com.microsoft",
            K=k, N=rows, bits=blocks.bits, block_size=BLOCK, accuracy_level=accuracy_level,
        )
    ]  # fmt: skip
    if blocks.mins is not None:
        inits += [
            numpy_helper.from_array(np.array([0, 0, nb, BLOCK], np.int64), f"{name}/blocks_shape"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{name}/blocks_axis"),
            numpy_helper.from_array(np.ascontiguousarray(blocks.mins.T, dtype=np.float32), f"{name}/mins"),
        ]
        nodes += [
            helper.make_node("Reshape", [x, f"{name}/blocks_shape"], [f"{name}/blocks"], name=f"{name}/Blocks"),
            helper.make_node(
                "ReduceSum", [f"{name}/blocks", f"{name}/blocks_axis"], [f"{name}/block_sums"],
                name=f"{name}/BlockSums", keepdims=0,
            ),
            helper.make_node(
                "MatMul", [f"{name}/block_sums", f"{name}/mins"], [f"{name}/min_terms"], name=f"{name}/Mins"
            ),
            helper.make_node("Add", [out, f"{name}/min_terms"], [y], name=f"{name}/AddMins"),
        ]  # fmt: skip
    return nodes, inits


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise CarryError(f"the GGUF has no {key}")
        return default
    return field.contents()


def _hf_names(initializer: str) -> list[str]:
    """The HF weights one MatMulNBits holds, from the builder's initializer name
    (model.layers.3.attn.qkv_proj.MatMul.weight_Q4G32 -> the layer's q_proj, k_proj and v_proj)."""
    module = initializer.split(".MatMul.")[0]
    if module == "lm_head":
        return ["lm_head.weight"]
    *layer, parent, proj = module.split(".")
    if parent not in _HF_PARENT or not layer:
        raise CarryError(f"unknown builder weight {initializer}")
    prefix = ".".join([*layer, _HF_PARENT[parent]])
    return [f"{prefix}.{p}.weight" for p in _FUSED.get(proj, (proj,))]


def matching(kind: str, raw: np.ndarray, weight: np.ndarray, heads: set[int]) -> Blocks:
    """A GGUF tensor's blocks (`kind`, its bytes) in the row order of `weight`, the fp32 weight they were read
    into; or `weight` rounded to 8 bits when they do not reproduce it (another format, or a row order not known
    here: as stored, or llama.cpp's rotary order for one of the `heads` counts)."""
    if kind in CARRIED and weight.shape[1] % BLOCK == 0:
        blocks = decode(kind, raw, weight.shape)
        stored = blocks.weights()
        tolerance = 1e-5 * max(1.0, float(np.abs(weight).max()))
        for order in _row_orders(weight.shape[0], heads):
            if float(np.abs(stored[order] - weight).max()) <= tolerance:
                return blocks.rows(order)
    return rounded(weight)


def _row_orders(rows: int, heads: set[int]) -> list[np.ndarray]:
    """As stored, then llama.cpp's rotary permutation undone for each head count that divides the rows."""
    orders = [np.arange(rows)]
    for h in sorted(heads):
        if h and rows % (2 * h) == 0:
            # each head's rows stored as pairs (i, i + half) interleaved; the model wants both halves in order
            orders.append(np.arange(rows).reshape(h, rows // h // 2, 2).swapaxes(1, 2).reshape(rows))
    return orders


def decode(kind: str, raw: np.ndarray, shape: tuple[int, ...]) -> Blocks:
    """A GGUF tensor's bytes ([N, row bytes] uint8) as Blocks of 32."""
    rows, cols = shape
    nb = cols // BLOCK
    raw = raw.reshape(rows, -1)

    def half(b: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)

    if kind == "Q8_0":  # d (fp16), 32 x int8
        b = raw.reshape(rows, nb, 34)
        return Blocks(b[..., 2:].copy().view(np.int8), half(b[..., 0:2]), None, 8, kind)
    if kind in ("Q4_0", "Q4_1"):  # d (fp16), [m (fp16)], 16 bytes: element j low nibble, j + 16 high
        head = 2 if kind == "Q4_0" else 4
        b = raw.reshape(rows, nb, head + 16)
        q = np.concatenate([b[..., head:] & 0x0F, b[..., head:] >> 4], axis=-1).astype(np.int8) - 8
        d = half(b[..., 0:2])
        mins = None if kind == "Q4_0" else half(b[..., 2:4]) + 8 * d
        return Blocks(q, d, mins, 4, kind)
    if kind == "Q4_K":  # per 256: d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
        b = raw.reshape(rows, cols // 256, 144)
        d, dmin = half(b[..., 0:2])[..., None], half(b[..., 2:4])[..., None]
        sc, m = _q4k_scales(b[..., 4:16])
        nibbles = b[..., 16:].reshape(rows, -1, 4, 32)  # 4 groups of 64 elements: 32 low nibbles, then 32 high
        q = np.stack([nibbles & 0x0F, nibbles >> 4], axis=3).reshape(rows, nb, BLOCK).astype(np.int8) - 8
        scales = (d * sc).reshape(rows, nb)
        return Blocks(q, scales, (-(dmin * m)).reshape(rows, nb) + 8 * scales, 4, kind)
    raise CarryError(f"cannot carry {kind} blocks over")


def _q4k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's eight 6-bit scales and mins per 256 weights, from their 12 bytes (llama.cpp's get_scale_min_k4)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def rounded(weight: np.ndarray) -> Blocks:
    """`weight` [N, K] rounded to 8 bits per block of 32 (symmetric, like Q8_0)."""
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // BLOCK, BLOCK)
    scales = np.abs(w).max(axis=-1) / 127
    scales[scales == 0] = 1.0
    values = np.clip(np.rint(w / scales[..., None]), -127, 127).astype(np.int8)
    return Blocks(values, scales.astype(np.float32), None, 8, "rounded")


def _join(parts: list[Blocks]) -> Blocks:
    """Weights fused in one MatMulNBits (q, k and v; gate and up), stacked by rows: 8 bits if any part needs them."""
    if len(parts) == 1:
        return parts[0]
    mins = None
    if any(p.mins is not None for p in parts):
        mins = np.concatenate([p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts])
    bits = max(p.bits for p in parts)
    kind = "+".join(p.kind for p in parts)
    values = np.concatenate([p.values for p in parts])
    return Blocks(values, np.concatenate([p.scales for p in parts]), mins, bits, kind)


def _pack(blocks: Blocks) -> np.ndarray:
    """MatMulNBits' B: 8 bits as value + 128; 4 bits as value + 8, elements 2j and 2j + 1 in one byte (low first)."""
    if blocks.bits == 8:
        return (blocks.values.astype(np.int16) + 128).astype(np.uint8)
    q = (blocks.values + 8).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)
