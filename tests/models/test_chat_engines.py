"""Both chat engines, driven with Jobs on a tiny random Llama: batching, sampling, stops, streams, limits.

`transformers` runs the HF folder with its own decode loop; `onnx` runs the same weights built by
onnxruntime-genai's model builder, with continuous batching. What a caller sees must not depend on which.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from model_jobs import TINY_CONTEXT, Outcome, chat, complete, make_job, recorders, requires, serve

from nodes.models.backends.base import Backend, Job
from nodes.models.backends.transformers_chat import TransformersChat
from nodes.runtime.executor import ModelLane
from protocol import ErrorCode, Request, Task

pytestmark = pytest.mark.models


@pytest.fixture(scope="module", params=["transformers", "onnx"])
def backend(
    request: pytest.FixtureRequest, tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    b: Backend
    if request.param == "transformers":
        b = TransformersChat("tiny", tiny_chat_dir, cache_dir=tmp_path_factory.mktemp("cache"))
        b.load()
    else:
        b = request.getfixturevalue("tiny_onnx")
    yield b
    if request.param == "transformers":
        b.close()


def encode(backend: Backend, text: str) -> list[int]:
    if isinstance(backend, TransformersChat):
        return list(backend._tokenizer.encode(text, add_special_tokens=False))
    return backend._encode(text, special=False)  # type: ignore[attr-defined, no-any-return]


def decode(backend: Backend, ids: list[int]) -> str:
    if isinstance(backend, TransformersChat):
        return backend._text(ids)
    return backend._decode(ids)  # type: ignore[attr-defined, no-any-return]


def alone(backend: Backend, request: Request) -> Outcome:
    (outcome,) = serve(backend, [request])
    assert outcome.code is None, outcome.message
    return outcome


class LaneRun:
    """A model lane as a node runs one: requests queued, its worker thread taking them (continuously or in batches)."""

    def __init__(self, backend: Backend) -> None:
        self.lane = ModelLane(backend, max_queue=64, batch_wait=0.005)
        self.answered = threading.Semaphore(0)
        self.submitted = 0

    def submit(self, request: Request, outcome: Outcome, **callbacks: Any) -> None:
        user_done = callbacks.pop("on_done", None)

        def done(job: Job, outcome: Outcome) -> None:
            if user_done is not None:
                user_done(job, outcome)
            self.answered.release()

        chunk_fn, done_fn = recorders(outcome, on_done=done, **callbacks)
        assert self.lane.submit(self.lane.make_job(request, time.monotonic() + 120, chunk_fn, done_fn))
        self.submitted += 1

    def wait(self) -> None:
        for _ in range(self.submitted):
            assert self.answered.acquire(timeout=120), "a request was never answered"
        self.submitted = 0
        # the slot is freed just before the answer goes out: wait for that bookkeeping, not a fixed time
        end = time.monotonic() + 5
        while self.lane.inflight and time.monotonic() < end:
            time.sleep(0.001)
        assert self.lane.inflight == 0 and self.lane.queued() == 0, "every answered job must free its slot"

    def __enter__(self) -> LaneRun:
        self.lane.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.lane.stop(5.0, close=False)


def through_a_lane(backend: Backend, requests: list[Request]) -> list[Outcome]:
    outcomes = [Outcome() for _ in requests]
    with LaneRun(backend) as run:
        for request, outcome in zip(requests, outcomes, strict=True):
            run.submit(request, outcome)
        run.wait()
    assert all(o.answers == 1 for o in outcomes), "every job must be answered exactly once"
    return outcomes


def test_batched_requests_get_the_same_text_as_each_alone(backend: Backend) -> None:
    requests = [
        chat("hello", max_tokens=12),
        complete("The capital of France is", max_tokens=20),
        chat("Once upon a time there was a small model that answered questions about cities.", max_tokens=5),
        complete("Zürich, 東京", max_tokens=16, stop="zz-never"),
        complete("1 2 3", max_tokens=9, temperature=1.0, seed=5),  # a sampled batch mate
    ]
    batched = serve(backend, requests)
    for request, together in zip(requests[:4], batched, strict=False):
        assert together.code is None, together.message
        assert together.text == alone(backend, request).text
        assert together.meta is not None and together.meta["usage"]["completion_tokens"] == request.params["max_tokens"]


def test_same_seed_gives_the_same_text_whatever_the_batch_mates(backend: Backend) -> None:
    sampled = complete("Once upon a time", max_tokens=16, temperature=1.5, seed=7)
    solo = alone(backend, sampled).text
    mates = [chat("hello", max_tokens=30), complete("The quick brown fox", max_tokens=4, temperature=0.9, seed=1)]
    in_batch = serve(backend, [mates[0], sampled, mates[1]])[1]
    assert in_batch.text == solo
    other_seed = alone(backend, complete("Once upon a time", max_tokens=16, temperature=1.5, seed=8)).text
    assert other_seed != solo


def test_stop_string_ends_the_text_before_it(backend: Backend) -> None:
    full = alone(backend, complete("The quick brown fox", max_tokens=30)).text
    stop = full[12:15]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        outcome = alone(backend, complete("The quick brown fox", max_tokens=30, stop=["zz-never", stop], stream=stream))
        assert outcome.text == expected
        assert outcome.meta is not None and outcome.meta["finish_reason"] == "stop"
        if stream:
            assert "".join(outcome.chunks) == expected
            assert all(stop not in c for c in outcome.chunks)


def test_max_tokens_ends_with_length_and_usage_counts_tokens(backend: Backend) -> None:
    request = chat("hello, how are you?", max_tokens=7)
    outcome = alone(backend, request)
    prompt_tokens = len(backend._chat_ids(request.input))  # type: ignore[attr-defined]
    assert outcome.output["role"] == "assistant"
    assert outcome.meta is not None
    cached = outcome.meta["usage"].pop("cached_tokens", 0)  # engines with a prefix cache: what they did not re-read
    assert 0 <= cached <= prompt_tokens
    assert outcome.meta == {
        "model": "tiny",
        "finish_reason": "length",
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7},
    }


def test_the_end_of_turn_token_ends_the_answer_with_stop(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    request = complete("The quick brown fox", max_tokens=12)
    full = alone(backend, request)
    tokens = encode(backend, full.text)
    monkeypatch.setattr(backend, "_eos", frozenset({tokens[3]}))  # as if the model had ended its turn there
    ended = alone(backend, request)
    assert full.text.startswith(ended.text) and len(ended.text) < len(full.text)
    assert ended.meta is not None and ended.meta["finish_reason"] == "stop"
    assert ended.meta["usage"]["completion_tokens"] < 12


def test_a_regex_grammar_shapes_the_whole_answer(backend: Backend) -> None:
    for stream in (False, True):
        outcome = alone(
            backend, chat("hello", max_tokens=20, stream=stream, guidance={"type": "regex", "grammar": "[a-z]{5}!"})
        )
        assert re.fullmatch("[a-z]{5}!", outcome.text), outcome.text
        assert outcome.meta is not None and outcome.meta["finish_reason"] == "stop"  # the grammar was complete
        if stream:
            assert "".join(outcome.chunks) == outcome.text


def test_a_json_schema_grammar_gives_json_that_validates(backend: Backend) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9},
                       "tag": {"enum": ["red", "green"]}},
        "required": ["ok", "n", "tag"],
        "additionalProperties": False,
    }  # fmt: skip
    outcome = alone(
        backend,
        chat("hello", max_tokens=40, temperature=1.0, seed=4, guidance={"type": "json_schema", "grammar": schema}),
    )
    value = json.loads(outcome.text)
    assert set(value) == {"ok", "n", "tag"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    assert value["tag"] in ("red", "green")


def test_a_constrained_answer_closes_within_max_tokens(backend: Backend) -> None:
    # A random model wanders: left alone it writes strings and keys until max_tokens cuts the JSON in half.
    free = {"type": "json_schema", "grammar": {"type": "object", "additionalProperties": True}}
    for seed in range(4):
        outcome = alone(backend, chat("hello", max_tokens=24, temperature=1.5, seed=seed, guidance=free))
        assert isinstance(json.loads(outcome.text), dict), outcome.text
        assert outcome.meta is not None and outcome.meta["finish_reason"] == "stop"
        assert outcome.meta["usage"]["completion_tokens"] <= 24


@pytest.mark.parametrize(
    ("guidance", "complaint"),
    [
        ({"type": "yaml", "grammar": "x"}, "guidance must be {type: json_schema | regex | lark"),
        ({"type": "lark", "grammar": "start: ("}, "guidance: invalid lark"),
        ({"type": "regex", "grammar": ""}, "guidance.grammar must be a non-empty string"),
        ({"type": "json_schema", "grammar": "{not json"}, "guidance: not a JSON schema"),
    ],
)
def test_a_bad_grammar_is_a_bad_request(backend: Backend, guidance: dict[str, Any], complaint: str) -> None:
    (outcome,) = serve(backend, [chat("hello", max_tokens=5, guidance=guidance)])
    assert outcome.code is ErrorCode.BAD_REQUEST
    assert complaint in outcome.message


def test_tools_are_described_to_a_model_whose_template_has_none(backend: Backend) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with_tools = decode(backend, backend._chat_ids([{"role": "user", "content": "hi"}], tools))  # type: ignore[attr-defined]
    plain = decode(backend, backend._chat_ids([{"role": "user", "content": "hi"}]))  # type: ignore[attr-defined]
    assert "get_weather" in with_tools and "<tool_call>" in with_tools and "get_weather" not in plain
    (bad,) = serve(backend, [chat("hi", tools=[{"type": "function", "function": {"name": ""}}])])
    assert bad.code is ErrorCode.BAD_REQUEST and "tools[0].function.name" in bad.message


def test_prompt_beyond_the_context_is_a_bad_request(backend: Backend) -> None:
    too_long, too_much, fits = serve(
        backend,
        [
            complete("1 2 3 4 5 6 7 8 9 10 " * 20),
            complete("hello", max_tokens=TINY_CONTEXT),
            complete("hello", max_tokens=4),
        ],
    )
    # OpenAI's words for it, which clients recognise (litellm's ContextWindowExceededError)
    assert too_long.code is ErrorCode.BAD_REQUEST
    assert too_long.message.startswith("This model's maximum context length is 96 tokens. However, your messages")
    assert too_much.code is ErrorCode.BAD_REQUEST
    assert too_much.message.startswith("This model's maximum context length is 96 tokens. However, you requested")
    assert "in the messages, 96 in the completion" in too_much.message
    assert fits.code is None


def test_default_max_tokens_shrinks_to_fit_the_context(backend: Backend) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    outcome = alone(backend, complete(prompt))
    assert outcome.meta is not None
    usage = outcome.meta["usage"]
    assert outcome.meta["finish_reason"] == "length"
    assert usage["total_tokens"] == TINY_CONTEXT


@pytest.mark.parametrize(
    ("params", "complaint"),
    [
        ({"max_tokens": -1}, "max_tokens must be >= 1"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": "ten"}, "max_tokens must be an integer"),
        ({"max_tokens": 10**9}, "above this node's limit"),
        ({"temperature": -0.5}, "temperature must be between 0 and 100"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": -0.1}, "top_p must be between 0 and 1"),
        ({"top_p": 1.5}, "top_p must be between 0 and 1"),
        ({"top_k": -3}, "top_k must be >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
        ({"stop": [""]}, "stop strings must be 1 to 256 characters long"),
    ],
)
def test_bad_params_are_bad_requests_and_spare_the_batch_mates(
    backend: Backend, params: dict[str, Any], complaint: str
) -> None:
    bad, good = serve(backend, [complete("hello", **params), complete("hello", max_tokens=3)])
    assert bad.code is ErrorCode.BAD_REQUEST
    assert complaint in bad.message
    assert good.code is None and good.meta is not None and good.meta["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("task", "value", "complaint"),
    [
        (Task.CHAT, "hello", "chat input must be a non-empty list"),
        (Task.CHAT, [], "chat input must be a non-empty list"),
        (Task.CHAT, [{"content": "hi"}], "message 0 must be a map with a string 'role'"),
        (Task.CHAT, [{"role": "user", "content": 3}], "message 0 needs 'content' as a string"),
        (Task.COMPLETE, ["hello"], "complete input must be a prompt string"),
        (Task.EMBED, "hello", "serves chat and complete, not embed"),
    ],
)
def test_malformed_input_is_a_bad_request(backend: Backend, task: Task, value: Any, complaint: str) -> None:
    (outcome,) = serve(backend, [Request(id="x", model="tiny", task=task, input=value)])
    assert outcome.code is ErrorCode.BAD_REQUEST
    assert complaint in outcome.message


def test_chat_accepts_openai_style_text_parts(backend: Backend) -> None:
    parts = Request(
        id="p",
        model="tiny",
        task=Task.CHAT,
        input=[{"role": "user", "content": [{"type": "text", "text": "hello, "}, {"type": "text", "text": "you"}]}],
        params={"max_tokens": 6},
    )
    assert alone(backend, parts).text == alone(backend, chat("hello, you", max_tokens=6)).text


def test_stream_chunks_concatenate_to_the_final_output(backend: Backend) -> None:
    for request in (
        chat("東京 and 大阪 ☕ 🚀", max_tokens=40, stream=True),
        complete("Zürich, São Paulo, Kraków", max_tokens=40, stream=True, temperature=1.0, seed=3),
    ):
        streamed = alone(backend, request)
        assert streamed.chunks and all(isinstance(c, str) and c for c in streamed.chunks)
        assert "".join(streamed.chunks) == streamed.text
        plain = Request(**{**_fields(request), "stream": False})
        unstreamed = alone(backend, plain)
        assert unstreamed.chunks == [] and unstreamed.text == streamed.text


def _fields(request: Request) -> dict[str, Any]:
    return {name: getattr(request, name) for name in Request.__dataclass_fields__}


def reference_greedy(backend: Backend, request: Request, n: int) -> list[int]:
    """The tokens each engine's own library picks greedily: an independent check of our decode loops.

    transformers: its `generate()`. onnx: onnxruntime-genai's `Generator` on the same built model.
    """
    prompt = backend._chat_ids(request.input)  # type: ignore[attr-defined]
    if isinstance(backend, TransformersChat):
        import torch

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = backend._model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0
            )
        return [int(t) for t in out[0, ids.shape[1] :]]
    requires("onnxruntime_genai")
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(backend.model_dir))  # type: ignore[attr-defined]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    tokens = []
    while len(tokens) < n and not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_greedy_decode_matches_the_engines_own_library(backend: Backend) -> None:
    request = chat("hello, how are you?", max_tokens=24)
    expected = decode(backend, reference_greedy(backend, request, 24))
    assert alone(backend, request).text == expected


def test_prefix_continuation_equals_the_uninterrupted_output(backend: Backend) -> None:
    """A node taking over a stream gets the text already sent and produces exactly the rest."""
    request = chat("hello, how are you?", max_tokens=24)
    full = alone(backend, request)
    tokens = reference_greedy(backend, request, 24)
    # The new node re-tokenizes the prefix text. A random model's tokens are often not the canonical
    # tokenization of its own text (a trained model's are, see the SmolLM2 test), so cut where they are.
    cut = next(
        k
        for k in range(len(tokens) // 2, 0, -1)
        if encode(backend, decode(backend, tokens[:k])) == tokens[:k] and "\ufffd" not in decode(backend, tokens[:k])
    )
    prefix = decode(backend, tokens[:cut])
    assert full.text.startswith(prefix)
    resumed = alone(backend, Request(**{**_fields(request), "stream": True, "prefix": prefix}))
    assert resumed.text == full.text
    assert prefix + "".join(resumed.chunks) == full.text
    assert resumed.meta == full.meta


def test_prefix_that_used_the_whole_budget_finishes_at_once(backend: Backend) -> None:
    outcome = alone(backend, complete("hello", max_tokens=2, prefix="one two three four", stream=True))
    assert outcome.text == "one two three four"
    assert outcome.chunks == []
    assert outcome.meta is not None and outcome.meta["finish_reason"] == "length"


def test_expired_job_is_answered_without_running(backend: Backend) -> None:
    (outcome,) = serve(backend, [complete("hello", max_tokens=5)], timeout=-1.0)
    assert outcome.code is ErrorCode.DEADLINE_EXCEEDED


def test_job_expiring_mid_stream_stops_while_its_batch_mate_goes_on(backend: Backend) -> None:
    def expire_after_three_chunks(job: Job, outcome: Outcome) -> None:
        if len(outcome.chunks) == 3:
            job.deadline = 0.0  # the monotonic clock is past it

    streaming, mate = Outcome(), Outcome()
    mate_request = complete("The quick brown fox", max_tokens=30)
    backend.run(
        [
            make_job(complete("hello", max_tokens=60, stream=True), streaming, on_chunk=expire_after_three_chunks),
            make_job(mate_request, mate),
        ]
    )
    assert streaming.code is ErrorCode.DEADLINE_EXCEEDED
    assert len(streaming.chunks) == 3
    assert mate.code is None and mate.text == alone(backend, mate_request).text


def test_a_model_failure_fails_its_requests_with_internal_and_the_lane_serves_on(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> Any:
        raise RuntimeError("CUDA error: device-side assert triggered")

    with monkeypatch.context() as patch:
        if isinstance(backend, TransformersChat):
            patch.setattr(backend, "_forward", broken)
        else:
            patch.setattr(backend._runner, "_run", broken)  # type: ignore[attr-defined]
        outcomes = through_a_lane(backend, [complete("hello"), chat("hi", stream=True), complete("x", max_tokens=-1)])
    assert [o.code for o in outcomes] == [ErrorCode.INTERNAL, ErrorCode.INTERNAL, ErrorCode.BAD_REQUEST]
    assert "device-side assert" in outcomes[0].message
    (after,) = through_a_lane(backend, [complete("hello", max_tokens=3)])  # the model is fine again
    assert after.code is None and after.text


def test_backend_describes_itself_for_the_mesh(backend: Backend) -> None:
    assert backend.describe()["tasks"] == ["chat", "complete"]
    assert backend.labels["gpu"] in ("true", "false")
    assert backend.loaded_from in ("folder", "build", "cache")  # type: ignore[attr-defined]
