"""How a node's refusal reads through the HTTP gateway: as OpenAI sends the same refusal, so clients raise the
error type they raise for OpenAI (openai-python's BadRequestError with its code, litellm's
ContextWindowExceededError on "This model's maximum context length is", langchain-openai's ContextOverflowError
on "prompt is too long": openai-python's exception text holds the message, not the code)."""

from __future__ import annotations

import pytest

from mesh import BadRequest

pytest.importorskip("fastapi")

from nodes.api.errors import api_error  # noqa: E402
from nodes.models.backends.textgen import Sampling, token_budget  # noqa: E402


def _refusal(max_tokens: int | None) -> str:
    sampling = Sampling.from_params({"max_tokens": max_tokens} if max_tokens else {}, 8192)
    with pytest.raises(ValueError) as refused:
        token_budget(sampling, n_prompt=9000 if max_tokens is None else 100, n_prefix=0, context=8192)
    return str(refused.value)


def test_a_prompt_over_the_context_is_context_length_exceeded_on_messages() -> None:
    error = api_error(BadRequest(_refusal(None))).detail
    assert (error.code, error.param, error.type) == ("context_length_exceeded", "messages", "invalid_request_error")
    assert error.message == (
        "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens: "
        "the prompt is too long. Please reduce the length of the messages."
    )


def test_max_tokens_past_the_context_says_how_the_tokens_add_up() -> None:
    error = api_error(BadRequest(_refusal(8100))).detail
    assert (error.code, error.param) == ("context_length_exceeded", "messages")
    assert "you requested 8200 tokens (100 in the messages, 8100 in the completion)" in error.message


def test_on_completions_it_names_the_prompt() -> None:
    error = api_error(BadRequest(_refusal(None)), prompt_param="prompt").detail
    assert (error.code, error.param) == ("context_length_exceeded", "prompt")
    assert "your prompt resulted in 9000 tokens" in error.message and "messages" not in error.message


def test_other_refusals_keep_their_param() -> None:
    error = api_error(BadRequest("max_tokens 5000 is above this node's limit of 4096")).detail
    assert (error.code, error.param) == ("bad_request", "max_tokens")
