"""The onnxruntime chat engine's own promises: continuous batching, slots freed at once, its build cache, fallbacks.

What both engines share (texts, streams, stops, limits) is in test_chat_engines.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from model_jobs import Outcome, chat, complete, requires, serve
from test_chat_engines import LaneRun, through_a_lane

from nodes.models.backends.base import Job
from nodes.models.backends.onnx_chat import OnnxChat
from nodes.models.backends.transformers_chat import TransformersChat
from nodes.models.cache import cache_ready
from nodes.models.loader import load_backend
from nodes.models.specs import parse_model_arg
from protocol import ErrorCode, Request, Task

pytestmark = pytest.mark.models


def solo(backend: OnnxChat, request: Any) -> str:
    (outcome,) = serve(backend, [request])
    assert outcome.code is None, outcome.message
    return outcome.text


@pytest.fixture
def two_slots(tiny_onnx: OnnxChat) -> OnnxChat:
    """The same built model in an engine that runs at most two requests at once."""
    assert tiny_onnx.model_dir is not None
    engine = OnnxChat("tiny", tiny_onnx.model_dir, max_batch=2)
    engine.load()
    assert engine.loaded_from == "onnx"
    return engine


def test_a_request_joins_the_running_batch_without_waiting_for_it_to_finish(tiny_onnx: OnnxChat) -> None:
    long, short = Outcome(), Outcome()
    long_request = complete("Once upon a time", max_tokens=70, stream=True)
    chunks_when_short_done: list[int] = []
    with LaneRun(tiny_onnx) as run:

        def join_at_five(_job: Job, outcome: Outcome) -> None:
            if len(outcome.chunks) == 5:
                run.submit(
                    complete("hello", max_tokens=3),
                    short,
                    on_done=lambda *_: chunks_when_short_done.append(len(long.chunks)),
                )

        run.submit(long_request, long, on_chunk=join_at_five)
        run.wait()
    assert long.code is None and short.code is None
    assert chunks_when_short_done[0] < len(long.chunks), "the newcomer waited for the running request to finish"
    assert long.text == solo(tiny_onnx, long_request)  # joining did not disturb the running request


def test_a_finished_request_frees_its_slot_for_the_next_at_once(two_slots: OnnxChat) -> None:
    first = complete("hello", max_tokens=3)  # slot 0, done first: the long one moves into its slot
    long = complete("The quick brown fox", max_tokens=60)
    late = chat("hello, how are you?", max_tokens=20)  # waits for a free slot
    outcomes = [Outcome(), Outcome(), Outcome()]
    long_done_at: list[float] = []
    late_done_at: list[float] = []
    with LaneRun(two_slots) as run:
        run.submit(first, outcomes[0])
        run.submit(long, outcomes[1], on_done=lambda *_: long_done_at.append(time.monotonic()))
        run.submit(late, outcomes[2], on_done=lambda *_: late_done_at.append(time.monotonic()))
        run.wait()
    assert late_done_at[0] < long_done_at[0], "the third request waited for the long one instead of the free slot"
    for request, outcome in zip((first, long, late), outcomes, strict=True):
        assert outcome.code is None, outcome.message
        assert outcome.text == solo(two_slots, request)  # moving a request between slots keeps its cache intact


def test_a_request_answered_elsewhere_leaves_the_batch_at_the_next_step(tiny_onnx: OnnxChat) -> None:
    """What a cancel does to a running generation: it stops within a step and its slot is free again."""
    cancelled, mate = Outcome(), Outcome()
    mate_request = complete("The quick brown fox", max_tokens=30)
    with LaneRun(tiny_onnx) as run:

        def cancel_at_three(job: Job, outcome: Outcome) -> None:
            if len(outcome.chunks) == 3:
                job.fail(ErrorCode.UNAVAILABLE, "cancelled by the client")

        run.submit(complete("hello", max_tokens=80, stream=True), cancelled, on_chunk=cancel_at_three)
        run.submit(mate_request, mate)
        run.wait()  # also checks that the lane counts nothing in flight afterwards
    assert cancelled.code is ErrorCode.UNAVAILABLE and len(cancelled.chunks) == 3
    assert mate.text == solo(tiny_onnx, mate_request)


def test_the_build_is_cached_and_a_broken_cache_is_built_again(
    tiny_chat_dir: Path, tmp_path: Path, tiny_onnx: OnnxChat
) -> None:
    request = chat("hello", max_tokens=8)
    first = OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path, precision="fp32")
    first.load()
    assert first.loaded_from == "build" and first.model_dir is not None and cache_ready(first.model_dir)
    marker = json.loads((first.model_dir / "lanmesh-cache.json").read_text())
    assert marker["precision"] == "fp32" and marker["builder"].startswith("onnxruntime-genai")
    again = OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path, precision="fp32")
    started = time.monotonic()
    again.load()
    assert again.loaded_from == "cache" and again.model_dir == first.model_dir
    assert time.monotonic() - started < 5
    (first.model_dir / "model.onnx").write_bytes(b"not a model")  # a disk that lost the file's contents
    rebuilt = OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path, precision="fp32")
    rebuilt.load()
    assert rebuilt.loaded_from == "build"
    assert solo(rebuilt, request) == solo(again, request) == solo(tiny_onnx, request)


def test_int4_build_of_the_tiny_model_answers(tiny_chat_dir: Path, tmp_path: Path) -> None:
    engine = OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path, precision="int4")
    engine.load()
    (outcome,) = serve(engine, [chat("hello", max_tokens=6)])
    assert outcome.code is None and outcome.meta is not None
    assert outcome.meta["usage"]["completion_tokens"] == 6


def test_fp16_on_a_cpu_is_refused_with_the_reason(tiny_chat_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp16 runs on a GPU"):
        OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path, precision="fp16").load()
    with pytest.raises(ValueError, match="precision must be one of"):
        OnnxChat("tiny", tiny_chat_dir, cache_dir=tmp_path, precision="int3").load()


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path) -> Path:
    """A model architecture onnxruntime-genai's builder does not know (GPT-2), with the tiny tokenizer."""
    requires("torch", "transformers")
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_chat_dir / name).exists():
            shutil.copy(tiny_chat_dir / name, folder / name)
    torch.manual_seed(7)
    vocab = json.loads((tiny_chat_dir / "config.json").read_text())["vocab_size"]
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        folder
    )
    return folder


def test_a_model_the_builder_cannot_convert_is_served_by_transformers_with_one_line_saying_why(
    tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = parse_model_arg(f"name=gpt,path={tiny_gpt2_dir},task=chat")
    with caplog.at_level(logging.WARNING, logger="nodes.models"):
        backend = load_backend(spec, cache_dir=tmp_path)
    assert isinstance(backend, TransformersChat)
    why = [r.getMessage() for r in caplog.records if "transformers engine" in r.getMessage()]
    assert len(why) == 1 and "onnxruntime-genai cannot build it" in why[0]
    (outcome,) = serve(backend, [complete("hello", model="gpt", max_tokens=4)])
    assert outcome.code is None and outcome.meta is not None and outcome.meta["usage"]["completion_tokens"] == 4
    with pytest.raises(Exception, match="builder|supported|Error"):
        load_backend(parse_model_arg(f"name=gpt,path={tiny_gpt2_dir},task=chat,engine=onnx"), cache_dir=tmp_path)


# ---------------------------------------------------------------- one request fails alone

DIGITS = {"type": "regex", "grammar": "[0-9]{4}"}


def test_a_grammar_that_breaks_mid_answer_fails_its_request_alone(
    tiny_onnx: OnnxChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nodes.models.backends import guidance

    real = guidance.Matcher.consume

    def breaks_on_second_token(self: guidance.Matcher, tokens: list[int]) -> None:
        self.seen = getattr(self, "seen", 0) + 1  # type: ignore[attr-defined]
        if self.seen == 2:  # type: ignore[attr-defined]
            raise RuntimeError("llguidance: internal error")
        real(self, tokens)

    mates = [complete("The quick brown fox", max_tokens=12), chat("hello", max_tokens=10, stream=True)]
    expected = [solo(tiny_onnx, r) for r in mates]
    monkeypatch.setattr(guidance.Matcher, "consume", breaks_on_second_token)
    broken, *others = through_a_lane(tiny_onnx, [complete("A number:", max_tokens=8, guidance=DIGITS), *mates])
    assert broken.code is ErrorCode.INTERNAL and "llguidance: internal error" in broken.message
    assert [o.code for o in others] == [None, None] and [o.text for o in others] == expected


def test_a_grammar_that_allows_no_token_fails_its_request_alone(
    tiny_onnx: OnnxChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from nodes.models.backends import guidance

    monkeypatch.setattr(guidance.Matcher, "allowed", lambda self, **_: np.zeros(tiny_onnx._vocab_size, dtype=bool))
    mate = complete("The quick brown fox", max_tokens=12)
    broken, other = through_a_lane(tiny_onnx, [complete("A number:", max_tokens=8, guidance=DIGITS), mate])
    assert broken.code is ErrorCode.INTERNAL and "no token" in broken.message  # not NaN probabilities
    assert other.code is None and other.text == solo(tiny_onnx, mate)


def test_a_grammar_compiles_off_the_engine_thread_while_the_batch_keeps_decoding(
    tiny_onnx: OnnxChat, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grammar that takes long to compile (256 KiB of schema) must not stall the streams already running: here
    its compile cannot end before the running stream has finished."""
    import threading

    from nodes.models.backends import guidance

    stream_done = threading.Event()
    real = guidance.GrammarTokenizer.matcher
    compiled_after_stream: list[bool] = []

    def slow(self: guidance.GrammarTokenizer, *grammar: Any) -> guidance.Matcher:
        compiled_after_stream.append(stream_done.wait(30))
        return real(self, *grammar)

    monkeypatch.setattr(guidance.GrammarTokenizer, "matcher", slow)
    running, constrained = Outcome(), Outcome()
    with LaneRun(tiny_onnx) as run:

        def then_the_grammar(_job: Job, outcome: Outcome) -> None:
            if len(outcome.chunks) == 2:
                run.submit(complete("A number:", max_tokens=6, guidance=DIGITS), constrained)

        run.submit(complete("Once upon a time", max_tokens=40, stream=True), running, on_chunk=then_the_grammar,
                   on_done=lambda *_: stream_done.set())  # fmt: skip
        run.wait()
    assert compiled_after_stream == [True], "the engine waited for the grammar instead of decoding the stream"
    assert running.code is None and len(running.chunks) > 2
    assert constrained.code is None and constrained.text.isdigit()


def test_the_key_value_cache_stays_within_its_cap_and_is_given_back_when_idle(tiny_onnx: OnnxChat) -> None:
    assert tiny_onnx.model_dir is not None
    capped = OnnxChat("tiny", tiny_onnx.model_dir, max_batch=8, kv_cache_bytes=1)
    with pytest.raises(ValueError, match="cannot hold even one short request"):
        capped.load()
    runner = tiny_onnx._runner
    assert runner is not None
    cap = 4 * 96 * runner.layout.bytes_per_token  # four requests of the whole (96-token) context
    engine = OnnxChat("tiny", tiny_onnx.model_dir, max_batch=8, kv_cache_bytes=cap)
    engine.load()
    requests = [complete(f"Story {i}: once upon a time", max_tokens=40, stream=True) for i in range(8)]
    peak: list[int] = []
    outcomes = [Outcome() for _ in requests]
    with LaneRun(engine) as run:
        for request, outcome in zip(requests, outcomes, strict=True):
            run.submit(request, outcome, on_chunk=lambda *_: peak.append(engine._runner.bytes_held))  # type: ignore[union-attr]
        run.wait()
        assert engine._runner is not None
        end = time.monotonic() + 5
        while engine._runner.bytes_held and time.monotonic() < end:
            time.sleep(0.01)
        assert engine._runner.bytes_held == 0, "an idle engine gives its cache's memory back"
    assert all(o.code is None for o in outcomes)
    assert 0 < max(peak) <= cap
    assert [o.text for o in outcomes] == [solo(tiny_onnx, r) for r in requests]


# ---------------------------------------------------------------- the prefix cache


def converse(engine: OnnxChat, questions: list[str], max_tokens: int = 6) -> list[Outcome]:
    """A conversation, turn by turn: each request sends the earlier turns and their answers again."""
    messages = [{"role": "system", "content": "Answer about cities."}]
    outcomes = []
    for i, question in enumerate(questions):
        messages.append({"role": "user", "content": question})
        request = Request(f"turn-{i}-{time.monotonic_ns()}", "tiny", Task.CHAT, list(messages),
                          {"max_tokens": max_tokens, "temperature": 0})  # fmt: skip
        (outcome,) = serve(engine, [request])
        assert outcome.code is None, outcome.message
        messages.append({"role": "assistant", "content": outcome.text})
        outcomes.append(outcome)
    return outcomes


def test_a_conversation_reads_only_its_new_turn_and_answers_exactly_as_without_the_cache(tiny_onnx: OnnxChat) -> None:
    assert tiny_onnx.model_dir is not None
    cached = OnnxChat("tiny", tiny_onnx.model_dir)  # the default: half the key/value cache is the prefix cache
    cached.load()
    plain = OnnxChat("tiny", tiny_onnx.model_dir, prefix_cache_bytes=0)
    plain.load()
    questions = ["hello", "France?", "Japan?"]  # the tiny model's context is 96 tokens
    with_cache, without = converse(cached, questions), converse(plain, questions)
    assert [o.text for o in with_cache] == [o.text for o in without]  # greedy: identical, token for token
    usage = [o.meta["usage"] for o in with_cache if o.meta]
    assert usage[0]["cached_tokens"] == 0
    for before, turn in zip(usage, usage[1:], strict=False):
        # At least every full block of the turn before: a random model's answer may not tokenize again to the very
        # tokens it wrote, so reuse may stop where the answer starts (SmolLM2's test sees it go further).
        assert turn["cached_tokens"] >= before["prompt_tokens"] // 16 * 16, (before, turn)
    assert all("cached_tokens" not in (o.meta or {})["usage"] for o in without)
    stats = cached.cache_stats()
    assert stats["prefix_hits"] == 2 and stats["prefix_lookups"] == 3 and stats["prefix_evictions"] == 0
    runner = cached._runner
    assert runner is not None and stats["prefix_cache_capacity_bytes"] <= cached.kv_cache_bytes // 2


def test_the_pool_and_the_running_requests_share_the_key_value_cap(tiny_onnx: OnnxChat) -> None:
    assert tiny_onnx.model_dir is not None and tiny_onnx._runner is not None
    per_token = tiny_onnx._runner.layout.bytes_per_token
    engine = OnnxChat("tiny", tiny_onnx.model_dir, max_batch=4, kv_cache_bytes=6 * 96 * per_token,
                      prefix_cache_bytes=2 * 96 * per_token)  # fmt: skip
    engine.load()
    requests = [chat(f"Story {i}: once upon a time", max_tokens=30, stream=True) for i in range(6)]
    peak: list[int] = []
    outcomes = [Outcome() for _ in requests]
    with LaneRun(engine) as run:
        for request, outcome in zip(requests, outcomes, strict=True):
            run.submit(request, outcome, on_chunk=lambda *_: peak.append(engine._runner.bytes_held))  # type: ignore[union-attr]
        run.wait()
    stats = engine.cache_stats()
    assert max(peak) + stats["prefix_cache_capacity_bytes"] <= engine.kv_cache_bytes
    assert [o.text for o in outcomes] == [solo(tiny_onnx, r) for r in requests]
    with pytest.raises(ValueError, match="leaves nothing of the"):
        OnnxChat("tiny", tiny_onnx.model_dir, kv_cache_bytes=per_token * 512, prefix_cache_bytes=per_token * 512).load()
