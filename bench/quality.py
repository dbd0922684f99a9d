"""How much a build keeps of the model it came from: perplexity on two passages of unseen prose, against the fp32
build of the same source (for a GGUF: its weights de-quantized), for our engine's builds and for llama.cpp.

Each engine scores the same token ids (the model's own tokenizer, no special tokens added), every token after
the first, so the ratios compare the weights and arithmetic only. The tests hold the default build to these
passages too (tests/models/test_default_models.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Written for lanmesh (not in any training set we know of): plain prose, a few hundred words each.
PASSAGES = (
    "On the last street of the old harbour town there is a bakery that opens before the fishing boats come in. "
    "The baker, a patient woman with flour on her sleeves, lights the oven at four in the morning and listens to "
    "the radio while the dough rises. By six the first loaves are cooling on wooden racks near the window, and the "
    "smell of warm bread drifts down to the quay, where the sailors are tying their ropes and counting the catch. "
    "Most of her customers buy the same thing every day: a round brown loaf, two rolls, sometimes a sweet bun for "
    "a child on the way to school. She knows their names, their habits and the small news of their families. When "
    "the winter storms keep the boats in the harbour, fewer people come, and she bakes less, but she never closes. "
    "In the spring, visitors arrive from the city. They take photographs of the painted doors and the narrow "
    "stairs, and they ask her for the recipe of the dark rye bread that her grandmother taught her. She smiles and "
    "tells them that the secret is time: the dough must rest through the night, slowly, in a cool room, and no "
    "machine can hurry it. Some of them write the words down carefully, as if that were enough. In the afternoon, "
    "when the shelves are nearly empty, she sweeps the floor, washes the trays and writes tomorrow's list on a "
    "small board by the door. Then she walks along the sea wall, watching the light change on the water, and "
    "thinks about the bread she will make the next morning, and the people who will come to buy it.",
    "A bicycle turns the work of the rider's legs into motion with very little waste. The pedals turn a crank, and "
    "the crank turns a toothed wheel called the chainring. A chain carries that turning force back to a smaller "
    "toothed wheel on the rear hub, so one turn of the pedals makes the back wheel turn two or three times. Riders "
    "change gears to choose how far the bicycle travels for each turn of the pedals: a low gear makes climbing a "
    "hill easier but slower, and a high gear lets a strong rider go fast on flat ground. The frame holds everything "
    "together. Most frames are made of steel, aluminium or carbon fibre, and each material trades weight, stiffness "
    "and price in a different way. The front wheel is held by a fork that the rider steers with the handlebars. "
    "Because the fork leans forward, the wheel touches the ground slightly behind the line of the steering axis, "
    "and this small distance helps the bicycle steer itself back to a straight line when it tips. Brakes squeeze "
    "pads against the rim of the wheel or against a metal disc near the hub, and cables or thin hoses filled with "
    "oil carry the force from the levers on the handlebars. Tyres filled with air soften the bumps of the road and "
    "grip the surface when the rider leans into a corner. A well kept bicycle needs only a few simple tasks: oil "
    "on the chain, air in the tyres, and brakes that are checked before a long ride. With that care, the same "
    "machine can carry a person to work every day for many years, quietly and without fuel.",
)


def onnx_perplexity(model_dir: str, threads: int) -> dict[str, Any]:
    """Our engine's perplexity of each passage on a built folder (genai_config.json + model.onnx)."""
    from nodes.models.backends.onnx_chat import OnnxChat

    backend = OnnxChat("quality", model_dir, threads=threads)
    backend.load()
    try:
        return {"perplexity": [backend.perplexity(p)[0] for p in PASSAGES]}
    finally:
        backend.close()


def llama_cpp_perplexity(gguf: str, tokenizer_dir: str, threads: int) -> dict[str, Any]:
    """llama.cpp's perplexity of each passage on a GGUF, fed the token ids our engine scores."""
    import llama_cpp
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False
    )
    scores = []
    for passage in PASSAGES:
        ids = list(tokenizer.encode(passage, add_special_tokens=True).ids)
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        nll = float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        scores.append(math.exp(nll / (len(ids) - 1)))
    return {"perplexity": scores}


def ratios(scores: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Each passage's perplexity over the reference's ({"skipped": why} passes through)."""
    if "perplexity" not in scores or "perplexity" not in reference:
        return {"skipped": scores.get("skipped") or reference.get("skipped") or "no perplexity"}
    theirs, ours = scores["perplexity"], reference["perplexity"]
    return {"perplexity": theirs, "over_fp32": [a / b for a, b in zip(theirs, ours, strict=True)]}
