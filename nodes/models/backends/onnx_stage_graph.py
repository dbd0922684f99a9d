"""A stage's graph: a contiguous range of a built model's layers cut out of its ONNX graph, with only the weights
that range uses, so a node holds its share of the model and no more.

The model is built once by onnxruntime-genai's builder (`onnx_build`); the cut is ours. Between layers the builder
carries the residual stream as two tensors (the residual and the MLP's output), which the next layer's fused
`SkipSimplifiedLayerNormalization` adds. A stage that ends at layer b adds them itself and outputs the sum,
`hidden_states` [batch, tokens, hidden]; a stage that starts at layer a > 0 takes it and feeds it to that same fused
node with a zero skip, so the arithmetic is the unsplit model's to the bit (x + 0 is x; checked by
tests/models/test_stage_graph.py). The first stage also holds the embeddings (input_ids in), the last the final
norm and head (logits out); every stage takes the attention mask and its layers' past keys/values and gives their
present ones, bound in place as in the whole model.

Only the graph (a few hundred KB) is parsed; weights are copied from the build's data file by offset, so cutting a
stage of a model bigger than the node's memory needs no more memory than the graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HIDDEN_IN = "hidden_states"  # a later stage's input: the residual stream entering its first layer
HIDDEN_OUT = "hidden_states_out"  # an earlier stage's output: the residual stream after its last layer
STAGE_FILE = "lanmesh-stage.json"  # what a stage folder holds (its range, the source's shape)
_LAYER = re.compile(r"^/model/layers\.(\d+)/")
_SMALL_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "special_tokens_map.json", "generation_config.json")  # fmt: skip


class StageGraphError(ValueError):
    """The built model is not a layer stack this cutter knows (another builder's naming), or the range is bad."""


@dataclass(frozen=True)
class LayerCosts:
    """What each part of a built model costs, from its graph: bytes of weights held (memory) and multiply-adds
    per token (time). `layer_bytes[i]` is layer i's; the embeddings and the head may share a tensor (tied
    weights), which then counts for both the first and the last stage."""

    layers: int
    hidden: int
    layer_bytes: tuple[int, ...]
    layer_flops: tuple[int, ...]
    embed_bytes: int
    head_bytes: int
    head_flops: int
    shared_bytes: int = 0  # tensors every layer reads (rotary tables): once per stage

    def stage_bytes(self, first: int, last: int) -> int:
        total = sum(self.layer_bytes[first : last + 1]) + self.shared_bytes
        if first == 0:
            total += self.embed_bytes
        if last == self.layers - 1:
            total += self.head_bytes
        return total

    def stage_flops(self, first: int, last: int) -> int:
        total = sum(self.layer_flops[first : last + 1])
        return total + (self.head_flops if last == self.layers - 1 else 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": self.layers, "hidden": self.hidden, "layer_bytes": list(self.layer_bytes),
            "layer_flops": list(self.layer_flops), "embed_bytes": self.embed_bytes, "head_bytes": self.head_bytes,
            "head_flops": self.head_flops, "shared_bytes": self.shared_bytes,
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LayerCosts:
        return cls(int(d["layers"]), int(d["hidden"]), tuple(int(x) for x in d["layer_bytes"]),
                   tuple(int(x) for x in d["layer_flops"]), int(d["embed_bytes"]), int(d["head_bytes"]),
                   int(d["head_flops"]), int(d.get("shared_bytes", 0)))  # fmt: skip


def _load_graph(folder: Path) -> Any:
    import onnx

    config = json.loads((folder / "genai_config.json").read_text())
    return onnx.load(str(folder / config["model"]["decoder"]["filename"]), load_external_data=False), config


def _tensor_bytes(t: Any) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data)


def _part(node_name: str, layers: int) -> str:
    """Which part of the model a node belongs to: 'L<i>', 'embed', 'head' or 'mask' (attention-mask helpers)."""
    m = _LAYER.match(node_name)
    if m:
        i = int(m.group(1))
        return f"L{i}" if i < layers else "head"  # the builder names the final norm layers.<L>
    if node_name.startswith("/model/embed_tokens"):
        return "embed"
    if node_name.startswith("/lm_head"):
        return "head"
    return "mask"


_COSTS: dict[tuple[str, int], LayerCosts] = {}  # by (folder, graph mtime): a build's costs do not change


def layer_costs(folder: str | Path, *, child: bool = True) -> LayerCosts:
    """The costs of each layer of the model built in `folder`, read from its graph once per build: in a child process
    (`child`), so a node never imports onnx (12 MB it would keep), and remembered in the model cache."""
    folder = Path(folder).resolve()
    key = (str(folder), (folder / "genai_config.json").stat().st_mtime_ns)
    if key in _COSTS:
        return _COSTS[key]
    from ..cache import cache_root

    memo = cache_root() / "stage-costs" / f"{hashlib.sha256(key[0].encode()).hexdigest()[:16]}-{key[1]}.json"
    try:
        costs = LayerCosts.from_json(json.loads(memo.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        costs = LayerCosts.from_json(json.loads(_in_child("costs", str(folder)))) if child else _layer_costs(folder)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps(costs.to_json()))
        except OSError:
            pass  # a read-only cache: read the graph again next time
    _COSTS[key] = costs
    return costs


def cut_stage_in_child(source: str | Path, first: int, last: int, out: str | Path) -> dict[str, Any]:
    """`cut_stage` in a child process (a node never imports onnx)."""
    facts: dict[str, Any] = json.loads(_in_child("cut", str(source), str(first), str(last), str(out)))
    return facts


def _in_child(*args: str) -> str:
    """`python -m nodes.models.backends.onnx_stage_graph ARGS`: its stdout, or StageGraphError with its last error."""
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-m", "nodes.models.backends.onnx_stage_graph", *args], env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise StageGraphError(lines[-1] if lines else f"the stage cutter exited with status {done.returncode}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    """`costs FOLDER` prints a build's layer costs as JSON; `cut SOURCE FIRST LAST OUT` cuts a stage into OUT."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["costs"] and len(args) == 2:
        print(json.dumps(_layer_costs(Path(args[1])).to_json()))
    elif args[:1] == ["cut"] and len(args) == 5:
        print(json.dumps(cut_stage(args[1], int(args[2]), int(args[3]), args[4])))
    else:
        print("usage: python -m nodes.models.backends.onnx_stage_graph costs FOLDER | cut SOURCE FIRST LAST OUT",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _layer_costs(folder: Path) -> LayerCosts:
    model, config = _load_graph(folder)
    decoder = config["model"]["decoder"]
    layers, hidden = int(decoder["num_hidden_layers"]), int(decoder["hidden_size"])
    sizes = {t.name: _tensor_bytes(t) for t in model.graph.initializer}
    by_part: dict[str, set[str]] = {}
    users: dict[str, set[str]] = {}
    flops: dict[str, int] = {}
    for node in model.graph.node:
        part = _part(node.name, layers)
        by_part.setdefault(part, set()).update(i for i in node.input if i in sizes)
        for i in node.input:
            if i in sizes:
                users.setdefault(i, set()).add(part)
        if node.op_type in ("MatMulNBits", "MatMul"):
            attrs = {a.name: a for a in node.attribute}
            if "K" in attrs and "N" in attrs:
                flops[part] = flops.get(part, 0) + attrs["K"].i * attrs["N"].i
            else:
                weight = next((i for i in node.input[1:] if i in sizes), "")
                flops[part] = flops.get(part, 0) + sizes.get(weight, 0)
    if f"L{layers - 1}" not in by_part or "head" not in by_part:
        raise StageGraphError(f"{folder}: no layers named /model/layers.N/ in the graph; cannot cut it into stages")

    # Tensors every layer reads (rotary tables) are held once per stage: counted in `shared`, not per layer.
    shared = {n for n, parts in users.items() if sum(p.startswith("L") for p in parts) > 1}

    def part_bytes(part: str) -> int:
        return sum(sizes[n] for n in by_part.get(part, ()) if n not in shared)

    return LayerCosts(
        layers, hidden, tuple(part_bytes(f"L{i}") for i in range(layers)),
        tuple(flops.get(f"L{i}", 0) for i in range(layers)), part_bytes("embed") + part_bytes("mask"),
        part_bytes("head"), flops.get("head", 0), sum(sizes[n] for n in shared),
    )  # fmt: skip


def _boundary(model: Any, layer: int, layers: int) -> Any:
    """The fused norm that takes the residual stream into `layer` (the final norm for `layer == layers`)."""
    prefix = f"/model/layers.{layer}/"
    for node in model.graph.node:
        if (
            node.name.startswith(prefix)
            and node.op_type == "SkipSimplifiedLayerNormalization"
            and ("input_layernorm" in node.name or layer == layers)
        ):
            return node
    raise StageGraphError(f"no residual-stream boundary before layer {layer} (a SkipSimplifiedLayerNormalization "
                          f"named {prefix}...); this cutter knows onnxruntime-genai's llama-style builds")  # fmt: skip


def cut_stage(source: str | Path, first: int, last: int, out: str | Path) -> dict[str, Any]:
    """Write the stage of layers `first`..`last` (inclusive) of the model built in `source` into `out` (an existing
    empty folder): its graph, its weights, and the tokenizer and configs. Returns what was recorded about it."""
    import onnx
    from onnx import TensorProto, helper

    source, out = Path(source), Path(out)
    model, config = _load_graph(source)
    decoder = config["model"]["decoder"]
    layers, hidden = int(decoder["num_hidden_layers"]), int(decoder["hidden_size"])
    if not 0 <= first <= last < layers:
        raise StageGraphError(f"layers {first}-{last} are not a range of this model's 0-{layers - 1}")
    if first == 0 and last == layers - 1:
        raise StageGraphError("a stage of every layer is the whole model: serve it whole")
    graph = model.graph
    names = decoder.get("inputs", {})
    outs = decoder.get("outputs", {})
    span = range(first, last + 1)
    past_k = names.get("past_key_names", "past_key_values.%d.key")
    past_v = names.get("past_value_names", "past_key_values.%d.value")
    present_k = outs.get("present_key_names", "present.%d.key")
    present_v = outs.get("present_value_names", "present.%d.value")
    past = [(past_k % i, past_v % i) for i in span]
    present = [(present_k % i, present_v % i) for i in span]
    inputs = ["attention_mask"] + [n for pair in past for n in pair]
    outputs = [n for pair in present for n in pair]
    if first == 0:
        inputs.insert(0, "input_ids")
    else:  # the residual stream comes in whole: the fused norm adds a zero skip (x + 0 == x, bit for bit)
        entry = _boundary(model, first, layers)
        zeros_shape, zeros = f"{HIDDEN_IN}/shape", f"{HIDDEN_IN}/zeros"
        graph.node.extend([
            helper.make_node("Shape", [HIDDEN_IN], [zeros_shape], name=f"/lanmesh/{HIDDEN_IN}/Shape"),
            helper.make_node("ConstantOfShape", [zeros_shape], [zeros], name=f"/lanmesh/{HIDDEN_IN}/Zeros",
                             value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        ])  # fmt: skip
        entry.input[0], entry.input[1] = HIDDEN_IN, zeros
        graph.input.append(helper.make_tensor_value_info(HIDDEN_IN, TensorProto.FLOAT,
                                                         ["batch_size", "sequence_length", hidden]))  # fmt: skip
        inputs.insert(0, HIDDEN_IN)
    if last == layers - 1:
        outputs.insert(0, outs.get("logits", "logits"))
    else:  # add the two halves of the residual stream as the next layer's fused norm would
        leaving = _boundary(model, last + 1, layers)
        graph.node.append(helper.make_node("Add", [leaving.input[0], leaving.input[1]], [HIDDEN_OUT],
                                           name=f"/lanmesh/{HIDDEN_OUT}/Add"))  # fmt: skip
        graph.output.append(helper.make_tensor_value_info(HIDDEN_OUT, TensorProto.FLOAT,
                                                          ["batch_size", "sequence_length", hidden]))  # fmt: skip
        outputs.insert(0, HIDDEN_OUT)
    stage = _extract(model, inputs, outputs)
    data_name = "model.onnx.data"
    _copy_weights(stage, source, out / data_name)
    onnx.save(stage, str(out / "model.onnx"))
    for name in _SMALL_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, out / name)
    facts = {"first": first, "last": last, "layers": layers, "hidden": hidden, "inputs": inputs, "outputs": outputs}
    (out / STAGE_FILE).write_text(json.dumps(facts, indent=2))
    return facts


def _extract(model: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The part of `model` that computes `outputs` from `inputs`, with the initializers it reads (still pointing
    at the source's data file). onnx.utils.Extractor, without its shape inference (contrib ops, external data)."""
    from onnx import helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    given = set(inputs)
    inits = {t.name: t for t in graph.initializer}
    keep: list[Any] = []
    seen: set[int] = set()
    needed_inits: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in given or not name:
            continue
        if name in inits:
            needed_inits.add(name)
            continue
        node = producer.get(name)
        if node is None:
            raise StageGraphError(f"{name} is neither an input of the stage nor computed by the graph")
        if id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        stack.extend(node.input)
    order = {id(n): i for i, n in enumerate(graph.node)}
    keep.sort(key=lambda n: order[id(n)])  # the source's topological order
    values = {v.name: v for v in [*graph.input, *graph.output, *graph.value_info]}
    stage_graph = helper.make_graph(
        keep, f"{graph.name}-stage", [values[n] for n in inputs], [values[n] for n in outputs],
        [inits[n] for n in sorted(needed_inits)],
    )  # fmt: skip
    stage = helper.make_model(stage_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return stage


def _copy_weights(stage: Any, source: Path, data_file: Path) -> None:
    """Copy the bytes of every external initializer of `stage` from the source's data files into `data_file`
    (64-byte aligned, as onnx writes them), and point the initializers at it."""
    with data_file.open("wb") as sink:
        for tensor in stage.graph.initializer:
            ext = {e.key: e.value for e in tensor.external_data}
            if not ext:
                continue
            offset, length = int(ext.get("offset", 0)), int(ext["length"])
            where = sink.tell()
            pad = -where % 64
            sink.write(b"\0" * pad)
            where += pad
            with (source / ext["location"]).open("rb") as f:
                f.seek(offset)
                left = length
                while left:
                    block = f.read(min(left, 1 << 22))
                    if not block:
                        raise StageGraphError(f"{ext['location']} ends before {tensor.name}'s weights")
                    sink.write(block)
                    left -= len(block)
            del tensor.external_data[:]
            for key, value in (("location", data_file.name), ("offset", str(where)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value


if __name__ == "__main__":
    sys.exit(main())
