"""Grammar-constrained decoding: params["guidance"] (a JSON schema, a regex or a Lark grammar) compiled by
llguidance into a mask of the tokens that may come next, so every answer is well-formed whatever the model.

    {"type": "json_schema", "grammar": {...schema...}}   (or the schema as a JSON string)
    {"type": "regex", "grammar": "[0-9]{3}"}
    {"type": "lark", "grammar": "start: ..."}            (llguidance's Lark, with %json{...} for embedded schemas)
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

KINDS = ("json_schema", "regex", "lark")
MAX_GRAMMAR_CHARS = 256 * 1024
# JSON as `{"a": 1, "b": [2, 3]}`: no free whitespace (a small model can otherwise pad it until max_tokens), and
# schema keywords llguidance does not enforce (format, ...) are ignored rather than refused.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": True}


def parse_guidance(params: dict[str, Any]) -> tuple[str, str] | None:
    """The (type, grammar text) a request asks for, or None; ValueError (for the client) when malformed."""
    spec = params.get("guidance")
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise ValueError(f"guidance must be {{type: {' | '.join(KINDS)}, grammar: ...}}")
    grammar = spec.get("grammar")
    if spec["type"] == "json_schema" and isinstance(grammar, dict | bool):
        grammar = json.dumps(grammar)
    if not isinstance(grammar, str) or not grammar:
        raise ValueError("guidance.grammar must be a non-empty string (or a JSON schema object)")
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise ValueError(f"guidance.grammar is longer than {MAX_GRAMMAR_CHARS} characters")
    return spec["type"], grammar


class GrammarTokenizer:
    """A model's tokenizer as llguidance needs it; built once per model on first use (~1 s)."""

    def __init__(self, tokenizer_json: str, eos: frozenset[int], vocab_size: int) -> None:
        self._json = tokenizer_json
        self._eos = sorted(eos)
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    from llguidance import LLTokenizer
                except ImportError:
                    raise ValueError("this node cannot constrain output: pip install 'lanmesh[models]'") from None
                self._tokenizer = LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._tokenizer

    def matcher(self, kind: str, grammar: str) -> Matcher:
        """A fresh matcher for one generation; ValueError (for the client) when the grammar is invalid."""
        from llguidance import LLMatcher

        tokenizer = self._get()
        if kind == "json_schema":
            try:
                compiled = LLMatcher.grammar_from_json_schema(grammar, defaults=JSON_STYLE)  # type: ignore[arg-type]
            except ValueError as exc:
                raise ValueError(f"guidance: not a JSON schema: {exc}") from None
        elif kind == "regex":
            compiled = LLMatcher.grammar_from_regex(grammar)
        else:
            compiled = LLMatcher.grammar_from_lark(grammar)
        problem = LLMatcher.validate_grammar(compiled, tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise ValueError(f"guidance: invalid {kind}: {problem}")
        return Matcher(LLMatcher(tokenizer, compiled, log_level=0), self.vocab_size)


class Matcher:
    """Where one generation is in its grammar: which tokens may come next."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher
        self._vocab = vocab_size

    def allowed(self) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens the grammar allows next."""
        import numpy as np

        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool)

    def consume(self, tokens: list[int]) -> None:
        if not self._m.consume_tokens(tokens):
            raise ValueError(f"guidance: the text does not fit the grammar ({self._m.get_error()})")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the answer ends here)."""
        return bool(self._m.is_stopped())
