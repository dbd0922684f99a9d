"""The executor under the races and stops that leaked slots or failed work before: a cancel landing while a worker
takes the job, a model unloaded while it still runs. Synthetic models, real worker threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import nodes.runtime.executor as executor_module
from nodes.models.backends.base import Job
from nodes.models.backends.synthetic import SleepBackend
from nodes.runtime.executor import Executor
from protocol import RETRYABLE, ErrorCode, Request, Task

pytestmark = pytest.mark.timeout(60)


def _eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.005)
    raise AssertionError(f"{what} did not happen within {timeout}s")


class Answers:
    """What the executor answered, by request id."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[tuple[ErrorCode | None, Any]]] = {}
        self.lock = threading.Lock()

    def chunk(self, job: Job, seq: int, data: Any) -> None:
        pass

    def done(self, job: Job, output: Any, meta: Any, code: ErrorCode | None, message: str) -> None:
        with self.lock:
            self.by_id.setdefault(job.request.id, []).append((code, output if code is None else message))

    def of(self, rid: str) -> list[tuple[ErrorCode | None, Any]]:
        with self.lock:
            return list(self.by_id.get(rid, []))


def _request(rid: str, model: str) -> Request:
    return Request(rid, model, Task.COMPLETE, f"input of {rid}", deadline_ms=30_000)


def test_a_cancel_landing_while_a_worker_takes_the_job_leaks_no_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window: a worker has seen the job is not answered and is about to count it in flight; the cancel lands
    right there. Held open deterministically: the worker's first look at `done` runs the cancel and waits for it."""
    executor_holder: list[Executor] = []
    window_hit = threading.Event()

    class WindowJob(Job):
        """A Job whose `done`, read by a model worker for the first time, lets a cancel in before answering."""

        def __init__(self, *args: Any) -> None:
            self._done_value = False
            self._window_open = True
            super().__init__(*args)

        @property  # type: ignore[override]
        def done(self) -> bool:
            value = self._done_value
            if self._window_open and threading.current_thread().name.startswith("model-"):
                self._window_open = False
                window_hit.set()
                cancel = threading.Thread(target=executor_holder[0].cancel, args=(self.request.id, "caller left"))
                cancel.start()
                cancel.join(0.5)  # a fix holding one lock over check-and-set keeps the cancel waiting: that is fine
            return value

        @done.setter
        def done(self, value: bool) -> None:
            self._done_value = value

    monkeypatch.setattr(executor_module, "Job", WindowJob)
    backend = SleepBackend(ms=2000, capacity=1, name="m")  # slow: the cancel, not the answer, ends r1
    executor = Executor([backend], batch_wait=0)
    executor_holder.append(executor)
    answers = Answers()
    executor.start()
    try:
        assert executor.submit(_request("r1", "m"), time.monotonic() + 30, answers.chunk, answers.done)
        assert window_hit.wait(10), "the worker never looked at the job"
        _eventually(lambda: answers.of("r1") != [], what="the cancelled request's answer")
        assert answers.of("r1") == [(ErrorCode.UNAVAILABLE, "cancelled: caller left")]
        monkeypatch.setattr(executor_module, "Job", Job)
        assert executor.submit(_request("r2", "m"), time.monotonic() + 30, answers.chunk, answers.done)
        _eventually(lambda: answers.of("r2") != [], what="the next request's answer")
        assert answers.of("r2") == [(None, "input of r2")]
        # The worker has long passed the window: the model is idle, so gossip and drains must see it idle.
        _eventually(lambda: executor.load("m") == (0, 1), timeout=5, what="every slot released")
    finally:
        executor.stop(2.0)


class ClosesUnderItsWork(SleepBackend):
    """A slow model whose close() pulls the session from under a request still running, as a real engine's does."""

    def __init__(self) -> None:
        super().__init__(ms=5000, capacity=1, name="slow")
        self.closed = threading.Event()

    def run(self, batch: list[Job]) -> None:
        for job in batch:
            if job.sleep(self.ms / 1000):
                continue  # answered meanwhile (handed back, cancelled): nothing left to do
            if self.closed.is_set():
                raise RuntimeError("session closed under a running request")
            job.finish(job.request.input)

    def close(self) -> None:
        self.closed.set()


def test_unloading_past_its_grace_hands_running_and_queued_work_back_as_retryable() -> None:
    backend = ClosesUnderItsWork()
    executor = Executor([backend], batch_wait=0)
    executor.set_version("slow", "ab" * 32)
    answers = Answers()
    executor.start()
    try:
        for rid in ("running", "queued"):
            assert executor.submit(_request(rid, "slow"), time.monotonic() + 30, answers.chunk, answers.done)
        _eventually(lambda: executor.load("slow") == (2, 1), what="one request running, one queued")
        t0 = time.monotonic()
        handed_back = executor.retire("slow", "abab", grace=0.3)
        _eventually(lambda: answers.of("running") != [] and answers.of("queued") != [], what="both answers")
        # Both callers hear a refusal the entry retries elsewhere, at once, not an INTERNAL failure of the model.
        for rid in ("running", "queued"):
            [(code, message)] = answers.of(rid)
            assert code in RETRYABLE and code is ErrorCode.UNAVAILABLE, (rid, code, message)
            assert "unloaded" in message
        assert time.monotonic() - t0 < 3.0, "the running request waited for the model instead of being handed back"
        assert handed_back == 2
        assert backend.closed.is_set(), "the model was not closed"
    finally:
        executor.stop(1.0)
