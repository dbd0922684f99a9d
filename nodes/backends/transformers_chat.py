"""Chat and text completion with a local causal language model: an HF folder, or a GGUF file converted once and cached.

The decode loop is our own (not `generate()`) so one batch serves many requests at once, each with its own
sampling parameters, stop strings, stream and deadline; a row leaves the batch as soon as it is done.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import ErrorCode, Task

from ..models import cache_entry, cache_ready, discard_cache, publish_cache
from .base import Backend, Job, ProgressFn

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Sampling defaults. Greedy by default: the same request gives the same text on any node, which is what a
# stream that fails over to another node needs to continue seamlessly. Ask for temperature > 0 to sample.
DEFAULT_TEMPERATURE = 0.0
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_TOKENS_LIMIT = 4096  # a node-side cap on max_tokens; requests above it are refused, not clamped
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
_CACHE_FORMAT = "hf-safetensors-fp32-v1"  # bump when the cached layout changes: old entries are then ignored
_DETOKENIZE_CONTEXT = 5  # tokens of context kept when decoding deltas (some tokenizers strip a leading space)


@dataclass(frozen=True)
class Sampling:
    """Per-request generation settings, validated from `Request.params` (unknown keys are ignored)."""

    max_tokens: int | None  # None: DEFAULT_MAX_TOKENS, shortened to fit the context
    temperature: float
    top_p: float
    top_k: int  # 0: no top-k cut
    seed: int | None
    stop: tuple[str, ...]

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
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p:g}")
        top_k = _optional_int(params, "top_k")
        top_k = 0 if top_k is None else top_k
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        seed = _optional_int(params, "seed")
        return cls(max_tokens, temperature, top_p, top_k, seed, _stop_strings(params.get("stop")))


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
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # value != value: NaN
        raise ValueError(f"{key} must be a number, got {type(value).__name__} {value!r}")
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


class _Detokenizer:
    """Turns tokens into text deltas whose concatenation is exactly the decoded text.

    Decodes a small sliding window and holds text back while it ends in U+FFFD (a multi-byte character
    split across tokens), so a delta never contains half a character.
    """

    def __init__(self, tokenizer: Any, context: list[int]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context[-_DETOKENIZE_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _text(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._text(self._ids[self._prefix_offset : self._read_offset])
        after = self._text(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        before = self._text(self._ids[self._prefix_offset : self._read_offset])
        after = self._text(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class _Row:
    """One job's progress through the decode loop."""

    def __init__(
        self,
        job: Job,
        sampling: Sampling,
        prompt_ids: list[int],
        prefix_ids: list[int],
        budget: int,
        tokenizer: Any,
        heal: tuple[str, list[int]] | None = None,
    ) -> None:
        import torch

        self.job = job
        self.sampling = sampling
        self.context = prompt_ids + prefix_ids  # what the model reads before generating
        self.prompt_tokens = len(prompt_ids)
        self.prefix_tokens = len(prefix_ids)
        self.budget = budget  # new tokens this node may still generate
        self.generated = 0
        self.text = ""  # newly generated text (after the prefix)
        # Token healing: the prefix's last token was taken back; the first new token must re-produce its
        # text (`heal[0]`, not emitted again) and is one of `heal[1]`.
        self.heal_text = heal[0] if heal else ""
        self.heal_ids = heal[1] if heal else None
        self.skip = len(self.heal_text)
        self.emitted = 0  # how much of `text` went out as stream chunks
        self.detokenizer = _Detokenizer(tokenizer, self.context)
        self.max_stop = max((len(s) for s in sampling.stop), default=0)
        self.generator: torch.Generator | None = None
        if sampling.temperature > 0:
            self.generator = torch.Generator()
            if sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(sampling.seed % (2**63))

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


class TransformersChat(Backend):
    """Serves CHAT and COMPLETE with a causal LM, batching up to `max_batch` requests per decode loop.

    `path` is an HF model folder, a .gguf file, or a folder holding one .gguf file. GGUF weights are
    de-quantized to fp32 on first load and cached as safetensors, so later starts skip the slow conversion.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        max_batch: int = 8,
        concurrency: int = 1,
        max_tokens_limit: int | None = None,
        context: int | None = None,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.tasks = frozenset({Task.CHAT, Task.COMPLETE})
        self.path = Path(path).expanduser()
        self.cache_dir = cache_dir
        self.max_batch = max_batch
        self.concurrency = concurrency
        self.max_tokens_limit = max_tokens_limit or DEFAULT_MAX_TOKENS_LIMIT
        self.context = context  # None: the model's own max_position_embeddings
        self.device = device
        self.threads = threads
        self.loaded_from = ""  # "folder", "gguf" (converted now) or "cache" — for logs and tests
        self.cache_path: Path | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._pad_id = 0
        self._cache_kwarg = "past_key_values"
        self._vocab: list[str] | None = None

    # ------------------------------------------------------------ loading

    def load(self, progress: ProgressFn | None = None) -> None:
        report: ProgressFn = progress or (lambda _stage, _fraction: None)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        report(f"{self.name}: importing torch", 0.0)
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the node reports progress itself
        if self.threads:
            torch.set_num_threads(self.threads)
        elif hasattr(os, "sched_getaffinity"):
            # torch counts the host's cores; in a container or under taskset fewer may be ours.
            torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)))))
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32

        gguf = self._gguf_file()
        if gguf is None:
            report(f"{self.name}: loading {self.path.name}", 0.1)
            model, tokenizer = self._from_folder(self.path, dtype)
            self.loaded_from = "folder"
        else:
            model, tokenizer = self._from_gguf(gguf, dtype, report)

        report(f"{self.name}: moving to {device}", 0.95)
        model.to(device)
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        self._eos = self._eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(sorted(self._eos)), 0)
        self._pad_id = int(pad)
        if "cache" in inspect.signature(model.forward).parameters:  # renamed in transformers 5
            self._cache_kwarg = "cache"
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context = min(self.context, limit) if self.context else int(limit)
        self.labels.update({"device": device, "gpu": str(device.startswith("cuda")).lower()})
        if device.startswith("cuda"):
            self.labels["accelerator"] = "cuda"
        report(f"{self.name}: ready", 1.0)

    def _gguf_file(self) -> Path | None:
        if self.path.is_file():
            if self.path.suffix != ".gguf":
                raise ValueError(f"{self.path}: expected a .gguf file or an HF model folder")
            return self.path
        if not self.path.is_dir():
            raise FileNotFoundError(f"model {self.name}: {self.path} does not exist")
        if (self.path / "config.json").exists():
            return None
        files = sorted(self.path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"{self.path}: expected config.json or exactly one .gguf file, found {len(files)} .gguf")
        return files[0]

    def _from_folder(self, folder: Path, dtype: Any) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        return model, tokenizer

    def _from_gguf(self, gguf: Path, dtype: Any, report: ProgressFn) -> tuple[Any, Any]:
        entry = cache_entry(self.name, gguf, _CACHE_FORMAT, self.cache_dir)
        self.cache_path = entry
        if cache_ready(entry):
            report(f"{self.name}: loading cached weights", 0.1)
            try:
                loaded = self._from_folder(entry, dtype)
            except Exception as exc:  # any failure to read our own cache (truncated file, old format): rebuild it
                log.warning("model %s: cached copy unreadable", self.name, exc_info=True)
                discard_cache(entry, f"{type(exc).__name__}: {exc}")
            else:
                self.loaded_from = "cache"
                return loaded

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        report(f"{self.name}: reading GGUF tokenizer ({gguf.name})", 0.05)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        report(f"{self.name}: de-quantizing GGUF weights (first start only)", 0.3)
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
        # already de-quantized fp32 tensors, so dropping the marker makes them a plain model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        self.loaded_from = "gguf"
        report(f"{self.name}: writing cache {entry}", 0.8)
        try:
            publish_cache(entry, lambda tmp: self._write_cache(model, tokenizer, gguf, tmp))
        except OSError as exc:
            log.warning("model %s: cannot write cache %s (%s); the next start converts again", self.name, entry, exc)
        if dtype != torch.float32:
            model.to(dtype)
        return model, tokenizer

    @staticmethod
    def _write_cache(model: Any, tokenizer: Any, gguf: Path, folder: Path) -> dict[str, Any]:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)  # includes the chat template
        return {"source": str(gguf), "format": _CACHE_FORMAT}

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        for value in (
            getattr(getattr(model, "generation_config", None), "eos_token_id", None),
            model.config.eos_token_id,
            tokenizer.eos_token_id,
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    def close(self) -> None:
        self._model = None
        self._tokenizer = None

    # ------------------------------------------------------------ serving

    def run(self, batch: list[Job]) -> None:
        if self._model is None:
            for job in batch:
                job.fail(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
            return
        try:
            rows = []
            for job in batch:
                row = self._admit(job)
                if row is not None:
                    rows.append(row)
            if rows:
                import torch

                with torch.inference_mode():
                    self._decode(rows)
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", self.name, len(batch))
            for job in batch:
                job.fail(ErrorCode.INTERNAL, f"model {self.name} failed: {type(exc).__name__}: {exc}")

    def _admit(self, job: Job) -> _Row | None:
        """Validate and tokenize one job; a job that is refused or needs no compute is answered here."""
        if job.done:
            return None
        if job.expired():
            job.fail(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the model could start")
            return None
        try:
            row = self._prepare(job)
        except ValueError as exc:
            job.fail(ErrorCode.BAD_REQUEST, str(exc))
            return None
        if row.budget <= 0:  # a failed-over stream that had already used its whole max_tokens
            self._finish(row, "length")
            return None
        return row

    def _prepare(self, job: Job) -> _Row:
        req = job.request
        assert self.context is not None
        sampling = Sampling.from_params(req.params, self.max_tokens_limit)
        if req.task is Task.CHAT:
            prompt_ids = self._chat_ids(req.input)
        elif req.task is Task.COMPLETE:
            prompt_ids = self._complete_ids(req.input)
        else:
            raise ValueError(f"model {self.name} serves chat and complete, not {req.task.value}")
        if not isinstance(req.prefix, str):
            raise ValueError("prefix must be a string")
        prefix_ids = list(self._tokenizer.encode(req.prefix, add_special_tokens=False)) if req.prefix else []
        heal = self._heal(req.prefix, prefix_ids)
        if heal is not None:
            prefix_ids.pop()
        n_prompt, n_context = len(prompt_ids), len(prompt_ids) + len(prefix_ids)
        if n_context >= self.context:
            raise ValueError(f"prompt is {n_context} tokens; model context is {self.context}")
        if sampling.max_tokens is None:
            total = min(DEFAULT_MAX_TOKENS, self.context - n_prompt)
        elif n_prompt + sampling.max_tokens > self.context:
            raise ValueError(
                f"prompt is {n_prompt} tokens and max_tokens is {sampling.max_tokens}; model context is {self.context}"
            )
        else:
            total = sampling.max_tokens
        # max_tokens counts the whole completion, including what a failed node already streamed.
        budget = min(total - len(prefix_ids), self.context - n_context)
        return _Row(job, sampling, prompt_ids, prefix_ids, budget, self._tokenizer, heal)

    def _heal(self, prefix: str, prefix_ids: list[int]) -> tuple[str, list[int]] | None:
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
        head = self._text(prefix_ids[:-1])
        tail = prefix[len(head) :]
        if not prefix.startswith(head) or not tail or self._text(prefix_ids[-1:]) != tail:
            return None
        vocab = self._vocab_text()
        return tail, [i for i, text in enumerate(vocab) if text.startswith(tail)]

    def _text(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _vocab_text(self) -> list[str]:
        """Each token's text on its own; built on the first taken-over stream (~1 s for 50k tokens)."""
        if self._vocab is None:
            size = len(self._tokenizer)
            self._vocab = [
                str(t)
                for t in self._tokenizer.batch_decode(
                    [[i] for i in range(size)], skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
            ]
        return self._vocab

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("chat input must be a non-empty list of {role, content} messages")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"message {i} must be a map with a string 'role'")
            clean.append({"role": message["role"], "content": _message_text(message.get("content"), i)})
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(f"model {self.name} has no chat template; send task 'complete' with a prompt")
        from jinja2 import TemplateError

        try:
            text = self._tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            raise ValueError(f"the chat template of {self.name} refused these messages: {exc}") from None
        ids = list(self._tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ValueError("the chat prompt is empty")
        return ids

    def _complete_ids(self, prompt: Any) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"complete input must be a prompt string, got {type(prompt).__name__}")
        ids = list(self._tokenizer.encode(prompt, add_special_tokens=True))
        if not ids:
            bos = self._tokenizer.bos_token_id
            if bos is None:
                raise ValueError("the prompt is empty")
            ids = [int(bos)]
        return ids

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        device = self._model.device
        out = self._model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return out.logits[:, -1, :].float().cpu()

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._model.config)
        except TypeError:  # transformers 4.x takes no config
            return DynamicCache()

    def _decode(self, rows: list[_Row]) -> None:
        import torch

        # Left-padded prefill: every row's last prompt token sits in the last column.
        width = max(len(r.context) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.context)
            ids[i, width - n :] = torch.tensor(row.context, dtype=torch.long)
            mask[i, width - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(ids, mask, positions, cache)
        positions = positions[:, -1:]
        while True:
            tokens = self._pick(rows, logits)
            keep = [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True)) if self._advance(row, token)]
            keep = [i for i in keep if self._still_wanted(rows[i])]
            if not keep:
                return
            if len(keep) < len(rows):  # drop finished rows: no compute is spent on them any more
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index.to(self._model.device))
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
                tokens = [tokens[i] for i in keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
            positions = positions + 1
            logits = self._forward(torch.tensor(tokens, dtype=torch.long)[:, None], mask, positions, cache)

    def _pick(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """The next token of every row: argmax for greedy rows, seeded sampling for the others."""
        import torch

        greedy = logits.argmax(dim=-1).tolist()
        picks = []
        for i, row in enumerate(rows):
            s = row.sampling
            scores = logits[i]
            if row.heal_ids is not None:  # the first token after a healed prefix: only those that fit
                allowed = torch.full_like(scores, float("-inf"))
                allowed[row.heal_ids] = scores[row.heal_ids]
                scores, row.heal_ids = allowed, None
                greedy[i] = int(scores.argmax())
            if row.generator is None:
                picks.append(int(greedy[i]))
                continue
            scores = scores / s.temperature
            if s.top_k or s.top_p < 1:
                scores, order = scores.sort(descending=True)
                if s.top_k:
                    scores, order = scores[: s.top_k], order[: s.top_k]
                probs = torch.softmax(scores, dim=-1)
                if s.top_p < 1:
                    # keep the smallest head of the distribution whose mass reaches top_p
                    keep = int((probs.cumsum(-1) - probs < s.top_p).sum())
                    probs = probs[: max(1, keep)]
                choice = int(torch.multinomial(probs, 1, generator=row.generator))
                picks.append(int(order[choice]))
            else:
                probs = torch.softmax(scores, dim=-1)
                picks.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return picks

    def _advance(self, row: _Row, token: int) -> bool:
        """Take one new token into a row; False when the row is finished (and answered)."""
        if token in self._eos:
            row.add_text(row.detokenizer.flush())
            self._finish(row, "stop")
            return False
        row.generated += 1
        if row.add_text(row.detokenizer.push(token)):
            self._finish(row, "stop")
            return False
        if row.generated >= row.budget:
            stopped = row.add_text(row.detokenizer.flush())
            self._finish(row, "stop" if stopped else "length")
            return False
        row.stream_ready()
        return True

    @staticmethod
    def _still_wanted(row: _Row) -> bool:
        """Between decode steps: an answered (e.g. cancelled) or expired row leaves the batch."""
        if row.job.done:
            return False
        if row.job.expired():
            row.job.fail(ErrorCode.DEADLINE_EXCEEDED, f"deadline passed after {row.generated} generated tokens")
            return False
        return True

    def _finish(self, row: _Row, reason: str) -> None:
        job = row.job
        if job.request.stream and len(row.text) > row.emitted:
            job.emit(row.text[row.emitted :])
            row.emitted = len(row.text)
        text = job.request.prefix + row.text
        output: Any = {"role": "assistant", "content": text} if job.request.task is Task.CHAT else text
        completion = row.prefix_tokens + row.generated
        job.finish(
            output,
            {
                "model": self.name,
                "finish_reason": reason,
                "usage": {
                    "prompt_tokens": row.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": row.prompt_tokens + completion,
                },
            },
        )


def _message_text(content: Any, index: int) -> str:
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


__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_TEMPERATURE", "Sampling", "TransformersChat"]
