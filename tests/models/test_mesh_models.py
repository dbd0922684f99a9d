"""The real default models served by node processes, through the mesh: answers, streams, fail-over, placement."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from bench.procs import Cluster, NodeProc
from mesh import Client, client_security
from nodes.cli.model_commands import admin_call
from nodes.models.packaged import models_status
from protocol import Chunk, Reply, Request, Task, decode, encode
from tests.conftest import LOOPBACK

pytestmark = [pytest.mark.models, pytest.mark.timeout(600)]

# Asked bare, SmolLM2 itself (fp32) is at a tie between "The capital..." and "L'Étoile...": see test_default_models.
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
COUNTING = [{"role": "user", "content": "Write the numbers from one to twenty in words, separated by commas."}]


def _have_default_models() -> str | None:
    try:
        import onnxruntime  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"needs lanmesh[models]: {exc}"
    status = models_status()
    missing = [m["name"] for m in status.get("models", []) if not m.get("installed", True)]
    return f"model packages not installed: {missing}" if missing else None


@pytest.fixture(scope="module")
def model_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    reason = _have_default_models()
    if reason:
        pytest.skip(reason)
    # One cache for every node process of this module: the first converts, the others load the cache.
    cache = os.environ.get("LANMESH_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("model-cache"))
    return {"LANMESH_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def model_cluster(tmp_path: Path, model_env: dict[str, str]) -> Iterator[Cluster]:
    with Cluster(log_dir=tmp_path) as c:
        yield c


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_default_models_answer_stream_and_embed_through_a_node(
    model_cluster: Cluster, model_env: dict[str, str]
) -> None:
    node = model_cluster.add("models", [*LOOPBACK, "--model", "smollm2", "--model", "minilm"], wait=300, env=model_env)
    with Client(node.address, timeout=120) as client:
        answer = client.chat("smollm2", QUESTION, max_tokens=24, temperature=0)
        assert "Paris" in answer.text
        assert answer.meta["usage"]["completion_tokens"] > 0
        assert answer.meta["finish_reason"] in ("stop", "length")
        streamed = "".join(client.chat("smollm2", QUESTION, max_tokens=24, temperature=0, stream=True))
        assert streamed == answer.text
        a, b, c = client.embed(
            "minilm",
            ["A man is playing the guitar.", "Someone plays a guitar.", "The stock market fell sharply today."],
        )
        assert _cosine(a, b) > _cosine(a, c) + 0.2
        assert len(a) == 384
        # Concurrent chats are batched by the node's executor, and each still gets its own answer.
        prompts = [[{"role": "user", "content": f"Say the number {i}."}] for i in range(8)]
        futures = [client.submit("smollm2", "chat", p, params={"max_tokens": 8, "temperature": 0}) for p in prompts]
        assert all(f.result(timeout=300).text for f in futures)
    executor = node.status()[0]["executor"]["smollm2"]
    assert executor["batched_requests"] > executor["batches"], executor


def test_a_real_stream_continues_exactly_when_its_node_is_killed_mid_answer(
    model_cluster: Cluster, model_env: dict[str, str]
) -> None:
    entry = model_cluster.add("entry", [*LOOPBACK, "--model", "echo"], env=model_env)
    for name in ("s1", "s2"):
        model_cluster.add(name, [*LOOPBACK, "--model", "smollm2", "--peer", entry.address], wait=300, env=model_env)
    model_cluster.wait_converged(timeout=30)
    params = {"max_tokens": 48, "temperature": 0}
    with Client(entry.address, timeout=120) as client:
        reference = client.chat("smollm2", COUNTING, **params).text  # type: ignore[arg-type]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{entry.address}")
    chunks: list[Chunk] = []
    final = None
    try:
        sock.send(encode(Request("take-over", "smollm2", Task.CHAT, COUNTING, params, 120_000, stream=True)))
        while final is None:
            assert sock.poll(60_000), "the stream stalled"
            msg = decode(sock.recv())
            if isinstance(msg, Chunk):
                chunks.append(msg)
                if len(chunks) == 4:
                    next(n for n in model_cluster.nodes if n.name == msg.node).kill()
            else:
                final = msg
    finally:
        sock.close(0)
    assert isinstance(final, Reply), final
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert len({c.node for c in chunks}) == 2, "the answer should have been finished by the other node"
    assert "".join(c.data for c in chunks) == reference


def test_a_node_without_smollm2s_files_pulls_the_build_from_a_peer_and_answers_with_it(
    model_cluster: Cluster, model_env: dict[str, str], tmp_path: Path
) -> None:
    """A new machine configured for smollm2 without the model package: it fetches the built model from the peer
    that serves it (no internet) and answers like that peer."""
    a = model_cluster.add("a", [*LOOPBACK, "--model", "smollm2"], wait=300, env=model_env)
    bare = {**model_env, "LANMESH_CACHE_DIR": str(tmp_path / "b-cache")}  # nothing converted, nothing pulled yet
    b = model_cluster.add(
        "b", [*LOOPBACK, "--model", "echo", "--model", "name=smollm2,path=/nonexistent/smollm2.gguf",
              "--peer", a.address], env=bare,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        served = admin_call(b.address, "models", {}, client_security(), 5.0)["models"]
        if any(m["name"] == "smollm2" and m["state"] == "ready" for m in served):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"b never served the pulled smollm2:\n{b.log_tail(30)}")
    mine = next(m for m in served if m["name"] == "smollm2")
    at_a = admin_call(a.address, "models", {}, client_security(), 5.0)["models"]
    theirs = next(m for m in at_a if m["name"] == "smollm2")
    assert mine["version"] == theirs["version"] and mine["bytes"] == theirs["bytes"] > 50_000_000
    a.stop()  # the only other holder is gone: b answers with its own copy
    with Client(b.address, timeout=120) as client:
        answer = client.chat("smollm2", QUESTION, max_tokens=24, temperature=0)
    assert answer.node == "b" and "Paris" in answer.text


def test_a_model_that_requires_a_gpu_is_not_served_by_a_cpu_node(model_cluster: Cluster) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU-only refusal cannot be observed here")
    node = model_cluster.add(
        "cpu", [*LOOPBACK, "--model", "echo", "--model", "name=gpu-echo,kind=echo,require.gpu=true"]
    )
    labels = node.status()[0]["labels"]
    assert labels["gpu"] == "false" and labels["accelerator"] == "cpu"
    assert "gpu-echo" not in node.status()[0]["models"]
    assert "not serving gpu-echo" in node.log_tail(60)


def test_on_a_cuda_machine_the_chat_model_lands_on_the_gpu_and_serves(
    model_cluster: Cluster, model_env: dict[str, str]
) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    node = model_cluster.add("gpu", [*LOOPBACK, "--model", "smollm2"], wait=300, env=model_env)
    labels = node.status()[0]["labels"]
    assert labels["gpu"] == "true" and labels["accelerator"] == "cuda"
    with Client(node.address, timeout=120) as client:
        answer = client.chat("smollm2", QUESTION, max_tokens=24, temperature=0, require={"gpu": "true"})
    assert "Paris" in answer.text and answer.node == "gpu"


OFFICE = (
    "You are the office assistant of Northwind Traders, a small importer of coffee, tea and spices. Answer in one "
    "or two sentences, politely, and say so when you do not know."
)


def _chains_seen(entry: NodeProc, peer: str) -> int:
    row = next((r for r in entry.status() if r["node"] == peer), {})
    return int((row.get("prefix_chains") or {}).get("smollm2", 0))


def test_a_conversation_follows_its_cache_across_entry_nodes_and_moves_on_when_that_node_dies(
    model_cluster: Cluster, model_env: dict[str, str]
) -> None:
    """Each turn enters at another node; every turn after the first goes to the node that served the ones before
    (route `prefix:`) and reads only what is new; when that node dies, the conversation goes on elsewhere."""
    a = model_cluster.add("a", [*LOOPBACK, "--model", "smollm2"], wait=300, env=model_env)
    b = model_cluster.add("b", [*LOOPBACK, "--model", "smollm2", "--peer", a.address], wait=300, env=model_env)
    model_cluster.wait_converged(timeout=30)
    nodes = {"a": a, "b": b}
    messages = [{"role": "system", "content": OFFICE}]
    served: list[tuple[str, str, dict[str, int]]] = []
    for i, question in enumerate(["Which teas do we sell?", "And coffee?", "Which is cheaper?", "Thanks!"]):
        messages.append({"role": "user", "content": question})
        entry = (a, b)[i % 2]
        with Client(entry.address, timeout=120, learn=False) as client:
            answer = client.chat("smollm2", messages, max_tokens=24, temperature=0)
        served.append((answer.node, answer.route, answer.meta["usage"]))
        messages.append({"role": "assistant", "content": answer.text})
        # The other node hears what the serving node now holds before the next turn enters there.
        other = (b, a)[i % 2]
        deadline = time.monotonic() + 10
        while answer.node != other.name and _chains_seen(other, answer.node) == 0:
            assert time.monotonic() < deadline, "the serving node's cache summary never reached its peer"
            time.sleep(0.05)
    holder = served[0][0]
    for node, route, usage in served[1:]:
        assert node == holder and route.startswith(f"prefix:{holder}("), served
        assert usage["prompt_tokens"] - usage["cached_tokens"] < 48, served  # the new question, and a partial block
    nodes[holder].kill()
    messages.append({"role": "user", "content": "One more question: do we sell cinnamon?"})
    survivor = next(n for name, n in nodes.items() if name != holder)
    with Client(survivor.address, timeout=120, learn=False) as client:
        answer = client.chat("smollm2", messages, max_tokens=24, temperature=0)
    assert answer.node == survivor.name and answer.text
