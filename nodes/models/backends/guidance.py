"""Grammar-constrained decoding: params["guidance"] (a JSON schema, a regex or a Lark grammar) compiled by
llguidance into a mask of the tokens that may come next, so every answer is well-formed whatever the model.

    {"type": "json_schema", "grammar": {...schema...}}   (or the schema as a JSON string)
    {"type": "regex", "grammar": "[0-9]{3}"}
    {"type": "lark", "grammar": "start: ..."}            (llguidance's Lark, with %json{...} for embedded schemas)

A grammar alone does not make an answer complete: a model may write `{"tz": "local_time_local_time_...` until
max_tokens cuts it, and half a JSON object is no answer. So a `Matcher` also closes the answer in time: it keeps
the shortest way it can find to a complete answer, and once that needs all the tokens left (but one, for the end
of the turn), it allows only tokens along that way (`Matcher.allowed(tokens_left)`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from .textgen import DEFAULT_MAX_TOKENS

if TYPE_CHECKING:
    import numpy as np

KINDS = ("json_schema", "regex", "lark")
MAX_GRAMMAR_CHARS = 256 * 1024
# JSON as `{"a": 1, "b": [2, 3]}`: no free whitespace (a small model can otherwise pad it until max_tokens), and
# schema keywords llguidance does not enforce (format, ...) are ignored rather than refused.
JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": True}

# Closing an answer in time. The way to a complete answer is searched for at every token once it may soon be
# needed (within CLOSE_LOOKAHEAD tokens of the budget's end) and every CLOSE_RECHECK tokens before that; a search
# tries at most CLOSE_TRIES bytes (each ~1-2 us in llguidance). Steering starts CLOSE_MARGIN tokens before the
# way needs every token left, so that one token opening more structure just then does not leave it too late.
CLOSE_LOOKAHEAD = 32
CLOSE_RECHECK = 8
CLOSE_TRIES = 4000
CLOSE_MARGIN = 8
_MAX_TOKEN_BYTES = 32  # longer tokens are not looked up along the way (none of them closes anything)


class Guidance(NamedTuple):
    """What params["guidance"] asks for: the grammar, and the most tokens its answer may take."""

    kind: str
    grammar: str
    max_tokens: int | None = None  # the request's max_tokens (or the default): the matcher closes the answer in it


def parse_guidance(params: dict[str, Any]) -> Guidance | None:
    """The grammar a request asks for, or None; ValueError (for the client) when malformed.

    Engines pass it on whole (`GrammarTokenizer.matcher(*guidance)`), so the matcher knows the answer's budget.
    """
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
    max_tokens = params.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS  # bad values are refused by Sampling; None is the default
    return Guidance(spec["type"], grammar, max_tokens)


class GrammarTokenizer:
    """A model's tokenizer as llguidance needs it, and its tokens as bytes (for closing answers in time); built
    once per model on first use (~1 s)."""

    def __init__(self, tokenizer_json: str, eos: frozenset[int], vocab_size: int) -> None:
        self._json = tokenizer_json
        self.eos = sorted(eos)
        self.vocab_size = vocab_size
        self._built: tuple[Any, _TokenBytes] | None = None
        self._lock = threading.Lock()

    def _get(self) -> tuple[Any, _TokenBytes]:
        with self._lock:
            if self._built is None:
                try:
                    from llguidance import LLTokenizer
                except ImportError:
                    raise ValueError("this node cannot constrain output: pip install 'lanmesh[models]'") from None
                tokenizer = LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self.eos or None)
                self._built = tokenizer, _TokenBytes.of(tokenizer, self.vocab_size)
            return self._built

    def matcher(self, kind: str, grammar: str, max_tokens: int | None = None) -> Matcher:
        """A fresh matcher for one generation; ValueError (for the client) when the grammar is invalid.

        `max_tokens`: the most tokens the answer may take; the matcher then closes it in time by itself.
        """
        from llguidance import LLMatcher

        tokenizer, token_bytes = self._get()
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
        return Matcher(LLMatcher(tokenizer, compiled, log_level=0), tokenizer, token_bytes, self.eos, max_tokens)


@dataclass(frozen=True)
class _TokenBytes:
    """A vocabulary's tokens as bytes: what closing an answer needs to know of them."""

    single: dict[int, int]  # a byte -> the token that is that byte alone (byte-level vocabularies have all 256)
    exact: dict[bytes, list[int]]  # bytes -> the tokens that are exactly them (up to _MAX_TOKEN_BYTES)
    in_string: np.ndarray  # the tokens that only continue a JSON string: no quote, no backslash, whole characters
    starting: list[np.ndarray]  # a byte -> the ids of the tokens that begin with it

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> _TokenBytes:
        """~70 ms for 49k tokens."""
        import numpy as np

        exact: dict[bytes, list[int]] = {}
        in_string = np.zeros(vocab_size, dtype=bool)
        first = np.full(vocab_size, -1, dtype=np.int16)
        for i in range(vocab_size):
            if tokenizer.is_special_token(i):
                continue
            data = bytes(tokenizer.decode_bytes([i]))
            if not data:
                continue
            if len(data) <= _MAX_TOKEN_BYTES:
                exact.setdefault(data, []).append(i)
            in_string[i] = b'"' not in data and b"\\" not in data and _whole_characters(data)
            first[i] = data[0]
        single = {b: ids[0] for b in range(256) if len(ids := exact.get(bytes([b]), [])) >= 1}
        return cls(single, exact, in_string, [np.flatnonzero(first == b) for b in range(256)])


def _whole_characters(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Matcher:
    """Where one generation is in its grammar: which tokens may come next, and how the answer can still close."""

    def __init__(
        self, matcher: Any, tokenizer: Any, token_bytes: _TokenBytes, eos: list[int], max_tokens: int | None = None
    ) -> None:
        self._m = matcher
        self._tokenizer = tokenizer  # llguidance's
        self._bytes = token_bytes
        self._eos = eos
        self._vocab = len(token_bytes.in_string)
        self._max_tokens = max_tokens
        self._consumed = 0  # tokens taken so far (a taken-over stream's prefix included, as max_tokens counts it)
        self._scan = _JsonScan()
        self._need: int | None = None  # tokens the last way to close took (None: none found), and when searched
        self._need_at = -CLOSE_RECHECK
        self._reach = CLOSE_LOOKAHEAD  # how near the end to look closely: more for answers that are long to close

    def allowed(self, tokens_left: int | None = None) -> np.ndarray:
        """A boolean mask over the vocabulary of the tokens the grammar allows next.

        `tokens_left`: how many more tokens the answer may take, this one included (the engine's own count;
        without it, the max_tokens the matcher was made with, less what it consumed). Near the end, nothing that
        opens more than can be closed in time is allowed; within CLOSE_MARGIN tokens of needing all of them to
        close the answer, only tokens along the way to a complete answer are (and more of a string being written,
        while there is room), and once it is complete only the end of the turn: the answer ends whole, with
        finish_reason "stop", instead of cut by max_tokens.
        """
        import numpy as np

        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self._vocab].astype(bool)
        if tokens_left is None and self._max_tokens is not None:
            tokens_left = self._max_tokens - self._consumed
        if tokens_left is None:
            return mask
        way = self._way_to_close(tokens_left)
        if way is None or self._need is None or self._need + 1 > tokens_left:
            return mask  # room to write freely, or no way to close in time (max_tokens ends it: "length")
        if self._need + 1 + CLOSE_MARGIN < tokens_left:
            return self._without_late_openings(mask, way, tokens_left)
        steered = np.zeros_like(mask)
        if not way:
            steered[[t for t in self._eos if t < len(steered)]] = True
        else:
            for k in range(1, min(len(way), _MAX_TOKEN_BYTES) + 1):
                tokens = self._bytes.exact.get(way[:k])
                # this token, then the rest of the way, then the end of the turn
                if tokens and (k == len(way) or 1 + self._count(way[k:]) + 1 <= tokens_left):
                    steered[tokens] = True
            if self._scan.in_string and self._need + 1 < tokens_left:
                steered |= self._bytes.in_string  # room for one more piece of the string being written
        steered &= mask
        return steered if steered.any() else mask

    def consume(self, tokens: list[int]) -> None:
        if not self._m.consume_tokens(tokens):
            raise ValueError(f"guidance: the text does not fit the grammar ({self._m.get_error()})")
        self._consumed += len(tokens)
        self._scan = self._scan.fed(bytes(self._tokenizer.decode_bytes(tokens)))

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the answer ends here)."""
        return bool(self._m.is_stopped())

    # ------------------------------------------------------------ closing in time

    def _way_to_close(self, tokens_left: int) -> bytes | None:
        """The bytes that complete the answer (b"": it is complete), searched for again at every token near the
        end and every CLOSE_RECHECK tokens before; None while far from the end, or when no way was found."""
        near = self._need is not None and tokens_left <= self._need + 1 + self._reach
        if not near and self._consumed - self._need_at < CLOSE_RECHECK:
            return None
        way = closing_bytes(self._m, self._scan, self._bytes.single, self._limit(tokens_left))
        first = self._need is None and self._need_at < 0
        self._need = None if way is None else self._count(way)
        self._need_at = self._consumed
        if first and self._need is not None:  # one more of what this answer is made of takes about this much
            self._reach = max(CLOSE_LOOKAHEAD, self._need + CLOSE_MARGIN)
        near = self._need is not None and tokens_left <= self._need + 1 + self._reach
        return way if near else None

    def _without_late_openings(self, mask: np.ndarray, way: bytes, tokens_left: int) -> np.ndarray:
        """Near the end, outside a string: no token may begin something (an object, an array, a string, another
        item, another tool call) that could not be closed in what would be left, CLOSE_MARGIN included."""
        if self._scan.in_string:
            return mask
        trimmed = mask.copy()
        for b in _OPENINGS:
            tokens = self._bytes.starting[b]
            if (way and way[0] == b) or not mask[tokens].any():
                continue
            probe = self._m.deep_copy()
            token = self._bytes.single.get(b)
            if token is None or probe.try_consume_tokens([token]) != 1:
                continue
            after = closing_bytes(probe, self._scan.fed(bytes([b])), self._bytes.single, self._limit(tokens_left))
            if after is None or 1 + self._count(after) + 1 + CLOSE_MARGIN > tokens_left:
                trimmed[tokens] = False
        return trimmed if trimmed.any() else mask

    def _count(self, text: bytes) -> int:
        """How many tokens `text` takes, tokenized as the model would write it."""
        return len(self._tokenizer.tokenize_bytes(text))

    @staticmethod
    def _limit(tokens_left: int) -> int:
        return min(max(tokens_left - 1, 0) * _MAX_TOKEN_BYTES, CLOSE_TRIES)


def closing_bytes(matcher: Any, scan: _JsonScan, byte_tokens: dict[int, int], limit: int) -> bytes | None:
    """A short way (in bytes, at most `limit`) from where `matcher` is to an answer its grammar accepts, or None.

    A depth-first search on a copy of the matcher, a byte at a time (or the stretch the grammar forces, such as
    a key's name): the bytes that close the most (a quote inside a string, a bracket outside one) are tried
    first, and what the grammar refuses is skipped, so the usual ways out of JSON (`"}]`, a missing required key,
    then `</tool_call>`) are found in a few dozen tries. Not always the shortest; bounded by CLOSE_TRIES.
    """
    probe = matcher.deep_copy()
    if probe.is_accepting():
        return b""
    steps: list[bytes] = []
    scans = [scan]
    options: list[Iterator[int]] = [iter(scan.order())]
    length = tries = 0
    while options:
        step = None
        if length < limit:
            first = True
            for b in options[-1]:
                token = byte_tokens.get(b)
                if token is None:
                    continue
                tries += 1
                if probe.try_consume_tokens([token]) == 1:
                    step = bytes([b])
                    break
                if tries >= CLOSE_TRIES:
                    return None
                if first:  # the likeliest byte was refused: the grammar may force what comes next
                    first = False
                    step = _forced(probe, byte_tokens)
                    if step:
                        options[-1] = iter(())  # nothing else may come here
                        break
        if step is None:  # a dead end, or too long: back up
            options.pop()
            scans.pop()
            if steps:
                length -= len(steps[-1])
                probe.rollback(len(steps.pop()))
            continue
        steps.append(step)
        length += len(step)
        if probe.is_accepting():
            return b"".join(steps)
        scans.append(scans[-1].fed(step))
        options.append(iter(scans[-1].order()))
    return None


def _forced(probe: Any, byte_tokens: dict[int, int]) -> bytes | None:
    """The bytes the grammar forces next, consumed (None: nothing is forced, or they cannot be written)."""
    forced = bytes(probe.compute_ff_bytes())
    tokens = [byte_tokens.get(b) for b in forced]
    if not forced or None in tokens:
        return None
    taken = probe.try_consume_tokens(tokens)
    if taken == len(tokens):
        return forced
    if taken:
        probe.rollback(taken)
    return None


class _JsonScan:
    """How deep in JSON the text so far is: open brackets, and whether inside a string (and after a backslash).

    Only orders the search (what closes first); the grammar decides what is allowed.
    """

    __slots__ = ("depth", "in_string", "escaped")

    def __init__(self, depth: int = 0, in_string: bool = False, escaped: bool = False) -> None:
        self.depth, self.in_string, self.escaped = depth, in_string, escaped

    def fed(self, data: bytes) -> _JsonScan:
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for b in data:
            if in_string:
                if escaped:
                    escaped = False
                elif b == 0x5C:  # backslash
                    escaped = True
                elif b == 0x22:  # quote
                    in_string = False
            elif b == 0x22:
                in_string = True
            elif b in b"{[":
                depth += 1
            elif b in b"}]" and depth:
                depth -= 1
        return _JsonScan(depth, in_string, escaped)

    def order(self) -> bytes:
        if self.escaped:
            return _ORDER_ESCAPED
        return _ORDER_IN_STRING if self.in_string else _ORDER_OUTSIDE


# Symbols before letters: in a pattern (an e-mail, `[a-z]+\\.com`) the way out is a symbol, and letters loop.
_OPENINGS = b'{["<,'  # bytes that begin more to close, outside a string (`<`: another tool call)
_PLAIN = b",: @.0123456789-_/+<>=!?#abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_REST = bytes(b for b in range(256) if b not in _PLAIN and b not in b'"\\{}[]')
_ORDER_IN_STRING = b'"' + _PLAIN + b"{}[]" + _REST + b"\\"
_ORDER_OUTSIDE = b"}]" + _PLAIN + _REST + b'"\\' + b"{["
_ORDER_ESCAPED = b'n"\\/bfrtu' + bytes(b for b in _ORDER_IN_STRING if b not in b'n"\\/bfrtu')
