"""The embedding backend on a tiny random BERT: export check, pooling, bucketing, truncation, cache, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from model_jobs import embed, serve

from nodes.models.backends.onnx_embed import OnnxEmbedder
from protocol import ErrorCode, Request, Task

pytestmark = pytest.mark.models

SENTENCES = [
    "The capital of France is Paris.",
    "hello",
    "Once upon a time there was a small model that answered questions about cities.",
    "",
    "Zürich, São Paulo and Kraków are cities.",
    "the quick brown fox jumps over the lazy dog",
    "1 2 3",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embed-cache")


@pytest.fixture(scope="module")
def backend(tiny_embed_dir: Path, cache_dir: Path) -> Iterator[OnnxEmbedder]:
    b = OnnxEmbedder("tiny-embed", tiny_embed_dir, cache_dir=cache_dir)
    b.load()
    yield b
    b.close()


def vectors(backend: OnnxEmbedder, texts: str | list[str]) -> list[list[float]]:
    (outcome,) = serve(backend, [embed(texts)])
    assert outcome.code is None, outcome.message
    return outcome.output


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_first_load_exports_and_checks_against_torch(backend: OnnxEmbedder) -> None:
    assert backend.loaded_from == "export"
    assert backend.dimension == 32
    assert backend.max_length == 24  # from sentence_bert_config.json
    assert backend.cache_path is not None and (backend.cache_path / "model.onnx").exists()


def test_single_string_gets_a_list_of_one_unit_vector(backend: OnnxEmbedder) -> None:
    (vector,) = vectors(backend, "hello")
    assert len(vector) == 32
    assert cosine(vector, vector) == pytest.approx(1.0, abs=1e-5)


def test_served_vectors_equal_torch_mean_pooling(backend: OnnxEmbedder, tiny_embed_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_embed_dir)
    model = AutoModel.from_pretrained(tiny_embed_dir).eval()
    enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).tolist()
    for got, want in zip(vectors(backend, SENTENCES), expected, strict=True):
        assert cosine(got, want) > 0.9999


def test_batched_jobs_get_the_same_vectors_as_each_alone(backend: OnnxEmbedder) -> None:
    one_by_one = [vectors(backend, s)[0] for s in SENTENCES]
    backend.sub_batch = 3  # several length buckets inside one batch
    try:
        requests = [embed(SENTENCES[:3]), embed(SENTENCES[3]), embed(SENTENCES[4:])]
        outcomes = serve(backend, requests)
    finally:
        backend.sub_batch = 32
    together = [v for o in outcomes for v in o.output]
    assert [len(o.output) for o in outcomes] == [3, 1, 3]
    for got, want in zip(together, one_by_one, strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_usage_counts_the_tokens_of_every_input(backend: OnnxEmbedder) -> None:
    (outcome,) = serve(backend, [embed(["hello", "1 2 3"])])
    # [CLS] hello [SEP] + [CLS] 1 2 3 [SEP]
    assert outcome.meta == {"model": "tiny-embed", "usage": {"prompt_tokens": 8, "total_tokens": 8}}


def test_over_long_input_is_truncated_to_the_model_maximum(backend: OnnxEmbedder) -> None:
    long_text = "the quick brown fox " * 40
    (outcome,) = serve(backend, [embed(long_text)])
    assert outcome.code is None
    assert outcome.meta is not None and outcome.meta["usage"]["prompt_tokens"] == 24
    cut = " ".join(long_text.split()[:22])  # 22 words + [CLS] + [SEP] = 24 tokens
    assert outcome.output[0] == pytest.approx(vectors(backend, cut)[0], abs=1e-5)


@pytest.mark.parametrize(
    ("task", "value", "complaint"),
    [
        (Task.EMBED, [], "non-empty list of strings"),
        (Task.EMBED, ["ok", 3], "non-empty list of strings"),
        (Task.EMBED, {"text": "hi"}, "non-empty list of strings"),
        (Task.EMBED, ["x"] * 2049, "at most 2048 strings"),
        (Task.CHAT, [{"role": "user", "content": "hi"}], "serves embed, not chat"),
    ],
)
def test_malformed_input_is_a_bad_request_and_spares_the_batch_mates(
    backend: OnnxEmbedder, task: Task, value: object, complaint: str
) -> None:
    bad, good = serve(backend, [Request(id="x", model="tiny-embed", task=task, input=value), embed("hello")])
    assert bad.code is ErrorCode.BAD_REQUEST
    assert complaint in bad.message
    assert good.code is None and len(good.output) == 1


def test_expired_job_is_answered_without_running(backend: OnnxEmbedder) -> None:
    (outcome,) = serve(backend, [embed("hello")], timeout=-1.0)
    assert outcome.code is ErrorCode.DEADLINE_EXCEEDED


def test_second_start_serves_the_cached_export(backend: OnnxEmbedder, tiny_embed_dir: Path, cache_dir: Path) -> None:
    again = OnnxEmbedder("tiny-embed", tiny_embed_dir, cache_dir=cache_dir)
    again.load()
    assert again.loaded_from == "cache"
    assert again.cache_path == backend.cache_path
    assert vectors(again, SENTENCES) == vectors(backend, SENTENCES)


def test_an_onnx_file_is_served_by_path(backend: OnnxEmbedder) -> None:
    assert backend.cache_path is not None
    direct = OnnxEmbedder("by-path", backend.cache_path / "model.onnx")
    direct.load()
    assert direct.loaded_from == "onnx"
    assert direct.max_length == 24
    assert vectors(direct, SENTENCES) == vectors(backend, SENTENCES)


def test_unreadable_cached_export_is_exported_again(
    backend: OnnxEmbedder, tiny_embed_dir: Path, tmp_path: Path
) -> None:
    first = OnnxEmbedder("tiny-embed", tiny_embed_dir, cache_dir=tmp_path)
    first.load()
    assert first.cache_path is not None
    onnx_file = first.cache_path / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])  # e.g. a disk that filled up
    again = OnnxEmbedder("tiny-embed", tiny_embed_dir, cache_dir=tmp_path)
    again.load()
    assert again.loaded_from == "export"
    for got, want in zip(vectors(again, SENTENCES), vectors(backend, SENTENCES), strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_the_export_runs_in_a_child_so_the_serving_process_never_holds_torch(
    tiny_embed_dir: Path, tmp_path: Path
) -> None:
    """A first start converts the model once; the node that then serves must not keep torch (hundreds of MB) in
    memory until its next restart."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from nodes.models.backends.onnx_embed import OnnxEmbedder\n"
        f"b = OnnxEmbedder('tiny-embed', {str(tiny_embed_dir)!r}, cache_dir={str(tmp_path)!r})\n"
        "b.load()\n"
        "assert b.loaded_from == 'export', b.loaded_from\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", "the serving process imported torch or transformers"


def test_a_failed_export_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken-encoder"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    backend = OnnxEmbedder("broken", broken, cache_dir=tmp_path / "cache")
    with pytest.raises(RuntimeError, match="the ONNX export failed: .+"):
        backend.load()
