"""Chat and text completion with a local causal language model: an HF folder, or a GGUF file converted once and cached.

The decode loop is our own (not `generate()`) so one batch serves many requests at once, each with its own
sampling parameters, stop strings, stream and deadline; a row leaves the batch as soon as it is done.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import ErrorCode, Task

from ..cache import cache_entry, cache_ready, discard_cache, publish_cache
from .base import Backend, Job, ProgressFn
from .guidance import GrammarTokenizer, Matcher, parse_guidance
from .textgen import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_MAX_TOKENS_LIMIT,
    DEFAULT_TEMPERATURE,
    Detokenizer,
    Sampling,
    TextRow,
    chat_messages,
    heal_prefix,
    token_budget,
)
from .tools import check_tools, with_tools

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_CACHE_FORMAT = "hf-safetensors-fp32-v1"  # bump when the cached layout changes: old entries are then ignored


def convert_gguf(name: str, gguf: Path, cache_dir: str | Path | None, report: ProgressFn) -> Path:
    """The HF folder of a GGUF model, de-quantized to fp32 once and cached (what other engines build from)."""
    entry = cache_entry(name, gguf, _CACHE_FORMAT, cache_dir)
    if not cache_ready(entry):
        model, tokenizer = _dequantize_gguf(name, gguf, report)
        report(f"{name}: writing cache {entry}", 0.8)
        publish_cache(entry, lambda tmp: _write_cache(model, tokenizer, gguf, tmp))
    return entry


def _dequantize_gguf(name: str, gguf: Path, report: ProgressFn) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    report(f"{name}: reading GGUF tokenizer ({gguf.name})", 0.05)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    report(f"{name}: de-quantizing GGUF weights (first start only)", 0.3)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already de-quantized fp32 tensors, so dropping the marker makes them a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _write_cache(model: Any, tokenizer: Any, gguf: Path, folder: Path) -> dict[str, Any]:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # includes the chat template
    return {"source": str(gguf), "format": _CACHE_FORMAT}


class _Row(TextRow):
    """One job's progress through the decode loop: its text (`TextRow`) plus its own random stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import torch

        super().__init__(*args, **kwargs)
        self.context: list[int] = []  # what the model reads before generating (prompt + prefix)
        self.matcher: Matcher | None = None  # the grammar the answer must follow (params["guidance"])
        self.generator: torch.Generator | None = None
        if not self.sampling.greedy:
            self.generator = torch.Generator()
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed % (2**63))


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
        self.model_dir: Path | None = None  # the HF folder the weights were read from
        self._model: Any = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._pad_id = 0
        self._cache_kwarg = "past_key_values"
        self._vocab: list[str] | None = None
        self._grammar: GrammarTokenizer | None = None

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
            self.model_dir = self.path
        else:
            model, tokenizer = self._from_gguf(gguf, dtype, report)
            self.model_dir = self.cache_path if self.cache_path is not None and cache_ready(self.cache_path) else None

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

        model, tokenizer = _dequantize_gguf(self.name, gguf, report)
        self.loaded_from = "gguf"
        report(f"{self.name}: writing cache {entry}", 0.8)
        try:
            publish_cache(entry, lambda tmp: _write_cache(model, tokenizer, gguf, tmp))
        except OSError as exc:
            log.warning("model %s: cannot write cache %s (%s); the next start converts again", self.name, entry, exc)
        if dtype != model.dtype:
            model.to(dtype)
        return model, tokenizer

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

    def files(self) -> tuple[str, Path] | None:
        return None if self.model_dir is None else ("transformers", self.model_dir)

    # ------------------------------------------------------------ serving

    def run(self, batch: list[Job]) -> None:
        if self._model is None:
            for job in batch:
                job.fail(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
            return
        rows = []
        for job in batch:
            row = self._admit(job)
            if row is not None:
                rows.append(row)
        if rows:
            import torch

            with torch.inference_mode():
                self._decode(rows)

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
            row.finish("length", self.name)
            return None
        return row

    def _prepare(self, job: Job) -> _Row:
        req = job.request
        assert self.context is not None
        sampling = Sampling.from_params(req.params, self.max_tokens_limit)
        guidance = parse_guidance(req.params)
        if req.task is Task.CHAT:
            tools = check_tools(req.params["tools"]) if req.params.get("tools") is not None else None
            prompt_ids = self._chat_ids(req.input, tools)
        elif req.task is Task.COMPLETE:
            prompt_ids = self._complete_ids(req.input)
        else:
            raise ValueError(f"model {self.name} serves chat and complete, not {req.task.value}")
        if not isinstance(req.prefix, str):
            raise ValueError("prefix must be a string")
        prefix_ids = list(self._tokenizer.encode(req.prefix, add_special_tokens=False)) if req.prefix else []
        heal = heal_prefix(req.prefix, prefix_ids, self._text, self._vocab_text)
        if heal is not None:
            prefix_ids.pop()
        budget = token_budget(sampling, len(prompt_ids), len(prefix_ids), self.context)
        context = prompt_ids + prefix_ids
        row = _Row(job, sampling, budget, Detokenizer(self._text, context), heal)
        row.context = context
        if guidance is not None:
            if self._grammar is None:
                vocab = int(self._model.config.vocab_size)
                self._grammar = GrammarTokenizer(self._tokenizer.backend_tokenizer.to_str(), self._eos, vocab)
            row.matcher = self._grammar.matcher(*guidance)
            if prefix_ids:
                row.matcher.consume(prefix_ids)
        return row

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

    def _chat_ids(self, messages: Any, tools: list[dict[str, Any]] | None = None) -> list[int]:
        clean: list[dict[str, Any]] = chat_messages(messages)
        template = getattr(self._tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"model {self.name} has no chat template; send task 'complete' with a prompt")
        if tools and "tools" not in str(template):  # the template cannot show them: say it in words
            clean, tools = with_tools(clean, tools), None
        from jinja2 import TemplateError

        try:
            text = self._tokenizer.apply_chat_template(clean, tools=tools, tokenize=False, add_generation_prompt=True)
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
            if row.matcher is not None:  # only what the grammar allows next
                left = row.budget - row.generated  # so the grammar closes the answer within max_tokens
                allowed = torch.from_numpy(row.matcher.allowed(tokens_left=left)[: scores.shape[-1]])
                scores = scores.masked_fill(~allowed, float("-inf"))
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
        for row, token in zip(rows, picks, strict=True):
            if row.matcher is not None:
                row.matcher.consume([token])
        return picks

    def _advance(self, row: _Row, token: int) -> bool:
        """Take one new token into a row; False when the row is finished (and answered)."""
        if not row.advance(token, self._eos, self.name):
            return False
        if row.matcher is not None and row.matcher.finished:  # the grammar is complete: nothing may follow
            row.end(self.name)
            return False
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


__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_TEMPERATURE", "Sampling", "TransformersChat"]
