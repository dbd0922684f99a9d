"""What every text-generation backend shares: request settings, text deltas, stop strings, streams and the answer.

The engines (`onnx_chat`, `transformers_chat`) differ in how they compute the next token; what a caller sees of
a generation (its text, its stream, where it stops, its usage counts) is decided here, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from protocol import Task

from .base import Job

# Sampling defaults. Greedy by default: the same request gives the same text on any node, which is what a
# stream that fails over to another node needs to continue seamlessly. Ask for temperature > 0 to sample.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_TOKENS_LIMIT = 4096  # a node-side cap on max_tokens; requests above it are refused, not clamped
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# Below this temperature sampling is indistinguishable from greedy, and dividing logits by it overflows
# (OpenAI accepts any temperature >= 0, e.g. 6.6e-290): such requests are served greedily.
GREEDY_BELOW = 1e-4
_DETOKENIZE_CONTEXT = 5  # tokens of context kept when decoding deltas (some tokenizers strip a leading space)


@dataclass(frozen=True)
class Sampling:
    """Per-request generation settings, validated from `Request.params` (unknown keys are ignored)."""

    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS, shortened to fit the context
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: no top-k cut
    seed: int | None
    stop: tuple[str, ...]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @classmethod
    def from_params(cls, params: Any, max_tokens_limit: int) -> Sampling:
        """Raises ValueError with a message fit for the client on any bad value."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(f"params must be a map, got {type(params).__name__}")
        max_tokens = _optional_int(params, "max_tokens")
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
            if max_tokens > max_tokens_limit:
                raise ValueError(f"max_tokens {max_tokens} is above this node's limit of {max_tokens_limit}")
        temperature = _optional_float(params, "temperature")
        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        if not 0 <= temperature <= 100:
            raise ValueError(f"temperature must be between 0 and 100, got {temperature:g}")
        top_p = _optional_float(params, "top_p")
        top_p = 1.0 if top_p is None else top_p
        if not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be between 0 and 1, got {top_p:g}")
        top_k = _optional_int(params, "top_k")
        top_k = 0 if top_k is None else top_k
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        seed = _optional_int(params, "seed")
        if top_p == 0:  # keep only the most likely token (OpenAI accepts 0): greedy
            temperature = 0.0
        return cls(max_tokens, 0.0 if temperature < GREEDY_BELOW else temperature, top_p, top_k, seed,
                   _stop_strings(params.get("stop")))  # fmt: skip


def _optional_int(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
    return value


def _optional_float(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {type(value).__name__} {value!r}")
    return float(value)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise ValueError("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        raise ValueError(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long")
    return tuple(stops)


def message_text(content: Any, index: int) -> str:
    """A message's text: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"message {index}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise ValueError(f"message {index} needs 'content' as a string")


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """The {role, content} list a chat template renders, checked; raises ValueError for the client."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat input must be a non-empty list of {role, content} messages")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} must be a map with a string 'role'")
        clean.append({"role": message["role"], "content": message_text(message.get("content"), i)})
    return clean


class Detokenizer:
    """Turns tokens into text deltas whose concatenation is exactly the decoded text.

    Decodes a small sliding window and holds text back while it ends in U+FFFD (a multi-byte character
    split across tokens), so a delta never contains half a character. `decode(ids)` must skip special tokens.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(context[-_DETOKENIZE_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


def heal_prefix(
    prefix: str, prefix_ids: list[int], decode: Callable[[list[int]], str], vocab: Callable[[], list[str]]
) -> tuple[str, list[int]] | None:
    """Token healing for a taken-over stream: which text the prefix's last token stands for, and which
    tokens may re-produce it.

    The text a failed node streamed may end where its tokenizer would not cut (e.g. "is " before
    " Paris"): re-tokenized, that ending is a token the model rarely saw there, and it derails. Taking
    the last token back and letting the model choose any token that starts with its text continues as
    if it had never stopped. None when healing does not apply (no prefix; a tokenizer whose single
    tokens do not decode to their text in context, such as sentencepiece's leading spaces).
    """
    if not prefix_ids:
        return None
    head = decode(prefix_ids[:-1])
    tail = prefix[len(head) :]
    if not prefix.startswith(head) or not tail or decode(prefix_ids[-1:]) != tail:
        return None
    return tail, [i for i, text in enumerate(vocab()) if text.startswith(tail)]


@dataclass(frozen=True)
class Budget:
    """How many tokens a generation reads and may still write, checked against the model's context."""

    prompt_tokens: int
    prefix_tokens: int
    new_tokens: int  # this node may generate at most this many (after the prefix a failed node sent)


# How a refusal for a prompt over the context begins: OpenAI's words, which clients recognise (litellm raises its
# ContextWindowExceededError on them, langchain-openai its ContextOverflowError on "prompt is too long", since
# openai-python's exception text holds the message and not the code); the gateway answers it as OpenAI's
# `context_length_exceeded`.
CONTEXT_EXCEEDED = "This model's maximum context length is"


def token_budget(sampling: Sampling, n_prompt: int, n_prefix: int, context: int) -> Budget:
    """Raises ValueError (for the client) when the prompt, or prompt + max_tokens, does not fit the context."""
    n_context = n_prompt + n_prefix
    if n_context >= context:
        full = ", which leaves no room for the completion" if n_context == context else ""
        raise ValueError(
            f"{CONTEXT_EXCEEDED} {context} tokens. However, your messages resulted in {n_context} tokens{full}: "
            "the prompt is too long. Please reduce the length of the messages."
        )
    if sampling.max_tokens is None:
        total = min(DEFAULT_MAX_TOKENS, context - n_prompt)
    elif n_prompt + sampling.max_tokens > context:
        raise ValueError(
            f"{CONTEXT_EXCEEDED} {context} tokens. However, you requested {n_prompt + sampling.max_tokens} tokens "
            f"({n_prompt} in the messages, {sampling.max_tokens} in the completion): the prompt is too long for "
            "that completion. Please reduce the length of the messages or completion."
        )
    else:
        total = sampling.max_tokens
    # max_tokens counts the whole completion, including what a failed node already streamed.
    return Budget(n_prompt, n_prefix, min(total - n_prefix, context - n_context))


class TextRow:
    """One job's text as it is generated: stop strings, stream chunks, token healing, and the final answer."""

    def __init__(
        self,
        job: Job,
        sampling: Sampling,
        budget: Budget,
        detokenizer: Detokenizer,
        heal: tuple[str, list[int]] | None = None,
    ) -> None:
        self.job = job
        self.sampling = sampling
        self.prompt_tokens = budget.prompt_tokens
        self.cached_tokens: int | None = None  # prompt tokens an engine with a prefix cache did not read again
        self.prefix_tokens = budget.prefix_tokens
        self.budget = budget.new_tokens
        self.generated = 0
        self.text = ""  # newly generated text (after the prefix)
        # Token healing: the prefix's last token was taken back; the first new token must re-produce its
        # text (`heal[0]`, not emitted again) and is one of `heal[1]`.
        self.heal_ids = heal[1] if heal else None
        self.skip = len(heal[0]) if heal else 0
        self.emitted = 0  # how much of `text` went out as stream chunks
        self.detokenizer = detokenizer
        self.max_stop = max((len(s) for s in sampling.stop), default=0)

    def add_text(self, delta: str) -> bool:
        """Append decoded text; True if a stop string appeared (the text is then cut before it)."""
        if self.skip and delta:
            cut = min(self.skip, len(delta))
            delta, self.skip = delta[cut:], self.skip - cut
        if not delta:
            return False
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.sampling.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def end(self, model: str) -> None:
        """The answer is complete (end of turn, or its grammar allows nothing more): send what is held back."""
        self.add_text(self.detokenizer.flush())
        self.finish("stop", model)

    def advance(self, token: int, eos: frozenset[int], model: str) -> bool:
        """Take one new token; False when the row is finished (and answered)."""
        if token in eos:
            self.end(model)
            return False
        self.generated += 1
        if self.add_text(self.detokenizer.push(token)):
            self.finish("stop", model)
            return False
        if self.generated >= self.budget:
            stopped = self.add_text(self.detokenizer.flush())
            self.finish("stop" if stopped else "length", model)
            return False
        self.stream_ready()
        return True

    def stream_ready(self) -> None:
        """Send what can no longer turn into a stop string."""
        if not self.job.request.stream:
            return
        hold = 0
        for stop in self.sampling.stop:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        if end > self.emitted:
            self.job.emit(self.text[self.emitted : end])
            self.emitted = end

    def finish(self, reason: str, model: str) -> None:
        job = self.job
        if job.request.stream and len(self.text) > self.emitted:
            job.emit(self.text[self.emitted :])
            self.emitted = len(self.text)
        text = job.request.prefix + self.text
        output: Any = {"role": "assistant", "content": text} if job.request.task is Task.CHAT else text
        completion = self.prefix_tokens + self.generated
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }
        if self.cached_tokens is not None:
            usage["cached_tokens"] = min(self.cached_tokens, self.prompt_tokens)
        job.finish(output, {"model": model, "finish_reason": reason, "usage": usage})
