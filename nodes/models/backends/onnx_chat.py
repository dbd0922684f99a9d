"""Chat and text completion on onnxruntime with continuous batching, over a model built by onnxruntime-genai.

onnxruntime-genai's model builder makes the model (`onnx_build`, once, cached). Its own `Engine` batches only
statically on a CPU (a request waits until the whole running batch has finished before it starts; measured)
and its continuous batching needs paged attention, which only its CUDA build has. So the scheduling here is
ours: every request owns a slot of one key/value cache; each step reads at most one prompt chunk of a
newcomer, then advances every running request by one token. Requests join and leave between steps, so nobody
waits for another request to finish, and a finished request frees its slot at once.

Serving needs only onnxruntime, numpy, tokenizers and jinja2: no torch in the node's process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import ErrorCode, Task

from ..cache import cache_ready, discard_cache
from .base import Backend, Job, JobSource, ProgressFn, release_free_memory
from .chat_template import ChatTemplate, TemplateError, find_template, special_tokens
from .guidance import GrammarTokenizer, Matcher, parse_guidance
from .onnx_build import build_in_child, built_entry, check_precision
from .onnx_kv import KVCache
from .textgen import DEFAULT_MAX_TOKENS_LIMIT, Detokenizer, Sampling, TextRow, chat_messages, heal_prefix, token_budget
from .tools import check_tools, with_tools

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 16  # requests decoded together; the executor's capacity for this model
PREFILL_CHUNK = 128  # prompt tokens read per step: bounds how long running requests wait for a newcomer
_IDLE_WAIT = 0.25  # seconds the engine sleeps on an empty queue before checking for shutdown
_RELEASE_AFTER = 1024  # once idle, give the cache memory back if some request grew it past this many tokens


@dataclass(eq=False)
class _Seq:
    """Where one request is in the engine: its slot, the tokens still to read, what the cache holds."""

    text: TextRow
    pending: list[int]  # prompt (+ prefix) tokens not yet read by the model
    slot: int = -1
    cached: int = 0  # tokens in this request's slot of the cache
    next_token: int = 0  # fed at the next decode step
    rng: np.random.Generator | None = None
    heal_ids: list[int] | None = field(default=None)
    matcher: Matcher | None = None  # the grammar the answer must follow (params["guidance"])

    @property
    def job(self) -> Job:
        return self.text.job


class OnnxChat(Backend):
    """Serves CHAT and COMPLETE with continuous batching on onnxruntime.

    `path` is a .gguf file (or a folder holding one), an HF model folder (both built once into the model cache
    at `precision`), or a folder already built by onnxruntime-genai (genai_config.json + model.onnx).
    """

    continuous = True

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        cache_dir: str | Path | None = None,
        precision: str = "int4",
        max_batch: int = DEFAULT_SLOTS,
        max_tokens_limit: int | None = None,
        context: int | None = None,
        threads: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        super().__init__()
        self.name = name
        self.tasks = frozenset({Task.CHAT, Task.COMPLETE})
        self.path = Path(path).expanduser()
        self.cache_dir = cache_dir
        self.precision = precision
        self.provider = "cpu"
        self.max_batch = max_batch
        self.concurrency = 1  # one engine; its batch is the parallelism
        self.max_tokens_limit = max_tokens_limit or DEFAULT_MAX_TOKENS_LIMIT
        self.context = context
        self.threads = threads
        self.prefill_chunk = prefill_chunk
        self.loaded_from = ""  # "onnx" (given built folder), "build" (built now) or "cache"
        self.model_dir: Path | None = None
        self._session: Any = None
        self._tokenizer: Any = None
        self._template: ChatTemplate | None = None
        self._grammar: GrammarTokenizer | None = None
        self._eos: frozenset[int] = frozenset()
        self._names: list[tuple[str, str, str, str]] = []
        self._kv_shape: tuple[int, int, int] = (0, 0, 0)  # kv heads, max_len, head size
        self._dtype: Any = None
        self._vocab_size = 0
        self._positions = False  # the graph takes position_ids
        self._cache: KVCache | None = None
        self._vocab: list[str] | None = None
        self._waiting: list[_Seq] = []  # admitted, prompt not fully read yet (the first one is being read)
        self._rows: list[_Seq] = []  # decoding; rows[i].slot == i
        self._worked = False  # a step ran since the engine last went idle

    # ------------------------------------------------------------ loading

    def load(self, progress: ProgressFn | None = None) -> None:
        report: ProgressFn = progress or (lambda _stage, _fraction: None)
        if (self.path / "genai_config.json").exists():
            folder, self.loaded_from = self.path, "onnx"
        else:
            check_precision(self.precision, self.provider)
            folder = built_entry(self.name, self.path, self.precision, self.provider, self.cache_dir)
            if cache_ready(folder):
                self.loaded_from = "cache"
            else:
                report(f"{self.name}: building the {self.precision} ONNX model (first start only)", 0.0)
                folder = build_in_child(
                    self.name, self.path, self.precision, self.provider, self.cache_dir,
                    lambda stage, fraction: report(f"{self.name}: {stage}", 0.9 * fraction),
                )  # fmt: skip
                self.loaded_from = "build"
        report(f"{self.name}: starting onnxruntime", 0.92)
        try:
            self._open(folder)
        except Exception as exc:
            if self.loaded_from != "cache":
                raise
            # Our own cached build is unreadable (truncated file, old format): build it again.
            log.warning("model %s: cached build unreadable", self.name, exc_info=True)
            discard_cache(folder, f"{type(exc).__name__}: {exc}")
            self.load(progress)
            return
        self.model_dir = folder
        report(f"{self.name}: ready", 1.0)

    def _open(self, folder: Path) -> None:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        config = json.loads((folder / "genai_config.json").read_text())
        model = config["model"]
        decoder = model["decoder"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = self.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in session.get_inputs()}
        names = decoder.get("inputs", {})
        outputs = decoder.get("outputs", {})
        past_k = names.get("past_key_names", "past_key_values.%d.key")
        past_v = names.get("past_value_names", "past_key_values.%d.value")
        present_k = outputs.get("present_key_names", "present.%d.key")
        present_v = outputs.get("present_value_names", "present.%d.value")
        layers = int(decoder["num_hidden_layers"])
        self._names = [(past_k % i, past_v % i, present_k % i, present_v % i) for i in range(layers)]
        missing = {"input_ids", "attention_mask", self._names[0][0]} - set(inputs)
        if missing:
            raise ValueError(f"{folder}: the model lacks inputs {sorted(missing)}; not a decoder with a KV cache")
        self._positions = "position_ids" in inputs
        self._dtype = np.float16 if "float16" in inputs[self._names[0][0]].type else np.float32
        context = int(model.get("context_length") or config.get("search", {}).get("max_length") or 2048)
        self.context = min(self.context, context) if self.context else context
        self._kv_shape = (int(decoder["num_key_value_heads"]), self.context, int(decoder["head_size"]))
        self._vocab_size = int(model["vocab_size"])
        eos = model.get("eos_token_id")
        self._eos = frozenset(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        template = find_template(folder)
        self._template = ChatTemplate(template, special_tokens(folder)) if template else None
        self._grammar = GrammarTokenizer(self._tokenizer.to_str(), self._eos, self._vocab_size)
        self._session = session
        self.labels.update({"device": "cpu", "gpu": "false", "engine": "onnxruntime"})

    def close(self) -> None:
        self._session = None
        self._cache = None

    def files(self) -> tuple[str, Path] | None:
        return None if self.model_dir is None else ("onnx-chat", self.model_dir)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"precision": self.precision, "engine": "onnxruntime-genai build, continuous"}

    # ------------------------------------------------------------ serving

    def run(self, batch: list[Job]) -> None:
        """Serve a fixed batch to the end (tests, or a caller without a queue); `serve` is the real loop."""
        self.serve(_ListSource(batch))

    def serve(self, source: JobSource) -> None:
        if self._session is None:
            for job in source.take(1 << 30, 0):
                job.fail(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
            return
        try:
            while True:
                busy = bool(self._rows or self._waiting)
                free = self.max_batch - len(self._rows) - len(self._waiting)
                for job in source.take(free, 0.0 if busy else _IDLE_WAIT):
                    self._admit(job)
                if self._rows or self._waiting:
                    self._step()
                    self._worked = True
                elif source.stopping:
                    return
                else:
                    self._idle()
        except Exception as exc:
            # An engine failure (not a bad request: those are answered at admission) ends every request it
            # holds as INTERNAL (the entry node retries them elsewhere); the lane starts the engine again.
            why = f"model {self.name} failed: {type(exc).__name__}: {exc}"
            for seq in self._rows + self._waiting:
                seq.job.fail(ErrorCode.INTERNAL, why)
            self._rows, self._waiting, self._cache = [], [], None
            raise

    def _idle(self) -> None:
        if self._cache is not None and self._cache.high_water > _RELEASE_AFTER:
            self._cache = None  # hand the memory of long requests back while nothing runs
        if self._worked:
            self._worked = False
            release_free_memory()  # once per idle spell: what the steps freed goes back to the system

    def _admit(self, job: Job) -> None:
        if job.done:
            return
        if job.expired():
            job.fail(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the model could start")
            return
        try:
            seq = self._prepare(job)
        except ValueError as exc:
            job.fail(ErrorCode.BAD_REQUEST, str(exc))
            return
        if seq.text.budget <= 0:  # a failed-over stream that had already used its whole max_tokens
            seq.text.finish("length", self.name)
            return
        self._waiting.append(seq)

    def _prepare(self, job: Job) -> _Seq:
        import numpy as np

        req = job.request
        sampling = Sampling.from_params(req.params, self.max_tokens_limit)
        guidance = parse_guidance(req.params)
        if req.task is Task.CHAT:
            tools = check_tools(req.params["tools"]) if req.params.get("tools") is not None else None
            prompt_ids = self._chat_ids(req.input, tools)
        elif req.task is Task.COMPLETE:
            if not isinstance(req.input, str):
                raise ValueError(f"complete input must be a prompt string, got {type(req.input).__name__}")
            prompt_ids = self._encode(req.input, special=True)
            if not prompt_ids:
                raise ValueError("the prompt is empty")
        else:
            raise ValueError(f"model {self.name} serves chat and complete, not {req.task.value}")
        prefix_ids = self._encode(req.prefix, special=False) if req.prefix else []
        heal = heal_prefix(req.prefix, prefix_ids, self._decode, self._vocab_text)
        if heal is not None:
            prefix_ids.pop()
        assert self.context is not None
        budget = token_budget(sampling, len(prompt_ids), len(prefix_ids), self.context)
        context = prompt_ids + prefix_ids
        matcher = None
        if guidance is not None:
            assert self._grammar is not None
            matcher = self._grammar.matcher(*guidance)
            if prefix_ids:  # a taken-over stream: the grammar is already that far
                matcher.consume(prefix_ids)
        text = TextRow(job, sampling, budget, Detokenizer(self._decode, context), heal)
        rng = None
        if not sampling.greedy:
            rng = np.random.default_rng(sampling.seed % (2**63) if sampling.seed is not None else None)
        return _Seq(text, context, rng=rng, heal_ids=heal[1] if heal else None, matcher=matcher)

    def _chat_ids(self, messages: Any, tools: list[dict[str, Any]] | None = None) -> list[int]:
        clean: list[dict[str, Any]] = chat_messages(messages)
        if self._template is None:
            raise ValueError(f"model {self.name} has no chat template; send task 'complete' with a prompt")
        if tools and "tools" not in self._template.source:  # the template cannot show them: say it in words
            clean, tools = with_tools(clean, tools), None
        try:
            prompt = self._template.render(clean, tools=tools)
        except TemplateError as exc:
            raise ValueError(f"the chat template of {self.name} refused these messages: {exc}") from None
        ids = self._encode(prompt, special=False)
        if not ids:
            raise ValueError("the chat prompt is empty")
        return ids

    def _encode(self, text: str, *, special: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=special).ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _vocab_text(self) -> list[str]:
        """Each token's text on its own; built on the first taken-over stream."""
        if self._vocab is None:
            self._vocab = [str(t) for t in self._tokenizer.decode_batch([[i] for i in range(self._vocab_size)])]
        return self._vocab

    # ------------------------------------------------------------ one step

    def _kv(self) -> KVCache:
        if self._cache is None:
            heads, length, size = self._kv_shape
            self._cache = KVCache(self._session, self._names, self.max_batch, heads, size, self._dtype, length)
        return self._cache

    def _step(self) -> None:
        self._drop_unwanted()
        if self._waiting:
            self._prefill(self._waiting[0])
        if self._rows:
            self._decode_step()

    def _drop_unwanted(self) -> None:
        """Between steps: answered (cancelled) and expired requests leave, freeing their slots."""
        gone = []
        for seq in self._rows + self._waiting:
            if not seq.job.done and seq.job.expired():
                seq.job.fail(ErrorCode.DEADLINE_EXCEEDED, f"deadline passed after {seq.text.generated} tokens")
            if seq.job.done:
                gone.append(seq)
        if gone:
            self._waiting = [s for s in self._waiting if s not in gone]
            self._remove([s for s in gone if s.slot >= 0 and s not in self._waiting])

    def _prefill(self, seq: _Seq) -> None:
        import numpy as np

        kv = self._kv()
        if seq.slot < 0:
            seq.slot = len(self._rows)
        chunk = seq.pending[: self.prefill_chunk]
        ids = np.asarray(chunk, dtype=np.int64)[None, :]
        total = seq.cached + len(chunk)
        kv.ensure(total)
        mask = np.ones((1, total), dtype=np.int64)
        positions = np.arange(seq.cached, total, dtype=np.int64)[None, :]
        logits = self._run(kv.binding(seq.slot, 1), ids, mask, positions)
        seq.cached = total
        seq.pending = seq.pending[len(chunk) :]
        if seq.pending:
            return  # more of the prompt next step; running requests advance meanwhile
        self._waiting.pop(0)
        token = self._pick_one(seq, logits[0, -1])
        if self._advance(seq, token):
            seq.next_token = token
            self._rows.append(seq)
        else:
            seq.slot = -1

    def _decode_step(self) -> None:
        import numpy as np

        rows = self._rows
        kv = self._kv()
        n = len(rows)
        ids = np.fromiter((s.next_token for s in rows), dtype=np.int64, count=n)[:, None]
        lengths = np.fromiter((s.cached for s in rows), dtype=np.int64, count=n)
        width = int(lengths.max()) + 1
        kv.ensure(width)
        mask = (np.arange(width)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(kv.binding(0, n), ids, mask, lengths[:, None])[:, -1]
        tokens = self._pick(rows, logits)
        self.steps += 1
        self.row_steps += n
        done = []
        for seq, token in zip(rows, tokens, strict=True):
            seq.cached += 1
            if self._advance(seq, token) and seq.cached < self._kv_shape[1]:
                seq.next_token = token
            else:
                if not seq.job.done:  # the context is full: the answer ends here
                    seq.text.finish("length", self.name)
                done.append(seq)
        if done:
            self._remove(done)

    def _advance(self, seq: _Seq, token: int) -> bool:
        """Take one chosen token; False when the request is finished (and answered)."""
        if not seq.text.advance(token, self._eos, self.name):
            return False
        if seq.matcher is not None and seq.matcher.finished:  # the grammar is complete: nothing may follow
            seq.text.end(self.name)
            return False
        return True

    def _remove(self, gone: list[_Seq]) -> None:
        """Free the slots of finished requests, moving the last running ones into the holes."""
        kv = self._kv()
        for seq in sorted((s for s in gone if s in self._rows), key=lambda s: s.slot, reverse=True):
            last = self._rows.pop()
            if last is not seq:
                kv.move(last.slot, seq.slot, last.cached)
                last.slot = seq.slot
                self._rows[seq.slot] = last
            seq.slot = -1
        if self._waiting and self._waiting[0].slot > len(self._rows):  # a prompt half read keeps its tokens
            head = self._waiting[0]
            kv.move(head.slot, len(self._rows), head.cached)
            head.slot = len(self._rows)

    def _run(self, binding: Any, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import numpy as np

        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self._positions:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        shape = [ids.shape[0], ids.shape[1], self._vocab_size]
        logits = np.empty(shape, dtype=np.float32 if self._dtype == np.float32 else np.float16)
        binding.bind_output("logits", "cpu", 0, logits.dtype, shape, logits.ctypes.data)
        self._session.run_with_iobinding(binding)
        return logits

    def perplexity(self, text: str) -> tuple[float, int]:
        """exp(mean negative log-likelihood) of `text`'s tokens after its first, and how many were scored.

        For quality checks of a build (int4 against fp32); it uses a cache of its own, so call it while the
        engine is not serving.
        """
        import numpy as np

        ids = self._encode(text, special=True)
        if len(ids) < 2:
            raise ValueError("need at least two tokens to score")
        heads, length, size = self._kv_shape
        kv = KVCache(self._session, self._names, 1, heads, size, self._dtype, length)
        kv.ensure(len(ids))
        nll, done = 0.0, 0
        while done < len(ids) - 1:
            chunk = ids[done : done + self.prefill_chunk]
            total = done + len(chunk)
            logits = self._run(
                kv.binding(0, 1),
                np.asarray(chunk, dtype=np.int64)[None, :],
                np.ones((1, total), dtype=np.int64),
                np.arange(done, total, dtype=np.int64)[None, :],
            )[0].astype(np.float64)
            targets = ids[done + 1 : total + 1]
            scores = logits[: len(targets)]
            top = scores.max(axis=-1, keepdims=True)
            log_z = top[:, 0] + np.log(np.exp(scores - top).sum(axis=-1))
            nll += float((log_z - scores[np.arange(len(targets)), targets]).sum())
            done = total
        return float(np.exp(nll / (len(ids) - 1))), len(ids) - 1

    # ------------------------------------------------------------ choosing tokens

    def _pick(self, rows: list[_Seq], logits: np.ndarray) -> list[int]:
        greedy = logits.argmax(axis=-1)
        return [
            int(greedy[i])
            if seq.rng is None and seq.heal_ids is None and seq.matcher is None
            else self._pick_one(seq, logits[i])
            for i, seq in enumerate(rows)
        ]

    @staticmethod
    def _pick_one(seq: _Seq, scores: np.ndarray) -> int:
        """The next token of one request: argmax when greedy, else seeded sampling with top-k/top-p; only
        tokens its grammar allows, and after a healed prefix only tokens that re-produce its end."""
        import numpy as np

        scores = scores.astype(np.float64)
        if seq.heal_ids is not None:  # the first token after a healed prefix: only those that fit
            allowed = np.full_like(scores, -np.inf)
            allowed[seq.heal_ids] = scores[seq.heal_ids]
            scores, seq.heal_ids = allowed, None
        if seq.matcher is not None:
            scores[~seq.matcher.allowed()[: len(scores)]] = -np.inf
            token = OnnxChat._choose(seq, scores)
            seq.matcher.consume([token])
            return token
        return OnnxChat._choose(seq, scores)

    @staticmethod
    def _choose(seq: _Seq, scores: np.ndarray) -> int:
        import numpy as np

        if seq.rng is None:
            return int(scores.argmax())
        s = seq.text.sampling
        order = np.argsort(-scores, kind="stable")
        if s.top_k:
            order = order[: s.top_k]
        top = scores[order] / s.temperature
        probs = np.exp(top - top[0])
        probs /= probs.sum()
        if s.top_p < 1:
            # keep the smallest head of the distribution whose mass reaches top_p
            keep = int((np.cumsum(probs) - probs < s.top_p).sum())
            probs = probs[: max(1, keep)]
            probs /= probs.sum()
        return int(order[seq.rng.choice(len(probs), p=probs)])


class _ListSource:
    """A fixed list of jobs as a JobSource: `run(batch)` serves it to the end."""

    def __init__(self, jobs: list[Job]) -> None:
        self._jobs = list(jobs)

    @property
    def stopping(self) -> bool:
        return not self._jobs

    def take(self, limit: int, wait: float) -> list[Job]:
        taken, self._jobs = self._jobs[:limit], self._jobs[limit:]
        return taken
