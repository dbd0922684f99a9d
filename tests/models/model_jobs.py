"""How the model tests drive a backend: Jobs with recording callbacks, and request builders."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from nodes.models.backends.base import Backend, Job
from protocol import ErrorCode, Request, Task

TINY_CONTEXT = 96  # context length of the tiny chat model built in conftest.py


def requires(*modules: str) -> None:
    """Skip the calling test (or fixture) with a clear reason when a runtime is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'lanmesh[models]')")


@dataclass
class Outcome:
    """Everything a backend told one job: stream chunks, then the final answer or error."""

    output: Any = None
    meta: dict[str, Any] | None = None
    code: ErrorCode | None = None
    message: str = ""
    chunks: list[Any] = field(default_factory=list)
    answers: int = 0

    @property
    def text(self) -> str:
        return str(self.output["content"] if isinstance(self.output, dict) else self.output)


ChunkFn = Callable[[Job, int, Any], None]
DoneFn = Callable[[Job, Any, "dict[str, Any] | None", "ErrorCode | None", str], None]


def recorders(
    outcome: Outcome,
    on_chunk: Callable[[Job, Outcome], None] | None = None,
    on_done: Callable[[Job, Outcome], None] | None = None,
) -> tuple[ChunkFn, DoneFn]:
    """The chunk and done callbacks of a job whose answers `outcome` records."""

    def chunk(job: Job, seq: int, data: Any) -> None:
        assert seq == len(outcome.chunks), "chunks must be numbered 0, 1, 2, ..."
        outcome.chunks.append(data)
        if on_chunk is not None:
            on_chunk(job, outcome)

    def done(job: Job, output: Any, meta: dict[str, Any] | None, code: ErrorCode | None, message: str) -> None:
        outcome.output, outcome.meta, outcome.code, outcome.message = output, meta, code, message
        outcome.answers += 1
        if on_done is not None:
            on_done(job, outcome)

    return chunk, done


def make_job(
    request: Request,
    outcome: Outcome,
    timeout: float = 120.0,
    on_chunk: Callable[[Job, Outcome], None] | None = None,
) -> Job:
    return Job(request, time.monotonic() + timeout, *recorders(outcome, on_chunk))


def serve(backend: Backend, requests: list[Request], **job_args: Any) -> list[Outcome]:
    """Run one batch through `backend` the way the executor does, and check every job got one answer."""
    outcomes = [Outcome() for _ in requests]
    backend.run([make_job(r, o, **job_args) for r, o in zip(requests, outcomes, strict=True)])
    assert all(o.answers == 1 for o in outcomes), "every job must be answered exactly once"
    return outcomes


def chat(content: str, *, model: str = "tiny", stream: bool = False, prefix: str = "", **params: Any) -> Request:
    return Request(
        id=f"chat-{time.monotonic_ns()}",
        model=model,
        task=Task.CHAT,
        input=[{"role": "user", "content": content}],
        params=params,
        stream=stream,
        prefix=prefix,
    )


def complete(prompt: str, *, model: str = "tiny", stream: bool = False, prefix: str = "", **params: Any) -> Request:
    return Request(
        id=f"complete-{time.monotonic_ns()}",
        model=model,
        task=Task.COMPLETE,
        input=prompt,
        params=params,
        stream=stream,
        prefix=prefix,
    )


def embed(texts: str | list[str], *, model: str = "tiny-embed") -> Request:
    return Request(id=f"embed-{time.monotonic_ns()}", model=model, task=Task.EMBED, input=texts)
