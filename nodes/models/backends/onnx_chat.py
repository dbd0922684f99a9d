"""Chat and text completion on onnxruntime with continuous batching, over a model built by onnxruntime-genai.

onnxruntime-genai's model builder makes the model (`onnx_build`, once, cached). Its own `Engine` batches only
statically on a CPU (a request waits until the whole running batch has finished before it starts; measured) and its
continuous batching needs paged attention, which only its CUDA build has. So the scheduling here is ours, in three
parts, as vLLM v1 separates them:

- `chat_scheduler.ChatScheduler` decides (queues, slots, the per-step token budget, the key/value cache's cap,
  explicit request states) and is pure;
- `onnx_runner.OnnxRunner` owns the session and the key/value arrays and runs what was planned;
- this module is the engine between them: it takes jobs from the executor, prepares each (template, tokens,
  grammar) on a thread of its own, picks each request's tokens, and answers its caller.

A request that fails, fails alone: a grammar that breaks, a token no grammar allows, an error in one request's text
end that request only; the others go on. Serving needs only onnxruntime, numpy, tokenizers and jinja2: no torch.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import ErrorCode, Task

from ..cache import cache_ready, discard_cache
from .base import Backend, Job, JobSource, ProgressFn, page_out_file, release_free_memory
from .cache_summary import ConversationIndex, cache_counters
from .chat_scheduler import ChatScheduler, SchedSeq, SeqState, StepPlan
from .chat_template import ChatTemplate, TemplateError, find_template, special_tokens
from .guidance import GrammarTokenizer, Matcher, parse_guidance
from .onnx_build import build_in_child, built_entry, check_precision
from .onnx_runner import KVLayout, OnnxRunner
from .prefix_cache import BLOCK_TOKENS
from .textgen import DEFAULT_MAX_TOKENS_LIMIT, Detokenizer, Sampling, TextRow, chat_messages, heal_prefix, token_budget
from .token_choice import pick_tokens
from .tools import check_tools, with_tools

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SLOTS = 16  # requests decoded together; the executor's capacity for this model
PREFILL_CHUNK = 128  # prompt tokens read per step: bounds how long running requests wait for a newcomer
DEFAULT_KV_CACHE_BYTES = 1 << 30  # the key/value cache's cap when neither the node nor the spec sets one
ARRAYS_FIRST_TOKENS = 4096  # the default prefix cache takes half the cap, but only what leaves the arrays this many
REPLAY_MAX = 128  # a taken-over answer this long is read a token a step (ChatScheduler); longer: in chunks
_IDLE_WAIT = 0.25  # seconds the engine sleeps on an empty queue before checking for shutdown
_PREPARE_WAIT = 0.005  # while only preparations are under way: how long to wait for one before looking again


@dataclass(eq=False)
class _Request:
    """One request in the engine: its scheduling record, its text, and how its tokens are chosen."""

    job: Job
    sched: SchedSeq
    text: TextRow | None = None  # set once prepared
    next_token: int = 0  # fed at the next decode step
    rng: np.random.Generator | None = None
    heal_ids: list[int] | None = None
    matcher: Matcher | None = None  # the grammar the answer must follow (params["guidance"])
    preparing: concurrent.futures.Future[_Prepared] | None = None
    chain: list[bytes] | None = None  # a chat's chain of message digests (what the prefix cache's summary says)
    first_tokens: int = 0  # tokens the chat's first message takes in the prompt


@dataclass
class _Prepared:
    """What preparing a request made, off the engine thread."""

    tokens: list[int]  # prompt + prefix, as the model reads them
    text: TextRow
    need: int
    rng: np.random.Generator | None
    heal_ids: list[int] | None
    matcher: Matcher | None
    first_tokens: int = 0
    replay: int = 0  # its last tokens are an answer streamed elsewhere (ChatScheduler)


class OnnxChat(Backend):
    """Serves CHAT and COMPLETE with continuous batching on onnxruntime.

    `path` is a .gguf file (or a folder holding one), an HF model folder (both built once into the model cache
    at `precision`), or a folder already built by onnxruntime-genai (genai_config.json + model.onnx).
    `kv_cache_bytes` caps the key/value cache (all running requests together); `prefix_cache_bytes` of it (default
    half, 0: none) is the prefix cache's pool, the rest the running requests' arrays.
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
        kv_cache_bytes: int | None = None,
        prefix_cache_bytes: int | None = None,
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
        self.kv_cache_bytes = kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
        self.prefix_cache_bytes = prefix_cache_bytes  # None: the default share, set once the model's shape is known
        self.loaded_from = ""  # "onnx" (given built folder), "build" (built now) or "cache"
        self.model_dir: Path | None = None
        self._session: Any = None
        self._runner: OnnxRunner | None = None
        self._scheduler: ChatScheduler | None = None
        self._tokenizer: Any = None
        self._template: ChatTemplate | None = None
        self._grammar: GrammarTokenizer | None = None
        self._eos: frozenset[int] = frozenset()
        self._vocab_size = 0
        self._vocab: list[str] | None = None
        self._preparer: concurrent.futures.ThreadPoolExecutor | None = None
        self._worked = False  # a step ran since the engine last went idle
        self.failed_alone = 0  # requests that failed on their own while others went on
        self._conversations = ConversationIndex()  # chains of chat messages the prefix cache holds
        self.prefix_summary = b""  # what the prefix cache holds, for gossip (read by the mesh loop; swapped whole)

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
        page_out_file(folder)  # the weights onnxruntime read only to prepack copies of its own (as a stage does)
        inputs = {i.name: i for i in session.get_inputs()}
        names = decoder.get("inputs", {})
        outputs = decoder.get("outputs", {})
        past_k = names.get("past_key_names", "past_key_values.%d.key")
        past_v = names.get("past_value_names", "past_key_values.%d.value")
        present_k = outputs.get("present_key_names", "present.%d.key")
        present_v = outputs.get("present_value_names", "present.%d.value")
        layers = int(decoder["num_hidden_layers"])
        kv_names = [(past_k % i, past_v % i, present_k % i, present_v % i) for i in range(layers)]
        if missing := {"input_ids", "attention_mask", kv_names[0][0]} - set(inputs):
            raise ValueError(f"{folder}: the model lacks inputs {sorted(missing)}; not a decoder with a KV cache")
        dtype = np.float16 if "float16" in inputs[kv_names[0][0]].type else np.float32
        context = int(model.get("context_length") or config.get("search", {}).get("max_length") or 2048)
        self.context = min(self.context, context) if self.context else context
        self._vocab_size = int(model["vocab_size"])
        layout = KVLayout(layers, int(decoder["num_key_value_heads"]), int(decoder["head_size"]),
                          np.dtype(dtype).itemsize)  # fmt: skip
        self._runner = OnnxRunner(session, kv_names, layout, dtype, self._vocab_size, "position_ids" in inputs)
        self._scheduler = self._new_scheduler(layout)
        eos = model.get("eos_token_id")
        self._eos = frozenset(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        template = find_template(folder)
        self._template = ChatTemplate(template, special_tokens(folder)) if template else None
        self._grammar = GrammarTokenizer(self._tokenizer.to_str(), self._eos, self._vocab_size)
        self._session = session
        self._preparer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{self.name}")
        self.labels.update({"device": "cpu", "gpu": "false", "engine": "onnxruntime"})

    def _new_scheduler(self, layout: KVLayout) -> ChatScheduler:
        """The scheduler for the cache cap; with a cap too small for the slots or the context, fewer of them (said
        in the log), and a cap too small for one short request is an error."""
        assert self.context is not None and self._runner is not None
        per_token = layout.bytes_per_token
        if self.prefix_cache_bytes is None:
            room = self.kv_cache_bytes - ARRAYS_FIRST_TOKENS * per_token
            self.prefix_cache_bytes = max(0, min(self.kv_cache_bytes // 2, room))
        if self.prefix_cache_bytes >= self.kv_cache_bytes:
            raise ValueError(
                f"a {self.prefix_cache_bytes >> 20} MiB prefix cache leaves nothing of the {self.kv_cache_bytes >> 20} "
                f"MiB key/value cache for running requests: give the prefix cache less, or raise --kv-cache"
            )
        kv_tokens = (self.kv_cache_bytes - self.prefix_cache_bytes) // per_token
        blocks = self.prefix_cache_bytes // (BLOCK_TOKENS * per_token)
        scheduler = ChatScheduler(self.max_batch, kv_tokens, self.context, self.prefill_chunk, cache_blocks=blocks)
        self._runner.open_pool(blocks, BLOCK_TOKENS)
        self._conversations.clear()
        self.prefix_summary = b""
        longest = scheduler.max_need()
        if longest < self.context:
            log.warning(
                "model %s: a %d MiB key/value cache holds one request of at most %d tokens (context %d): longer "
                "requests are refused; raise --kv-cache to serve them",
                self.name, self.kv_cache_bytes >> 20, longest, self.context,
            )  # fmt: skip
        log.info(
            "model %s: key/value cache at most %d MiB (%d tokens at %d KiB each: e.g. %d requests of %d tokens), "
            "%d MiB of it the prefix cache (%d tokens)",
            self.name, self.kv_cache_bytes >> 20, kv_tokens, layout.bytes_per_token >> 10,
            max(1, min(self.max_batch, kv_tokens // max(1, min(longest, 2048)))), min(longest, 2048),
            self.prefix_cache_bytes >> 20, blocks * BLOCK_TOKENS,
        )  # fmt: skip
        return scheduler

    def close(self) -> None:
        if self._preparer is not None:
            self._preparer.shutdown(wait=False, cancel_futures=True)
        self._session = None
        self._runner = None

    def files(self) -> tuple[str, Path] | None:
        return None if self.model_dir is None else ("onnx-chat", self.model_dir)

    def describe(self) -> dict[str, Any]:
        out = super().describe() | {"precision": self.precision, "engine": "onnxruntime-genai build, continuous"}
        if self._runner is not None:
            out |= {"kv_cache_mib": self.kv_cache_bytes >> 20, "kv_cache_held_mib": self._runner.bytes_held >> 20,
                    "prefix_cache_mib": (self.prefix_cache_bytes or 0) >> 20}  # fmt: skip
        return out

    def cache_stats(self) -> dict[str, int]:
        """The prefix cache's counters for /metrics (read on another thread: plain ints)."""
        cache, runner = self._scheduler.cache if self._scheduler is not None else None, self._runner
        return {} if cache is None or runner is None else cache_counters(cache, runner.layout.bytes_per_token)

    # ------------------------------------------------------------ serving

    def run(self, batch: list[Job]) -> None:
        """Serve a fixed batch to the end (tests, or a caller without a queue); `serve` is the real loop."""
        self.serve(_ListSource(batch))

    def serve(self, source: JobSource) -> None:
        scheduler, runner = self._scheduler, self._runner
        if scheduler is None or runner is None or self._session is None:
            for job in source.take(1 << 30, 0):
                job.fail(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
            return
        held: dict[int, _Request] = {}  # id(SchedSeq) -> request
        try:
            while True:
                self._take_prepared(held)
                if scheduler.has_work():
                    wait = 0.0
                elif scheduler.busy():
                    wait = _PREPARE_WAIT
                else:
                    wait = _IDLE_WAIT
                for job in source.take(scheduler.room(), wait):
                    self._admit(job, held)
                self._drop_unwanted(held)
                plan = scheduler.schedule()
                if plan is not None:
                    self._step(plan, held)
                    self._worked = True
                elif not scheduler.busy():
                    if source.stopping:
                        return
                    self._idle()
        except Exception as exc:
            # A failure of the engine itself (not of one request: those fail alone) ends what it holds as INTERNAL
            # (entry nodes retry them elsewhere); the executor's lane starts the engine again.
            why = f"model {self.name} failed: {type(exc).__name__}: {exc}"
            for request in held.values():
                request.job.fail(ErrorCode.INTERNAL, why)
            self._scheduler = self._new_scheduler(runner.layout)
            runner.release()
            raise

    def _idle(self) -> None:
        assert self._scheduler is not None and self._runner is not None
        if self._scheduler.idle() and self._runner.rows:
            self._runner.release()  # nothing runs: the cache's memory goes back
        if self._worked:
            self._worked = False
            release_free_memory()  # once per idle spell: what the steps freed goes back to the system

    def _admit(self, job: Job, held: dict[int, _Request]) -> None:
        assert self._scheduler is not None and self._preparer is not None
        if job.done:
            return
        if job.expired():
            job.fail(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the model could start")
            return
        request = _Request(job, SchedSeq(owner=job, need=0))
        self._scheduler.add(request.sched)
        held[id(request.sched)] = request
        request.preparing = self._preparer.submit(self._prepare, job)

    def _take_prepared(self, held: dict[int, _Request]) -> None:
        """Requests whose preparation finished: ready to be scheduled, or failed alone."""
        scheduler = self._scheduler
        assert scheduler is not None
        for seq in list(scheduler.preparing):
            request = held[id(seq)]
            future = request.preparing
            if future is None or not future.done():
                continue
            request.preparing = None
            try:
                prepared = future.result()
            except ValueError as exc:
                self._fail_alone(request, ErrorCode.BAD_REQUEST, str(exc), held, log_it=False)
                continue
            except Exception as exc:  # noqa: BLE001 - a request that breaks fails alone
                self._fail_alone(request, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", held)
                continue
            request.text, request.rng = prepared.text, prepared.rng
            request.heal_ids, request.matcher = prepared.heal_ids, prepared.matcher
            request.first_tokens = prepared.first_tokens
            if prepared.text.budget <= 0:  # a failed-over stream that had already used its whole max_tokens
                prepared.text.finish("length", self.name)
                self._end(request, SeqState.FINISHED, held)
                continue
            try:
                scheduler.prepared(seq, prepared.tokens, prepared.need, prepared.replay)
            except ValueError as exc:
                held.pop(id(seq), None)
                request.job.fail(ErrorCode.BAD_REQUEST, str(exc))

    def _prepare(self, job: Job) -> _Prepared:
        """Template, tokens, budget and grammar of one request; runs on the preparation thread, so a long prompt or
        a large grammar never stalls the requests being decoded. ValueError: the request is at fault."""
        import numpy as np

        req = job.request
        sampling = Sampling.from_params(req.params, self.max_tokens_limit)
        guidance = parse_guidance(req.params)
        first = 0
        if req.task is Task.CHAT:
            tools = check_tools(req.params["tools"]) if req.params.get("tools") is not None else None
            prompt_ids, first = self._chat_prompt(req.input, tools)
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
        text.cached_tokens = 0 if self.prefix_cache_bytes else None
        rng = None
        if not sampling.greedy:
            rng = np.random.default_rng(sampling.seed % (2**63) if sampling.seed is not None else None)
        need = len(context) + max(budget.new_tokens, 0)
        replay = len(prefix_ids) if len(prefix_ids) <= REPLAY_MAX else 0
        return _Prepared(context, text, need, rng, heal[1] if heal else None, matcher, first, replay)

    def _chat_ids(self, messages: Any, tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self._chat_prompt(messages, tools)[0]

    def _chat_prompt(self, messages: Any, tools: list[dict[str, Any]] | None = None) -> tuple[list[int], int]:
        """The prompt's tokens, and (with a prefix cache) how many of them its first message takes."""
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
        first = 0
        if self.prefix_cache_bytes and len(clean) > 1:  # the summary ties the first message (a system prompt) alone
            first = len(self._encode(self._template.render(clean[:1], tools=tools, generation=False), special=False))
        return ids, first

    def _encode(self, text: str, *, special: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=special).ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _vocab_text(self) -> list[str]:
        """Each token's text on its own; built on the first taken-over stream (on the preparation thread)."""
        if self._vocab is None:
            self._vocab = [str(t) for t in self._tokenizer.decode_batch([[i] for i in range(self._vocab_size)])]
        return self._vocab

    # ------------------------------------------------------------ ending requests

    def _end(self, request: _Request, state: SeqState, held: dict[int, _Request]) -> None:
        assert self._scheduler is not None
        self._scheduler.end(request.sched, state)
        held.pop(id(request.sched), None)
        if request.preparing is not None:
            request.preparing.cancel()
        if state is SeqState.FINISHED and request.sched.chain and request.text is not None:
            seq, text = request.sched, request.text
            self._conversations.remember(request.job.request, text.text, seq.chain, request.first_tokens,
                                         text.prompt_tokens, len(seq.tokens))  # fmt: skip

    def _fail_alone(
        self, request: _Request, code: ErrorCode, why: str, held: dict[int, _Request], *, log_it: bool = True
    ) -> None:
        if log_it:
            self.failed_alone += 1
            log.warning("model %s: request %s failed alone: %s", self.name, request.job.request.id, why)
        request.job.fail(code, why)
        self._end(request, SeqState.FAILED, held)

    def _drop_unwanted(self, held: dict[int, _Request]) -> None:
        """Between steps: answered (cancelled) and expired requests leave, freeing their slots."""
        for request in list(held.values()):
            job = request.job
            if not job.done and job.expired():
                done = request.text.generated if request.text is not None else 0
                job.fail(ErrorCode.DEADLINE_EXCEEDED, f"deadline passed after {done} tokens")
            if job.done:
                self._end(request, SeqState.ABORTED, held)

    # ------------------------------------------------------------ one step

    def _step(self, plan: StepPlan, held: dict[int, _Request]) -> None:
        runner = self._runner
        assert runner is not None and self.context is not None
        for row, saved in plan.saves:  # first: the rows they come from may move or shrink below
            runner.save_blocks(row, saved.start, saved.slots)
        for src, dst, tokens in plan.moves:
            runner.move(src, dst, tokens)
        runner.resize(plan.rows, plan.length)
        if plan.load and plan.prefill is not None:
            runner.load_blocks(plan.prefill.slot, plan.load)
            text = held[id(plan.prefill)].text
            if text is not None:
                text.cached_tokens = plan.prefill.reused
        if plan.prefill is not None:
            self._prefill(plan.prefill, plan.chunk, held)
        if plan.decode:
            self._decode_step(plan.decode, held)
        if self._scheduler is not None and self._scheduler.cache is not None:
            self.prefix_summary = self._conversations.summary_now(self._scheduler.cache, self.prefix_summary)

    def _prefill(self, seq: SchedSeq, chunk: list[int], held: dict[int, _Request]) -> None:
        runner, scheduler = self._runner, self._scheduler
        assert runner is not None and scheduler is not None
        request = held[id(seq)]
        try:
            logits = runner.prefill(seq.slot, chunk, seq.cached)
        except Exception as exc:  # noqa: BLE001 - only this request was in the step
            self._fail_alone(request, ErrorCode.INTERNAL, f"reading the prompt failed: {type(exc).__name__}: {exc}",
                             held)  # fmt: skip
            return
        if not scheduler.prefilled(seq, len(chunk)):
            return  # more of the prompt next step; running requests advance meanwhile
        token = self._choose([request], logits[None, :], held)[0]
        if token is None:
            return
        if self._advance(request, token, held):
            request.next_token = token
            scheduler.start(seq)

    def _decode_step(self, rows: list[SchedSeq], held: dict[int, _Request]) -> None:
        runner, scheduler = self._runner, self._scheduler
        assert runner is not None and scheduler is not None and self.context is not None
        requests = [held[id(seq)] for seq in rows]
        try:
            logits = runner.decode([r.next_token for r in requests], [seq.cached for seq in rows])
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine goes on
            why = f"a decode step failed: {type(exc).__name__}: {exc}"
            for request in requests:
                self._fail_alone(request, ErrorCode.INTERNAL, why, held)
            return
        tokens = self._choose(requests, logits, held)
        self.steps += 1
        self.row_steps += len(rows)
        for request, token in zip(requests, tokens, strict=True):
            if token is None:
                continue  # failed alone while its token was chosen
            scheduler.decoded(request.sched, request.next_token)
            if not self._advance(request, token, held):
                continue
            if request.sched.cached >= self.context:  # the context is full: the answer ends here
                assert request.text is not None
                request.text.finish("length", self.name)
                self._end(request, SeqState.FINISHED, held)
                continue
            request.next_token = token

    def _choose(self, requests: list[_Request], logits: np.ndarray, held: dict[int, _Request]) -> list[int | None]:
        """Each request's next token; one whose grammar or sampling breaks fails alone (None)."""
        chosen, errors = pick_tokens(requests, logits)
        for i, error in errors.items():
            self._fail_alone(requests[i], ErrorCode.INTERNAL, error, held)
        return chosen

    def _advance(self, request: _Request, token: int, held: dict[int, _Request]) -> bool:
        """Take one chosen token; False when the request has ended (answered, or failed alone)."""
        assert request.text is not None
        try:
            if not request.text.advance(token, self._eos, self.name):
                self._end(request, SeqState.FINISHED, held)
                return False
            if request.matcher is not None and request.matcher.finished:  # nothing may follow: the answer is done
                request.text.end(self.name)
                self._end(request, SeqState.FINISHED, held)
                return False
        except Exception as exc:  # noqa: BLE001 - one request's text failing must not end the others
            self._fail_alone(request, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", held)
            return False
        return True

    # ------------------------------------------------------------ quality checks

    def perplexity(self, text: str) -> tuple[float, int]:
        """exp(mean negative log-likelihood) of `text`'s tokens after its first, and how many were scored.

        For quality checks of a build (int4 against fp32); it uses a cache of its own, so call it while the
        engine is not serving.
        """
        if self._runner is None:
            raise RuntimeError(f"model {self.name} is not loaded")
        ids = self._encode(text, special=True)
        if len(ids) < 2:
            raise ValueError("need at least two tokens to score")
        return self._runner.perplexity(ids, self.prefill_chunk)


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
