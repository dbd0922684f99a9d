"""Synthetic models that make mesh tests and scaling benchmarks independent of model speed."""

from __future__ import annotations

import re

from protocol import ErrorCode, Task

from .base import Backend, Job

_ALL_TASKS = frozenset(Task)
# A stream is at most this many chunks, whatever the length of its text: each chunk costs the mesh loop a message,
# and a real model's chunks come at its own pace, not thousands in a millisecond.
MAX_STREAM_PIECES = 256


def _echo_text(job: Job) -> str:
    """The text an echo streams: the prompt, or the last chat message."""
    req = job.request
    if req.task is Task.CHAT:
        return str(req.input[-1]["content"])
    return req.input if isinstance(req.input, str) else str(req.input)


def _echo_output(job: Job) -> object:
    """What `echo` answers: the input, shaped like a real model's reply where that matters."""
    if job.request.task is Task.CHAT:
        return {"role": "assistant", "content": _echo_text(job)}
    return job.request.input


def _stream_pieces(job: Job) -> list[str]:
    """Words still to send, after the `prefix` another node already delivered: one a chunk, or several together
    when there are more than `MAX_STREAM_PIECES`."""
    rest = _echo_text(job)[len(job.request.prefix) :]
    words = re.findall(r"\s*\S+\s*", rest) or ([rest] if rest else [])
    if len(words) <= MAX_STREAM_PIECES:
        return words
    per = -(-len(words) // MAX_STREAM_PIECES)
    return ["".join(words[i : i + per]) for i in range(0, len(words), per)]


class EchoBackend(Backend):
    """Returns its input, on a worker thread like every model (its work grows with its input). Its batches never
    wait to fill: a request costs less than the wait, and under load the queue fills them anyway."""

    batch_wait = 0.0

    def __init__(self, name: str = "echo") -> None:
        super().__init__()
        self.name = name
        self.tasks = _ALL_TASKS
        self.max_batch = 64
        self.concurrency = 1

    def run(self, batch: list[Job]) -> None:
        for job in batch:
            if job.request.stream:
                for piece in _stream_pieces(job):
                    job.emit(piece)
            job.finish(_echo_output(job), {"model": self.name})


class SleepBackend(Backend):
    """Takes `ms` milliseconds per request, `capacity` requests at a time; answers like echo.

    Streams emit one chunk per ~`ms / 4` so stream tests have time to fail over mid-stream.
    """

    def __init__(self, ms: float, capacity: int = 1, name: str | None = None) -> None:
        super().__init__()
        if ms < 0 or capacity < 1:
            raise ValueError("sleep model needs ms >= 0 and capacity >= 1")
        self.name = name or f"sleep:{ms:g}"
        self.tasks = _ALL_TASKS
        self.ms = ms
        self.max_batch = 1
        self.concurrency = capacity

    def run(self, batch: list[Job]) -> None:
        for job in batch:
            if job.remaining() * 1000 < self.ms:
                # It cannot finish in time: say so now instead of burning the slot.
                if not job.sleep(max(0.0, job.remaining())):
                    job.fail(ErrorCode.DEADLINE_EXCEEDED, f"{self.name} needs {self.ms:g} ms; the deadline came first")
                continue
            if job.request.stream:
                self._stream(job)
            elif job.sleep(self.ms / 1000):
                continue  # cancelled: the slot is free at once, as a model's would be at its next step
            job.finish(_echo_output(job), {"model": self.name})

    def _stream(self, job: Job) -> None:
        pieces = _stream_pieces(job)
        step = self.ms / 1000 / max(1, len(pieces))
        for piece in pieces:
            if job.sleep(step):
                return
            job.emit(piece)
