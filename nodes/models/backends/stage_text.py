"""What the ends of a pipeline know of a request's text: the first stage reads it (template, tokens, budget) and
writes the answer (`TextRow`: stream, stop strings, usage); the last stage only chooses tokens (sampling, grammar).

A try that continues a failed chain gets the exact tokens that chain generated (`Request.prefix_ids`): they are read
after the prompt one decode step each, as they were first made (read as a prompt chunk instead, their keys and values
differ in the last bits and a near tie can go the other way), and the answer's text state is rebuilt by detokenizing
them, so the stream goes on exactly after the last character the caller has, with the tokens the unbroken run would
have made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import Request, Task

from .chat_template import ChatTemplate, TemplateError
from .guidance import GrammarTokenizer, Matcher, parse_guidance
from .textgen import Detokenizer, Sampling, TextRow, chat_messages, heal_prefix, token_budget
from .tools import check_tools, with_tools

if TYPE_CHECKING:
    import numpy as np


@dataclass
class PromptRead:
    """A request as the first stage reads it: every token to read before the first new one, and its answer."""

    tokens: list[int]  # read as the prompt (in chunks)
    text: TextRow
    need: int  # key/value tokens it may hold: its tokens and every one it may still write
    heal_ids: list[int] | None  # the first new token must be one of these (a prefix taken back by token healing)
    prefix: list[int]  # the tokens of the answer so far (a grammar is that far)
    replay: list[int]  # of which those a failed chain generated: read one decode step each after the prompt


class Emitter:
    """The job as the first stage's `TextRow` sees it: each streamed piece carries the ids of the tokens generated
    since the previous piece ({"text", "tokens"}), so the entry can replay them exactly if a stage fails. The entry
    passes only the text on to the caller."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.unsent: list[int] = []

    @property
    def request(self) -> Request:
        return self.job.request

    def emit(self, text: str) -> None:
        tokens, self.unsent = self.unsent, []
        self.job.emit({"text": text, "tokens": tokens})

    def finish(self, output: Any, meta: dict[str, Any] | None = None) -> None:
        self.job.finish(output, meta)


class PromptReader:
    """The first stage's tokenizer and chat template."""

    def __init__(self, model: str, tokenizer: Any, template: ChatTemplate | None, vocab_size: int, context: int,
                 max_tokens_limit: int) -> None:  # fmt: skip
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.vocab_size = vocab_size
        self.context = context
        self.max_tokens_limit = max_tokens_limit
        self._vocab: list[str] | None = None

    def read(self, emitter: Emitter) -> PromptRead:
        """ValueError (the request is at fault) with a message for the caller."""
        req = emitter.request
        sampling = Sampling.from_params(req.params, self.max_tokens_limit)
        parse_guidance(req.params)  # refused here, at once, if malformed (the last stage compiles it)
        if req.task is Task.CHAT:
            tools = check_tools(req.params["tools"]) if req.params.get("tools") is not None else None
            prompt = self._chat_ids(req.input, tools)
        elif req.task is Task.COMPLETE:
            if not isinstance(req.input, str):
                raise ValueError(f"complete input must be a prompt string, got {type(req.input).__name__}")
            prompt = self.encode(req.input, special=True)
            if not prompt:
                raise ValueError("the prompt is empty")
        else:
            raise ValueError(f"model {self.model} serves chat and complete, not {req.task.value}")
        heal = None
        if req.prefix_ids:  # a failed chain's exact tokens
            prefix = list(req.prefix_ids)
            if max(prefix) >= self.vocab_size:
                raise ValueError(f"prefix_ids must be below the vocabulary size {self.vocab_size}")
        else:
            prefix = self.encode(req.prefix, special=False) if req.prefix else []
            heal = heal_prefix(req.prefix, prefix, self.decode, self._vocab_text)
            if heal is not None:
                prefix.pop()
        budget = token_budget(sampling, len(prompt), len(prefix), self.context)
        if req.prefix_ids:
            detokenizer = Detokenizer(self.decode, prompt)
            generated = "".join(detokenizer.push(t) for t in prefix)
            text = TextRow(emitter, sampling, budget, detokenizer, None)  # type: ignore[arg-type]  # a Job's face
            # What the failed chain had generated but not yet sent (held back: a stop string may be starting).
            text.text = generated[len(req.prefix) :] if generated.startswith(req.prefix) else ""
        else:
            text = TextRow(emitter, sampling, budget, Detokenizer(self.decode, prompt + prefix), heal)  # type: ignore[arg-type]
        # Exact tokens are read as they were made (a decode step each: the same numbers, so the same next token);
        # a prefix known only as text is read with the prompt.
        tokens, replay = (prompt, prefix) if req.prefix_ids else (prompt + prefix, [])
        need = len(prompt) + len(prefix) + max(budget.new_tokens, 0)
        return PromptRead(tokens, text, need, heal[1] if heal else None, prefix, replay)

    def _chat_ids(self, messages: Any, tools: list[dict[str, Any]] | None) -> list[int]:
        clean: list[dict[str, Any]] = chat_messages(messages)
        if self.template is None:
            raise ValueError(f"model {self.model} has no chat template; send task 'complete' with a prompt")
        if tools and "tools" not in self.template.source:
            clean, tools = with_tools(clean, tools), None
        try:
            prompt = self.template.render(clean, tools=tools)
        except TemplateError as exc:
            raise ValueError(f"the chat template of {self.model} refused these messages: {exc}") from None
        ids = self.encode(prompt, special=False)
        if not ids:
            raise ValueError("the chat prompt is empty")
        return ids

    def encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _vocab_text(self) -> list[str]:
        if self._vocab is None:
            self._vocab = [str(t) for t in self.tokenizer.decode_batch([[i] for i in range(self.vocab_size)])]
        return self._vocab


def grammar_tokenizer(folder: Path, eos: frozenset[int], vocab_size: int) -> GrammarTokenizer:
    """The last stage's vocabulary for grammars, read when the first request with one comes (its tokenizer is
    held for nothing else there)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return GrammarTokenizer(tokenizer.to_str(), eos, vocab_size)


@dataclass
class Chooser:
    """How the last stage picks one sequence's tokens (what `token_choice.pick_tokens` reads)."""

    text: Tally
    rng: np.random.Generator | None = None
    heal_ids: list[int] | None = None
    matcher: Matcher | None = None


@dataclass
class Tally:
    """What the last stage knows of an answer's length: its budget of new tokens (the first stage's count) and how
    many it chose so far, so a grammar closes the answer in time."""

    sampling: Sampling
    budget: int
    generated: int = 0


def make_chooser(req: Request, max_tokens_limit: int, grammar: GrammarTokenizer | None,
                 heal_ids: list[int] | None, prefix: list[int], budget: int) -> Chooser:  # fmt: skip
    """The last stage's chooser for a request whose answer so far is `prefix` and which may write `budget` more
    tokens (its grammar compiled: call off the engine thread when it has one). ValueError when the request is at
    fault."""
    import numpy as np

    sampling = Sampling.from_params(req.params, max_tokens_limit)
    chooser = Chooser(Tally(sampling, budget), heal_ids=heal_ids)
    if not sampling.greedy:
        chooser.rng = np.random.default_rng(sampling.seed % (2**63) if sampling.seed is not None else None)
    guidance = parse_guidance(req.params)
    if guidance is not None:
        if grammar is None:
            raise ValueError("this stage cannot read grammars (no tokenizer)")
        chooser.matcher = grammar.matcher(*guidance)
        if prefix:
            chooser.matcher.consume(prefix)
    return chooser
