"""Constrained answers end whole: a grammar-bound answer that is about to run out of tokens is steered to close
its structure within max_tokens (nodes/models/backends/guidance.py), so a model that rambles inside a JSON string
still hands out a complete tool call or JSON answer, never half of one.

The "model" here is a stubborn one: it wants to write a given text (as greedy SmolLM2 writes
`"tz": "local_time_local_time_...`) and then to end its turn, and takes the first token the grammar allows
whenever its own is refused.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from nodes.api.structured_output import AnswerShape, FunctionTool

llguidance = pytest.importorskip("llguidance")
tokenizers = pytest.importorskip("tokenizers")
np = pytest.importorskip("numpy")

from nodes.models.backends.guidance import GrammarTokenizer, parse_guidance  # noqa: E402

CLOCK = FunctionTool("get_time", {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]})
PLACE = FunctionTool(
    "find_place",
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "where": {
                "type": "object",
                "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"],
            },
        },
        "required": ["name", "tags", "where"],
    },
)
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def grammar_tokenizer() -> GrammarTokenizer:
    """A byte-level BPE tokenizer (every byte is a token, and some words and JSON pieces are too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        '<tool_call>{"name": "get_time", "arguments": {"tz": "local_time"}}</tool_call>',
        '{"name": "Paris", "tags": ["city", "capital"], "where": {"lat": 48.85, "lon": 2.35}}',
        "local_time local_time_local_time a cat is a small animal with whiskers",
    ]
    bpe.train_from_iterator(corpus * 8, trainer)
    eos = bpe.token_to_id(EOS)
    return GrammarTokenizer(bpe.to_str(), frozenset({eos}), bpe.get_vocab_size())


def _generate(
    grammar_tokenizer: GrammarTokenizer, guidance: dict[str, Any], wants: str, max_tokens: int, **allowed: Any
) -> tuple[str, str]:
    """(the answer, its finish reason) from a model that writes `wants` as far as the grammar lets it, then ends."""
    llg, _ = grammar_tokenizer._get()
    matcher = grammar_tokenizer.matcher(*parse_guidance({"guidance": guidance, "max_tokens": max_tokens}))  # type: ignore[misc]
    script = [*llg.tokenize_str(wants), *grammar_tokenizer.eos]
    written: list[int] = []
    i = 0
    while len(written) < max_tokens:
        mask = matcher.allowed(tokens_left=max_tokens - len(written)) if allowed else matcher.allowed()
        want = script[min(i, len(script) - 1)]
        if mask[want]:
            token, i = want, i + 1
        else:
            token = int(np.flatnonzero(mask)[0])
        if token in grammar_tokenizer.eos:
            return bytes(llg.decode_bytes(written)).decode(), "stop"
        matcher.consume([token])
        written.append(token)
        if matcher.finished:
            return bytes(llg.decode_bytes(written)).decode(), "stop"
    return bytes(llg.decode_bytes(written)).decode(), "length"


def _call(text: str) -> dict[str, Any]:
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>"), text
    call = json.loads(text[len("<tool_call>") : -len("</tool_call>")])
    assert isinstance(call, dict)
    return call


@pytest.mark.parametrize("calls", ["required", "optional"])
def test_a_call_whose_argument_runs_on_is_closed_within_max_tokens(
    grammar_tokenizer: GrammarTokenizer, calls: str
) -> None:
    guidance = AnswerShape((), (CLOCK,), calls).guidance()  # type: ignore[arg-type]
    assert guidance is not None
    rambling = '<tool_call>{"name": "get_time", "arguments": {"tz": "' + "local_time_" * 40
    text, finish = _generate(grammar_tokenizer, guidance, rambling, max_tokens=96)
    assert finish == "stop"
    call = _call(text)
    assert call["name"] == "get_time" and call["arguments"]["tz"].startswith("local_time_local_time_")


def test_a_string_of_characters_split_across_tokens_is_closed_on_a_whole_character(
    grammar_tokenizer: GrammarTokenizer,
) -> None:
    guidance = AnswerShape((), (CLOCK,), "required").guidance()
    assert guidance is not None
    rambling = '<tool_call>{"name": "get_time", "arguments": {"tz": "' + "東京 Zürich " * 40  # a byte a token
    for max_tokens in range(60, 72):
        text, finish = _generate(grammar_tokenizer, guidance, rambling, max_tokens=max_tokens)
        assert finish == "stop", (max_tokens, text)
        assert _call(text)["arguments"]["tz"].startswith("東京")


def test_required_keys_and_nested_objects_are_filled_in_to_close(grammar_tokenizer: GrammarTokenizer) -> None:
    guidance = AnswerShape((), (PLACE,), "required").guidance()
    assert guidance is not None
    rambling = '<tool_call>{"name": "find_place", "arguments": {"name": "' + "a cat is a small animal " * 20
    text, finish = _generate(grammar_tokenizer, guidance, rambling, max_tokens=120)
    assert finish == "stop"
    arguments = _call(text)["arguments"]
    assert set(arguments) == {"name", "tags", "where"} and len(arguments["tags"]) >= 2
    assert set(arguments["where"]) == {"lat", "lon"}


def test_any_json_object_closes_and_the_engine_may_count_the_tokens_itself(
    grammar_tokenizer: GrammarTokenizer,
) -> None:
    guidance = {"type": "json_schema", "grammar": {"type": "object", "additionalProperties": True}}
    rambling = '{"name": "Whiskers", "toys": [{"kind": "ball", "tags": [' + '"a", ' * 60
    for counted_by_engine in (False, True):
        options = {"tokens_left": True} if counted_by_engine else {}
        text, finish = _generate(grammar_tokenizer, guidance, rambling, max_tokens=40, **options)
        assert finish == "stop" and isinstance(json.loads(text), dict), text


def test_an_answer_that_fits_is_left_alone(grammar_tokenizer: GrammarTokenizer) -> None:
    guidance = AnswerShape((), (CLOCK,), "required").guidance()
    assert guidance is not None
    wanted = '<tool_call>{"name": "get_time", "arguments": {"tz": "local_time"}}</tool_call>'
    text, finish = _generate(grammar_tokenizer, guidance, wanted, max_tokens=96)
    assert (text, finish) == (wanted, "stop")


def test_no_further_call_is_begun_that_could_not_be_finished(grammar_tokenizer: GrammarTokenizer) -> None:
    guidance = AnswerShape((), (CLOCK,), "required").guidance()
    assert guidance is not None
    one = '<tool_call>{"name": "get_time", "arguments": {"tz": "local_time"}}</tool_call>'
    text, finish = _generate(grammar_tokenizer, guidance, one * 10, max_tokens=60)
    assert finish == "stop"
    calls = text.split("</tool_call>")
    assert calls[-1] == "" and len(calls) >= 2 and all(_call(c + "</tool_call>") for c in calls[:-1])


def test_a_budget_too_small_for_any_whole_answer_still_ends_at_max_tokens(
    grammar_tokenizer: GrammarTokenizer,
) -> None:
    guidance = AnswerShape((), (PLACE,), "required").guidance()
    assert guidance is not None
    text, finish = _generate(grammar_tokenizer, guidance, "<tool_call>", max_tokens=6)
    assert finish == "length" and text.startswith("<tool_call>")
