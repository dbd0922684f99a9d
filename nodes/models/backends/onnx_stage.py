"""A pipeline stage: a range of a model's layers on onnxruntime, continuous like the chat engine (docs/ARCHITECTURE.md,
"A model across nodes"). `stage_scheduler` decides, `onnx_stage_runner` runs, `stage_text` reads requests (first
stage) and chooses tokens (last); this engine takes requests from the executor (first stage) and `Stage` messages
from the mesh loop (`stage_in`), and sends what it computed on (`attach`). The first stage owns the request: its
job answers the entry, and it closes the sequence on every stage when it ends. A sequence that fails fails alone.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol import DecodeError, ErrorCode, Request, Stage, decode, encode

from .base import Backend, Job, JobSource, ProgressFn, release_free_memory
from .chat_template import ChatTemplate, find_template, special_tokens
from .guidance import GrammarTokenizer
from .onnx_stage_runner import StageRunner, open_stage, stage_folder
from .stage_scheduler import StageInput, StagePlan, StageScheduler, StageSeq, StageState
from .stage_text import Chooser, Emitter, PromptReader, grammar_tokenizer, make_chooser
from .textgen import DEFAULT_MAX_TOKENS_LIMIT, TextRow
from .token_choice import pick_tokens

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# (node, [(header, tensor or None), ...]): the mesh sends them to that node as one multi-part message, so a group of
# sequences that ran together arrives together (and runs together at the next stage)
SendFn = Callable[[str, list[tuple[Stage, Any]]], None]
DEFAULT_SLOTS = 16
PREFILL_CHUNK = 128  # as the unsplit engine reads prompts: the same chunks give the same numbers
_IDLE_WAIT = 0.25
_PREPARE_WAIT = 0.005
_CLOSED_KEPT = 4096  # ids of sequences closed here, so a late input does not open them again


@dataclass(eq=False)
class _Seq:
    """One sequence at this stage."""

    id: str
    sched: StageSeq
    stages: tuple[tuple[str, str], ...]
    index: int  # this stage's place in the chain
    deadline: float
    request: bytes = b""  # the encoded request, passed on to the next stage with the first input
    need: int = 0
    extra: Any = None  # the first stage's notes for the last (healing, the answer's tokens so far)
    opened_next: bool = False
    job: Job | None = None  # the first stage: the request's job
    emitter: Emitter | None = None
    text: TextRow | None = None
    chooser: Chooser | None = None  # the last stage
    preparing: concurrent.futures.Future[Any] | None = None

    @property
    def first(self) -> str:
        return self.stages[0][0]


class OnnxStage(Backend):
    """Layers `first`..`last` of the chat model at `path` (a .gguf, an HF folder or an onnxruntime-genai build)."""

    continuous = True

    def __init__(
        self,
        name: str,
        model: str,
        path: str | Path,
        first: int,
        last: int,
        *,
        cache_dir: str | Path | None = None,
        precision: str = "int4",
        max_batch: int = DEFAULT_SLOTS,
        max_tokens_limit: int | None = None,
        context: int | None = None,
        threads: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        kv_cache_bytes: int | None = None,
    ) -> None:
        super().__init__()
        from protocol import Task

        self.name = name
        self.model = model
        self.tasks = frozenset({Task.CHAT, Task.COMPLETE})
        self.path = Path(path).expanduser()
        self.first, self.last = first, last
        self.cache_dir = cache_dir
        self.precision = precision
        self.max_batch = max_batch
        self.concurrency = 1
        self.max_tokens_limit = max_tokens_limit or DEFAULT_MAX_TOKENS_LIMIT
        self.context = context
        self.threads = threads
        self.prefill_chunk = prefill_chunk
        self.kv_cache_bytes = kv_cache_bytes
        self.model_layers = 0
        self.built: Path | None = None  # the whole build the stage was cut from (its version is the model's)
        self.stage_dir: Path | None = None
        self.node_id = ""
        self._send: SendFn | None = None
        self._runner: StageRunner | None = None
        self._scheduler: StageScheduler | None = None
        self._reader: PromptReader | None = None
        self._tokenizer: Any = None
        self._grammar: GrammarTokenizer | None = None
        self._eos: frozenset[int] = frozenset()
        self._vocab_size = 0
        self._preparer: concurrent.futures.ThreadPoolExecutor | None = None
        self._inbox: collections.deque[tuple[Stage, Any]] = collections.deque()  # from the mesh loop
        self._wake: Callable[[], None] = lambda: None
        self._seqs: dict[str, _Seq] = {}
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._worked = False
        self.failed_alone = 0

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.model_layers > 0 and self.last == self.model_layers - 1

    @property
    def held_for_others(self) -> int:  # type: ignore[override]  # a count, read-only here
        """Sequences held for pipelines whose request is on another node (they count in this stage's load)."""
        return 0 if self.is_first else len(self._seqs)

    # ------------------------------------------------------------ loading

    def load(self, progress: ProgressFn | None = None) -> None:
        self.built, folder = stage_folder(self.model, self.path, self.first, self.last, self.precision,
                                          self.cache_dir, progress)  # fmt: skip
        runner, facts = open_stage(folder, self.first, self.last, self.threads)
        self.model_layers = facts.layers
        self.context = min(self.context, facts.context) if self.context else facts.context
        self._vocab_size, self._eos, self._runner = facts.vocab_size, facts.eos, runner
        if self.kv_cache_bytes is None:  # the whole model's default, for this stage's share of the layers
            self.kv_cache_bytes = (1 << 30) * runner.layout.layers // self.model_layers
        self._scheduler = self._new_scheduler()
        # Only the first stage reads text: a later stage never imports the tokenizers library (3 MiB a process keeps
        # once it has), and the last one reads the vocabulary only when a request with a grammar comes.
        if self.is_first:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            self._tokenizer.no_padding()
            self._tokenizer.no_truncation()
            template = find_template(folder)
            self._reader = PromptReader(
                self.model, self._tokenizer, ChatTemplate(template, special_tokens(folder)) if template else None,
                self._vocab_size, self.context, self.max_tokens_limit,
            )  # fmt: skip
        self._preparer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"prepare-{self.name}")
        self.labels.update({"device": "cpu", "gpu": "false", "engine": "onnxruntime"})
        self.stage_dir = folder
        if progress is not None:
            progress(f"{self.name}: ready", 1.0)

    def _new_scheduler(self) -> StageScheduler:
        assert self._runner is not None and self.context is not None and self.kv_cache_bytes is not None
        kv_tokens = self.kv_cache_bytes // self._runner.layout.bytes_per_token
        scheduler = StageScheduler(self.max_batch, kv_tokens, self.context, self.prefill_chunk)
        log.info("stage %s: key/value cache at most %d MiB (%d tokens)", self.name, self.kv_cache_bytes >> 20,
                 kv_tokens)  # fmt: skip
        return scheduler

    def attach(self, node_id: str, send: SendFn) -> None:
        """Where this stage's output goes: the mesh sends `Stage` messages for it (set once the mesh runs)."""
        self.node_id, self._send = node_id, send

    def close(self) -> None:
        if self._preparer is not None:
            self._preparer.shutdown(wait=False, cancel_futures=True)
        self._runner = None

    def files(self) -> tuple[str, Path] | None:
        return None if self.built is None else ("onnx-chat", self.built)

    def describe(self) -> dict[str, Any]:
        out = super().describe() | {"precision": self.precision, "engine": "onnxruntime stage, continuous",
                                    "layers": f"{self.first}-{self.last} of {self.model_layers}"}  # fmt: skip
        if self._runner is not None and self.kv_cache_bytes:
            out |= {"kv_cache_mib": self.kv_cache_bytes >> 20, "kv_cache_held_mib": self._runner.bytes_held >> 20}
        return out

    # ------------------------------------------------------------ from the mesh loop (any thread)

    def stage_in(self, msg: Stage, tensor: Any, wake: bool = True) -> None:
        """A message for this stage (`tensor`: a zero-copy buffer of its frame, or None); `wake=False` when more of
        the same group follow (then `wake()` once they are all in)."""
        self._inbox.append((msg, tensor))
        if wake:
            self._wake()

    def wake(self) -> None:
        self._wake()

    def cancel_sequence(self, seq_id: str, why: str) -> None:
        self.stage_in(Stage(seq_id, self.name, "close", self.node_id, data=why), None)

    # ------------------------------------------------------------ serving

    def run(self, batch: list[Job]) -> None:
        for job in batch:
            job.fail(ErrorCode.BAD_REQUEST, f"{self.name} is one stage of {self.model}: ask for {self.model}")

    def serve(self, source: JobSource) -> None:
        scheduler, runner = self._scheduler, self._runner
        if scheduler is None or runner is None:
            for job in source.take(1 << 30, 0):
                job.fail(ErrorCode.UNAVAILABLE, f"model {self.name} is not loaded")
            return
        self._wake = getattr(source, "wake", lambda: None)
        try:
            while True:
                self._take_prepared()
                ready = any(s.ready() for s in scheduler.active) or bool(self._inbox)
                wait = 0.0 if ready else _PREPARE_WAIT if scheduler.busy() else _IDLE_WAIT
                for job in source.take(scheduler.room() if self.is_first else 0, wait):
                    self._admit(job)
                self._drain_inbox()
                self._drop_unwanted()
                plan = scheduler.schedule(groups=self.is_first)
                if plan is not None:
                    self._step(plan)
                    self._worked = True
                elif not scheduler.busy() and not self._inbox:
                    if source.stopping:
                        return
                    self._idle()
        except Exception as exc:
            why = f"stage {self.name} failed: {type(exc).__name__}: {exc}"
            for seq in list(self._seqs.values()):
                self._fail(seq, ErrorCode.INTERNAL, why)
            self._scheduler = self._new_scheduler()
            runner.release()
            raise

    def _idle(self) -> None:
        assert self._scheduler is not None and self._runner is not None
        if self._scheduler.idle() and self._runner.rows:
            self._runner.release()
        if self._worked:
            self._worked = False
            release_free_memory()

    # ------------------------------------------------------------ sequences in

    def _admit(self, job: Job) -> None:
        """A request at the first stage (from the entry, through the executor's queue)."""
        assert self._scheduler is not None and self._preparer is not None and self._reader is not None
        req = job.request
        if job.done:
            return
        if not req.stages or req.stages[0][1] != self.name or len({n for n, _ in req.stages}) != len(req.stages):
            job.fail(ErrorCode.BAD_REQUEST, f"{self.name} is one stage of {self.model}: ask for {self.model}")
            return
        if job.expired():
            job.fail(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the model could start")
            return
        emitter = Emitter(job)
        sched = StageSeq(owner=req.id, need=0, stages=len(req.stages))
        seq = _Seq(req.id, sched, req.stages, 0, job.deadline, job=job, emitter=emitter)
        self._seqs[seq.id] = seq
        self._scheduler.add(seq.sched, preparing=True)
        seq.preparing = self._preparer.submit(self._reader.read, emitter)

    def _take_prepared(self) -> None:
        assert self._scheduler is not None
        for sched in list(self._scheduler.preparing):
            seq = self._seqs.get(sched.owner)
            if seq is None or seq.preparing is None or not seq.preparing.done():
                continue
            future, seq.preparing = seq.preparing, None
            try:
                prepared = future.result()
            except ValueError as exc:
                self._fail(seq, ErrorCode.BAD_REQUEST, str(exc), alone=False)
                continue
            except Exception as exc:  # noqa: BLE001 - a request that breaks fails alone
                self._fail(seq, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
                continue
            if self.is_first:
                self._first_ready(seq, prepared)
            else:
                seq.chooser = prepared
                self._scheduler.prepared(sched, seq.need)

    def _first_ready(self, seq: _Seq, read: Any) -> None:
        assert self._scheduler is not None and seq.job is not None
        seq.text = read.text
        if read.text.budget <= 0:  # a resumed stream that had used its whole max_tokens
            read.text.finish("length", self.model)
            self._end(seq, StageState.FINISHED)
            return
        try:
            self._scheduler.prepared(seq.sched, read.need)
        except ValueError as exc:
            self._seqs.pop(seq.id, None)
            seq.job.fail(ErrorCode.BAD_REQUEST, str(exc))
            return
        seq.need = read.need
        seq.request = encode(seq.job.request)
        seq.extra = {"heal": read.heal_ids, "prefix": read.prefix, "budget": read.text.budget}
        replay = read.replay
        self._scheduler.feed(seq.sched, StageInput(0, read.tokens, last=True, due=not replay))
        for i, token in enumerate(replay):  # a failed chain's tokens: one decode step each, as they were made
            position = len(read.tokens) + i
            self._scheduler.feed(seq.sched, StageInput(position, [token], last=True, due=i == len(replay) - 1))

    def _drain_inbox(self) -> None:
        while self._inbox:
            msg, tensor = self._inbox.popleft()
            try:
                self._on_message(msg, tensor)
            except Exception:  # one bad message must not stop the stage
                log.exception("stage %s: a %s message for %s failed", self.name, msg.kind, msg.id)

    def _on_message(self, msg: Stage, tensor: Any) -> None:
        seq = self._seqs.get(msg.id)
        if msg.kind == "close":
            if seq is not None:
                self._end(seq, StageState.ABORTED, tell=False)
            self._remember_closed(msg.id)
            return
        if msg.kind == "token":
            if seq is not None and self.is_first:
                self._on_token(seq, msg)
            elif seq is not None and isinstance(msg.data, dict) and "code" in msg.data:  # its next node is gone
                self._fail(seq, ErrorCode.UNAVAILABLE, str(msg.data.get("message", "")), alone=False)
            return
        if seq is None:
            if msg.id in self._closed:
                return  # a late input of a sequence already over
            if not msg.request:
                self._tell_first(msg.first, msg.id, ErrorCode.UNAVAILABLE,
                                 f"stage {self.name} on {self.node_id} no longer holds this sequence")  # fmt: skip
                return
            seq = self._open(msg)
            if seq is None:
                return
        self._feed(seq, msg, tensor)

    def _open(self, msg: Stage) -> _Seq | None:
        """The first input of a sequence at a later stage: its request, chain and need come with it."""
        assert self._scheduler is not None and self._preparer is not None
        stages = msg.stages
        index = next((i for i, (n, s) in enumerate(stages) if n == self.node_id and s == self.name), -1)
        deadline = time.monotonic() + msg.deadline_ms / 1000
        if index < 1:
            why = f"{self.name} on {self.node_id} is not in the chain"
            self._tell_first(msg.first, msg.id, ErrorCode.INTERNAL, why)
            return None
        seq = _Seq(msg.id, StageSeq(owner=msg.id, need=msg.need), stages, index, deadline, msg.request, msg.need,
                   msg.data)  # fmt: skip
        try:
            req = decode(msg.request)
            if not isinstance(req, Request):
                raise DecodeError("the request of a stage's first input is not a Request")
            self._scheduler.check_need(msg.need)
        except (DecodeError, ValueError) as exc:
            self._tell_first(msg.first, msg.id, ErrorCode.BAD_REQUEST, f"stage {self.name}: {exc}")
            return None
        self._seqs[seq.id] = seq
        if not self.is_last:
            self._scheduler.add(seq.sched)
            return seq
        extra = msg.data if isinstance(msg.data, dict) else {}
        heal, prefix = extra.get("heal") or None, list(extra.get("prefix") or [])
        budget = int(extra.get("budget") or msg.need)
        grammar = self._grammar_tokenizer() if req.params.get("guidance") is not None else None
        self._scheduler.add(seq.sched, preparing=True)  # the grammar compiles off the engine thread
        seq.preparing = self._preparer.submit(make_chooser, req, self.max_tokens_limit, grammar, heal, prefix,
                                              budget)  # fmt: skip
        return seq

    def _grammar_tokenizer(self) -> GrammarTokenizer:
        if self._grammar is None:
            assert self.stage_dir is not None
            self._grammar = grammar_tokenizer(self.stage_dir, self._eos, self._vocab_size)
        return self._grammar

    def _feed(self, seq: _Seq, msg: Stage, tensor: Any) -> None:
        import numpy as np

        assert self._scheduler is not None
        sched = seq.sched
        expected = sched.cached + sum(i.left for i in sched.inputs)
        if msg.start != expected or (tensor is None) != (not msg.shape):
            self._fail(seq, ErrorCode.UNAVAILABLE, f"stage {self.name} got positions from {msg.start}, expected "
                                                   f"{expected}: an input was lost")  # fmt: skip
            return
        hidden = None
        if tensor is not None:
            hidden = np.frombuffer(tensor, dtype=np.dtype(msg.dtype)).reshape(msg.shape)
        self._scheduler.feed(sched, StageInput(msg.start, list(msg.tokens), hidden, msg.last, msg.due))

    def _on_token(self, seq: _Seq, msg: Stage) -> None:
        """The first stage: the last stage chose a token (or a stage failed the sequence)."""
        data = msg.data if isinstance(msg.data, dict) else {}
        if "code" in data:
            try:
                code = ErrorCode(int(data["code"]))
            except (ValueError, TypeError):
                code = ErrorCode.INTERNAL
            self._fail(seq, code, str(data.get("message", "a stage failed")), alone=False, tell=True)
            return
        if seq.text is None or seq.emitter is None or not msg.tokens or seq.job is None or seq.job.done:
            return
        token = msg.tokens[0]
        seq.emitter.unsent.append(token)
        try:
            if not seq.text.advance(token, self._eos, self.model):
                self._end(seq, StageState.FINISHED)
                return
            if data.get("end"):  # its grammar allows nothing more
                seq.text.end(self.model)
                self._end(seq, StageState.FINISHED)
                return
        except Exception as exc:  # noqa: BLE001 - one request's text failing must not end the others
            self._fail(seq, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        assert self.context is not None
        if seq.sched.cached + 1 >= self.context:  # the context is full: the answer ends here
            seq.text.finish("length", self.model)
            self._end(seq, StageState.FINISHED)
            return
        assert self._scheduler is not None
        self._scheduler.feed(seq.sched, StageInput(seq.sched.cached, [token], last=True, due=True))

    # ------------------------------------------------------------ sequences out

    def _drop_unwanted(self) -> None:
        now = time.monotonic()
        for seq in list(self._seqs.values()):
            if seq.job is not None:
                if not seq.job.done and seq.job.expired():
                    done = seq.text.generated if seq.text is not None else 0
                    seq.job.fail(ErrorCode.DEADLINE_EXCEEDED, f"deadline passed after {done} tokens")
                if seq.job.done:  # answered elsewhere: cancelled, or expired just now
                    self._end(seq, StageState.ABORTED)
            elif now >= seq.deadline:
                self._end(seq, StageState.ABORTED, tell=False)

    def _end(self, seq: _Seq, state: StageState, *, tell: bool = True) -> None:
        """`seq` is over here; the first stage closes it on every other stage (tell)."""
        assert self._scheduler is not None
        self._scheduler.end(seq.sched, state)
        self._seqs.pop(seq.id, None)
        self._remember_closed(seq.id)
        if seq.preparing is not None:
            seq.preparing.cancel()
        if tell and self.is_first:
            why = state.value
            for node, stage in seq.stages[1:]:
                self._emit(node, [(Stage(seq.id, stage, "close", self.node_id, data=why), None)])

    def _fail(self, seq: _Seq, code: ErrorCode, why: str, *, alone: bool = True, tell: bool = True) -> None:
        """`seq` fails: at the first stage its caller hears `code`; elsewhere the first stage is told."""
        if alone:
            self.failed_alone += 1
            log.warning("stage %s: sequence %s failed alone: %s", self.name, seq.id, why)
        if seq.job is not None:
            seq.job.fail(code, why)
        else:
            self._tell_first(seq.first, seq.id, code, why)
        self._end(seq, StageState.FAILED, tell=tell)

    def _tell_first(self, first: str, seq_id: str, code: ErrorCode, why: str) -> None:
        stage = next((s for n, s in self._seqs[seq_id].stages if n == first), "") if seq_id in self._seqs else ""
        data = {"code": int(code), "message": why}
        self._emit(first, [(Stage(seq_id, stage or self.model, "token", first, data=data), None)])

    def _remember_closed(self, seq_id: str) -> None:
        self._closed[seq_id] = None
        while len(self._closed) > _CLOSED_KEPT:
            self._closed.popitem(last=False)

    def _emit(self, node: str, items: list[tuple[Stage, Any]]) -> None:
        if self._send is None:
            raise RuntimeError(f"stage {self.name} is not attached to a mesh")
        self._send(node, items)

    def undeliverable(self, node: str, msg: Stage) -> None:
        """The mesh could not send `msg` to `node` (gone): the sequence fails (its entry retries it elsewhere)."""
        if msg.kind == "close":
            return
        self.stage_in(Stage(msg.id, self.name, "token", self.node_id, data={
            "code": int(ErrorCode.UNAVAILABLE), "message": f"stage node {node} cannot be reached"}), None)  # fmt: skip

    # ------------------------------------------------------------ one step

    def _step(self, plan: StagePlan) -> None:
        runner = self._runner
        assert runner is not None
        for src, dst, tokens in plan.moves:
            runner.move(src, dst, tokens)
        for a, b, tokens in plan.swaps:
            runner.swap(a, b, tokens)
        runner.resize(plan.rows, plan.length)
        if plan.prefill is not None:
            self._prefill(plan.prefill, plan.chunk)
        if plan.decode:
            self._decode(plan.decode_start, plan.decode)

    def _prefill(self, sched: StageSeq, chunk: int) -> None:
        import numpy as np

        runner, scheduler = self._runner, self._scheduler
        assert runner is not None and scheduler is not None
        seq = self._seqs[sched.owner]
        head = sched.inputs[0]
        start, tokens = sched.cached, head.tokens[head.taken : head.taken + chunk]
        inputs = np.asarray([tokens]) if head.hidden is None else head.hidden[None, head.taken : head.taken + chunk]
        try:
            out = runner.run(sched.slot, inputs, [sched.cached])
        except Exception as exc:  # noqa: BLE001 - only this sequence was in the run
            self._fail(seq, ErrorCode.INTERNAL, f"reading the prompt failed: {type(exc).__name__}: {exc}")
            return
        due = head.due and head.taken + chunk == len(head.tokens)
        complete = scheduler.ran_prefill(sched, chunk)
        self._forward([seq], out, [start], [tokens], [complete], [due])

    def _decode(self, first_row: int, rows: list[StageSeq]) -> None:
        import numpy as np

        runner, scheduler = self._runner, self._scheduler
        assert runner is not None and scheduler is not None
        seqs = [self._seqs[s.owner] for s in rows]
        heads = [s.inputs[0] for s in rows]
        if self.is_first:
            inputs = np.asarray([[h.tokens[h.taken]] for h in heads])
        else:
            inputs = np.stack([h.hidden[h.taken : h.taken + 1] for h in heads])
        starts, tokens, due = [s.cached for s in rows], [[h.tokens[h.taken]] for h in heads], [h.due for h in heads]
        try:
            out = runner.run(first_row, inputs, starts)
        except Exception as exc:  # noqa: BLE001 - the step's sequences fail, the stage goes on
            for seq in seqs:
                self._fail(seq, ErrorCode.INTERNAL, f"a decode step failed: {type(exc).__name__}: {exc}")
            return
        self.steps += 1
        self.row_steps += len(rows)
        for sched in rows:
            scheduler.ran_decode(sched)
        self._forward(seqs, out, starts, tokens, [True] * len(seqs), due)

    def _forward(self, seqs: list[_Seq], out: np.ndarray, starts: list[int], tokens: list[list[int]],
                 last: list[bool], due: list[bool]) -> None:  # fmt: skip
        """What a run computed: hidden states to the next stage, or (the last stage) each due sequence's token to
        the first."""
        out_to: dict[str, list[tuple[Stage, Any]]] = {}
        if self.is_last:
            choosing = [i for i, d in enumerate(due) if d]
            if not choosing:
                return
            picked = [seqs[i] for i in choosing]
            chosen, errors = pick_tokens([s.chooser for s in picked], out[choosing, -1])
            for j, seq in enumerate(picked):
                token = chosen[j]
                if token is None:
                    self._fail(seq, ErrorCode.INTERNAL, errors.get(j, "choosing a token failed"))
                    continue
                assert seq.chooser is not None
                seq.chooser.text.generated += 1
                matcher = seq.chooser.matcher
                data = {"end": True} if matcher is not None and matcher.finished else None
                msg = Stage(seq.id, seq.stages[0][1], "token", seq.first, seq.sched.cached, (token,), data=data)
                out_to.setdefault(seq.first, []).append((msg, None))
        else:
            for i, seq in enumerate(seqs):
                node, stage = seq.stages[seq.index + 1]
                rows = out[i]
                msg = Stage(seq.id, stage, "run", seq.first, starts[i], tuple(tokens[i]), tuple(rows.shape),
                            "float32", last[i], due=due[i])  # fmt: skip
                if not seq.opened_next:
                    left = max(1, int((seq.deadline - time.monotonic()) * 1000))
                    msg = Stage(msg.id, msg.model, msg.kind, msg.first, msg.start, msg.tokens, msg.shape, msg.dtype,
                                msg.last, seq.request, seq.stages, seq.need, left, seq.extra, msg.due)  # fmt: skip
                    seq.opened_next = True
                out_to.setdefault(node, []).append((msg, rows))
        for node, items in out_to.items():
            self._emit(node, items)
