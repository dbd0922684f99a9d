"""The local executor: a bounded priority queue per model, dynamic batching, worker threads.

Model work never runs on the mesh loop, synthetic models' included: their work grows with their input.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from protocol import ErrorCode, ModelLoad, Request

from ..models.backends.base import Backend, Job

log = logging.getLogger("lanmesh.executor")

ChunkFn = Callable[[Job, int, Any], None]
DoneFn = Callable[[Job, Any, "dict[str, Any] | None", "ErrorCode | None", str], None]


class ModelLane:
    """Queue and workers for one model.

    A job counts as in flight from the moment a worker takes it until it is answered, so a row that leaves a
    batch early frees its slot at once.
    """

    def __init__(self, backend: Backend, max_queue: int, batch_wait: float) -> None:
        self.backend = backend
        self.max_queue = max_queue
        self.continuous = backend.continuous
        if backend.batch_wait is not None:
            batch_wait = backend.batch_wait
        self.batch_wait = batch_wait if backend.max_batch > 1 and not self.continuous else 0.0
        self._heap: list[tuple[int, int, Job]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self.inflight = 0
        self.accepting = True
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self._last_arrival = 0.0  # when the previous job was queued (a lone job is not held for batch mates)
        self._burst = False  # the job at the head of the queue arrived within batch_wait of the one before
        self._busy_mark = 0.0  # continuous lanes: start of the busy time not yet charged to a completed job
        self._woken = False  # `wake()` was called: the next `take` returns at once
        self.version = ""  # content hash of the model's files (set once known)
        self.batches = 0
        self.batched_jobs = 0
        self.job_seconds = 0.0  # EWMA of busy time per request; 0 until the first one is measured

    @property
    def capacity(self) -> int:
        return self.backend.max_batch * self.backend.concurrency

    def queued(self) -> int:
        return len(self._heap)

    def rate(self) -> float:
        """Requests per second this lane completes when busy (0 until measured)."""
        return self.backend.concurrency / self.job_seconds if self.job_seconds > 0 else 0.0

    def load(self) -> ModelLoad:
        b = self.backend
        tasks = tuple(sorted(t.value for t in b.tasks))
        return ModelLoad(self.inflight + b.held_for_others, len(self._heap), self.capacity, round(self.rate(), 3),
                         self.version[:8], tasks, b.model_layers)  # fmt: skip

    def start(self) -> None:
        target = self._serve if self.continuous else self._work
        for i in range(self.backend.concurrency):
            t = threading.Thread(target=target, name=f"model-{self.backend.name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def make_job(self, request: Request, deadline: float, on_chunk: ChunkFn, on_done: DoneFn) -> Job:
        """A job for this lane: its answer also frees its slot here."""
        job = Job(request, deadline, on_chunk, on_done)
        job.on_settled = self.settled
        return job

    def settled(self, job: Job) -> None:
        """A job of this lane was answered: its slot is free (if it had one yet)."""
        if job.started:
            self._release()

    def _release(self) -> None:
        with self._cond:
            self.inflight -= 1
            if self.continuous:
                # Busy time since the last completion, charged to this one: requests/s completed while busy.
                now = time.monotonic()
                spent = now - self._busy_mark
                self._busy_mark = now
                self.job_seconds = spent if not self.job_seconds else 0.8 * self.job_seconds + 0.2 * spent
            self._cond.notify_all()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full or the lane is closing."""
        with self._cond:
            if not self.accepting or len(self._heap) >= self.max_queue:
                return False
            now = time.monotonic()
            if not self._heap:
                self._burst = now - self._last_arrival < self.batch_wait
            self._last_arrival = now
            heapq.heappush(self._heap, (-job.request.priority, next(self._order), job))
            self._cond.notify()
        return True

    def _pop(self, limit: int) -> list[Job]:
        """Up to `limit` jobs off the heap, counted in flight (holding the lock); expired ones are answered."""
        batch: list[Job] = []
        while self._heap and len(batch) < limit:
            job = heapq.heappop(self._heap)[2]
            if not job.take():
                continue  # answered while queued (cancelled)
            # Counted under the lane's lock, which the job's answer takes to release it: never released first.
            if self.continuous and not self.inflight and not batch:
                self._busy_mark = time.monotonic()
            self.inflight += 1
            batch.append(job)
        return batch

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._heap:
                if self._stopping:
                    return None
                self._cond.wait(0.5)
            limit = self.backend.max_batch
            if self.batch_wait and len(self._heap) < limit and (self._burst or len(self._heap) > 1):
                # Dynamic batching: requests are arriving together, give the rest of the burst a moment to join.
                # A lone request (nothing arrived just before it) runs at once.
                end = time.monotonic() + self.batch_wait
                while len(self._heap) < limit and not self._stopping:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return self._pop(limit)

    # ---------------------------------------------------------------- the JobSource of continuous backends

    @property
    def stopping(self) -> bool:
        return self._stopping

    def take(self, limit: int, wait: float) -> list[Job]:
        with self._cond:
            if not self._heap and wait > 0 and not self._stopping and not self._woken:
                self._cond.wait(wait)
            self._woken = False
            return self._pop(limit) if limit > 0 else []

    def wake(self) -> None:
        """Something besides a job arrived for the engine (a pipeline stage's input): its `take` returns now."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                self.backend.serve(self)
            except Exception:  # an engine bug must not end the lane: its jobs are failed, the engine restarts
                log.exception("model %s: engine failed; restarting it", self.backend.name)

    # ---------------------------------------------------------------- batch backends

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.expired():
                job.fail(ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued; not run")
            elif not job.done:
                live.append(job)
        if not live:
            return
        self.batches += 1
        self.batched_jobs += len(live)
        started = time.monotonic()
        try:
            self.backend.run(live)
            per_job = (time.monotonic() - started) / len(live)
            # A slow and a fast node with equal slots differ here; routing weighs load by it.
            self.job_seconds = per_job if not self.job_seconds else 0.8 * self.job_seconds + 0.2 * per_job
        except Exception as exc:  # a model bug must not kill the worker or leak the jobs
            log.exception("model %s failed on a batch of %d", self.backend.name, len(live))
            self._isolate([job for job in live if not job.done], exc)
        for job in live:
            if not job.done:
                log.error("model %s left request %s unanswered", self.backend.name, job.request.id)
                job.fail(ErrorCode.INTERNAL, f"model {self.backend.name} did not answer")

    def _isolate(self, jobs: list[Job], exc: Exception) -> None:
        """After a batch raised: run its unanswered jobs one by one, so only the one that breaks the model fails."""
        why = f"model {self.backend.name} failed: {type(exc).__name__}: {exc}"
        if len(jobs) == 1:
            jobs[0].fail(ErrorCode.INTERNAL, why)
            return
        for job in jobs:
            if job.emitted:
                job.fail(ErrorCode.INTERNAL, why)  # half streamed: the entry resumes it after what was sent
                continue
            try:
                self.backend.run([job])
            except Exception as alone:
                log.exception("model %s fails on request %s alone", self.backend.name, job.request.id)
                job.fail(ErrorCode.INTERNAL, f"model {self.backend.name} failed: {type(alone).__name__}: {alone}")

    def forget(self, job: Job) -> None:
        """Take a queued job out of the queue (it was cancelled): its place counts for nothing any more."""
        with self._cond:
            kept = [entry for entry in self._heap if entry[2] is not job]
            if len(kept) != len(self._heap):
                self._heap = kept
                heapq.heapify(self._heap)

    def close_queue(self) -> list[Job]:
        """Stop accepting and hand back everything not yet started."""
        with self._cond:
            self.accepting = False
            jobs = [entry[2] for entry in self._heap]
            self._heap.clear()
            return jobs

    def stop(self, timeout: float, close: bool = True) -> None:
        """Stop the workers (once what they run is done, within `timeout`), then close the model."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for t in self._workers:
            t.join(max(0.0, end - time.monotonic()))
        self._workers.clear()
        if close:
            self.backend.close()


class Executor:
    """Runs requests on this node's models; implements what the mesh needs of a local server.

    Models can come and go while the node serves (`add`, `switch`, `retire`): a model is served under its name, and
    each loaded version also as `name@version` (what a request pins). Requests for `name` go to its current
    version; a retired version takes no new work and leaves once what it runs is done. The lane tables are replaced,
    never changed in place, so the mesh loop reads them without a lock.
    """

    def __init__(self, backends: list[Backend], max_queue: int = 256, batch_wait: float = 0.005) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.labels: dict[str, str] = {}  # the node's labels (set by the node), matched against `require`
        self._jobs: dict[str, Job] = {}  # by request id, from submit until answered: what `cancel` can stop
        self._wants: dict[str, Any] = {}  # models this node would hold a stage of (`StageWant`s, gossiped)
        self._stage_sender: Callable[[Backend], Any] | None = None  # makes a pipeline stage's send function
        self._write = threading.Lock()
        self._started = False
        lanes = [ModelLane(b, max_queue, batch_wait) for b in backends]
        self._all: dict[tuple[str, str], ModelLane] = {(lane.backend.name, lane.version): lane for lane in lanes}
        self.lanes: dict[str, ModelLane] = {lane.backend.name: lane for lane in lanes}  # current, by name

    def start(self) -> None:
        self._started = True
        for lane in self._all.values():
            lane.start()

    # ------------------------------------------------------------ models coming and going

    def set_version(self, name: str, version: str) -> None:
        """Record the version (content hash) of a lane loaded at start-up."""
        with self._write:
            lane = self.lanes[name]
            del_key = (name, lane.version)
            lane.version = version
            table = dict(self._all)
            table.pop(del_key, None)
            table[(name, version)] = lane
            self._all = table

    def add(self, backend: Backend, version: str, current: bool) -> ModelLane:
        """Serve a newly loaded model (a version beside the one serving, or a new name); started at once."""
        lane = ModelLane(backend, self.max_queue, self.batch_wait)
        lane.version = version
        self._attach(backend)
        with self._write:
            if (backend.name, version) in self._all:
                raise ValueError(f"{backend.name}@{version[:8]} is loaded already")
            if self._started:
                lane.start()
            self._all = {**self._all, (backend.name, version): lane}
            if current or backend.name not in self.lanes:
                self.lanes = {**self.lanes, backend.name: lane}
        return lane

    def switch(self, name: str, version: str) -> ModelLane:
        """Requests for `name` go to `version` from now on."""
        lane = self._find(name, version)
        if lane is None or not lane.accepting:
            raise ValueError(f"{name}@{version[:8]} is not loaded here")
        with self._write:
            self.lanes = {**self.lanes, name: lane}
        return lane

    def retire(self, name: str, version: str, grace: float) -> int:
        """Stop routing to a version, let what it runs finish (within `grace` s), close it; returns the requests
        handed back unfinished (0 when it drained)."""
        lane = self._find(name, version)
        if lane is None:
            raise ValueError(f"{name}@{version[:8]} is not loaded here")
        with self._write:
            if self.lanes.get(name) is lane:  # it was the current one: another version (if any) takes over
                others = [x for (n, _), x in self._all.items() if n == name and x is not lane and x.accepting]
                lanes = dict(self.lanes)
                if others:
                    lanes[name] = others[0]
                else:
                    del lanes[name]
                self.lanes = lanes
            with lane._cond:
                lane.accepting = False
        end = time.monotonic() + grace
        while time.monotonic() < end and (lane.inflight or lane.queued() or lane.backend.held_for_others):
            time.sleep(0.02)
        handed_back = 0
        # Past the grace, what did not finish goes back to its callers as UNAVAILABLE (the entry retries it elsewhere)
        # before the model closes: closed under a running engine, it would fail them with INTERNAL, never retried.
        running = [job for job in list(self._jobs.values()) if job.lane is lane and job.started]
        for job in [*lane.close_queue(), *running]:
            if not job.done:
                job.fail(ErrorCode.UNAVAILABLE, f"{name} is being unloaded here; request handed back")
                handed_back += 1
        lane.stop(max(0.5, end - time.monotonic()))
        with self._write:
            self._all = {k: v for k, v in self._all.items() if v is not lane}
        return handed_back

    def _find(self, name: str, version: str) -> ModelLane | None:
        for (n, v), lane in self._all.items():
            if n == name and v and v.startswith(version):
                return lane
        return None

    def _lane(self, model: str) -> ModelLane | None:
        """The lane a request for `model` (a name, or name@version) goes to."""
        lane = self.lanes.get(model)
        if lane is not None or "@" not in model:
            return lane
        name, _, version = model.partition("@")
        return self._find(name, version) if len(version) >= 8 else None

    # ------------------------------------------------------------ what the mesh asks

    def serves(self, model: str) -> bool:
        lane = self._lane(model)
        return lane is not None and lane.accepting

    def models(self) -> dict[str, ModelLoad]:
        out = {name: lane.load() for name, lane in self.lanes.items() if lane.accepting}
        for (name, version), lane in self._all.items():
            if version and lane.accepting and not lane.backend.model_layers:  # a stage is never asked for by name
                out[f"{name}@{version[:8]}"] = lane.load()
        return out

    def load(self, model: str) -> tuple[int, int]:
        """(in flight + queued, capacity) for the routing policy; (0, 0) when not served."""
        lane = self._lane(model)
        if lane is None or not lane.accepting:
            return (0, 0)
        return (lane.inflight + lane.queued(), lane.capacity)

    def rate(self, model: str) -> float:
        """Measured requests per second of `model` here (0: not served, or not measured yet)."""
        lane = self._lane(model)
        return 0.0 if lane is None or not lane.accepting else lane.rate()

    def queue_length(self, model: str) -> int:
        lane = self._lane(model)
        return 0 if lane is None else lane.inflight + lane.queued()

    def prefix_summary(self, model: str) -> bytes:
        """What `model`'s prefix cache holds here, as cache-aware routing reads it (b"": none, or nothing held)."""
        lane = self._lane(model)
        return b"" if lane is None or not lane.accepting else getattr(lane.backend, "prefix_summary", b"")

    def prefix_summaries(self) -> dict[str, bytes]:
        """Every current chat model with a prefix cache, and what it holds (gossiped: `LoadReport.prefixes`)."""
        return {
            name: lane.backend.prefix_summary
            for name, lane in self.lanes.items()
            if lane.accepting and isinstance(getattr(lane.backend, "prefix_summary", None), bytes)
        }

    def submit(self, request: Request, deadline: float, on_chunk: ChunkFn, on_done: DoneFn) -> bool:
        lane = self._lane(request.model)
        if lane is None:
            return False
        job = Job(request, deadline, on_chunk, on_done)
        job.on_settled = self._settled
        job.lane = lane
        self._jobs[request.id] = job
        if lane.submit(job):
            return True
        self._jobs.pop(request.id, None)
        return False

    def _settled(self, job: Job) -> None:
        self._jobs.pop(job.request.id, None)
        if job.started:
            job.lane._release()

    def cancel(self, request_id: str, reason: str) -> bool:
        """Stop a request: dropped if queued, stopped at its next step if running (its slot is free at once).
        False when it is not here (answered already)."""
        job = self._jobs.get(request_id)
        if job is None:
            return False
        job.fail(ErrorCode.UNAVAILABLE, f"cancelled: {reason}")
        if not job.started:
            job.lane.forget(job)
        return True

    # ------------------------------------------------------------ pipeline stages

    def attach_stages(self, sender: Callable[[Backend], Any]) -> None:
        """Pipeline stages send their output through the mesh: `sender(backend)` makes a stage's send function."""
        self._stage_sender = sender
        for lane in self._all.values():
            self._attach(lane.backend)

    def _attach(self, backend: Backend) -> None:
        attach = getattr(backend, "attach", None)
        if attach is not None and self._stage_sender is not None:
            attach(*self._stage_sender(backend))

    def stage_in(self, items: list[tuple[Any, Any]]) -> list[Any]:
        """Pipeline messages (a group that arrived together) for this node's stages; each stage is woken once, after
        all of its messages are in. Returns the messages no stage here takes (unloaded, or never here). A stage
        being unloaded still takes what its sequences need until they end."""
        woken: dict[int, Any] = {}
        unknown = []
        for msg, tensor in items:
            backend = self._stage_for(msg)
            if backend is None:
                unknown.append(msg)
                continue
            backend.stage_in(msg, tensor, wake=False)
            woken[id(backend)] = backend
        for backend in woken.values():
            backend.wake()
        return unknown

    def _stage_for(self, msg: Any) -> Any:
        for (name, _), lane in self._all.items():
            if name == msg.model and hasattr(lane.backend, "stage_in"):
                return lane.backend
        if msg.kind == "token":  # to the first stage of a model, by the model's name (its stage name unknown)
            for lane in self._all.values():
                backend = lane.backend
                if getattr(backend, "model", None) == msg.model and getattr(backend, "first", -1) == 0:
                    return backend
        return None

    def cancel_stage(self, sequence: str, reason: str) -> None:
        """Free a pipeline sequence on every stage here (its caller or its entry gave up)."""
        for lane in list(self._all.values()):
            cancel = getattr(lane.backend, "cancel_sequence", None)
            if cancel is not None:
                cancel(sequence, reason)

    def set_want(self, model: str, want: Any | None) -> None:
        """Gossip (or stop gossiping) that this node would hold a stage of `model` (a `StageWant`)."""
        wants = dict(self._wants)
        if want is None:
            wants.pop(model, None)
        else:
            wants[model] = want
        self._wants = wants

    def wants(self) -> dict[str, Any]:
        return self._wants

    def stats(self) -> dict[str, dict[str, int]]:
        """Per model: batches run and requests in them (continuous engines: decode steps and rows in them), and a chat
        engine's prefix cache counters (`prefix_*`)."""
        out = {}
        for name, lane in self.lanes.items():
            b = lane.backend
            batches, jobs = (b.steps, b.row_steps) if lane.continuous else (lane.batches, lane.batched_jobs)
            out[name] = {"batches": batches, "batched_requests": jobs, "max_batch": b.max_batch}
            cache_stats = getattr(b, "cache_stats", None)
            if cache_stats is not None:
                out[name] |= cache_stats()
        return out

    def drain(self, grace: float) -> None:
        """Stop taking work; let running and queued work finish within `grace`; hand back the rest."""
        end = time.monotonic() + grace
        lanes = list(self._all.values())
        for lane in lanes:
            with lane._cond:
                lane.accepting = False
        # A pipeline stage also finishes the sequences it holds for other nodes' requests (its peers route no new
        # chain through a leaving node); what is left at the grace fails over at their entries.
        while time.monotonic() < end and any(
            lane.inflight or lane.queued() or lane.backend.held_for_others for lane in lanes
        ):
            time.sleep(0.02)
        for lane in lanes:
            for job in lane.close_queue():
                job.fail(ErrorCode.UNAVAILABLE, "node is shutting down; request handed back")

    def stop(self, timeout: float = 5.0) -> None:
        for lane in self._all.values():
            lane.stop(timeout)
