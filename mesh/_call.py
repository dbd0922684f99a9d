"""One logical call as a client builds it (`Call`, `request_call`) and where its outcome goes (`Sink`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from protocol import Task

from .errors import LanmeshError

_TASKS: dict[str, Task] = {t.value: t for t in Task}  # a Task is a str, so members find themselves too

CallKind = Literal["request", "ping", "status", "learn"]  # learn: the table's own status ping


class CallState(StrEnum):
    """Where a call stands. Every change goes through `Call.move`, which checks it against `_MOVES`."""

    NEW = "new"  # built, not yet handed to a node
    SENT = "sent"  # a try is live on `Call.node`: answered, moved or cancelled there
    WAITING = "waiting"  # no live try: waiting for a node to connect, out a backoff, or to resend
    DONE = "done"  # answered, failed or cancelled; the table has forgotten it


_MOVES: dict[CallState, frozenset[CallState]] = {
    CallState.NEW: frozenset({CallState.SENT, CallState.WAITING, CallState.DONE}),
    CallState.SENT: frozenset({CallState.WAITING, CallState.DONE}),
    CallState.WAITING: frozenset({CallState.SENT, CallState.WAITING, CallState.DONE}),
    CallState.DONE: frozenset(),
}


class IllegalMove(RuntimeError):
    """A state machine was asked for a transition its table does not allow: a bug, never the caller's input."""


class Sink(Protocol):
    """Where a call's outcome goes: a future, or a stream's queue. Called on the runtime's I/O thread or loop."""

    def chunk(self, data: str, node: str) -> None: ...

    def done(self, value: Any) -> None: ...

    def fail(self, exc: LanmeshError) -> None: ...


@dataclass(eq=False, slots=True)
class Call:
    """One logical request and where its current try stands. Built by a client, then owned by the CallTable."""

    key: int
    kind: CallKind
    timeout: float
    deadline: float
    sink: Sink
    model: str = ""
    task: Task = Task.INFER
    input: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    require: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    # The current try; `node` is None while the call waits (for a node, or out a backoff). A try is live, and
    # is cancelled on its node if the call ends or moves, from its send until that node's final answer.
    node: str | None = None
    wire: str = ""
    sent_at: float = 0.0
    tries: int = 0
    seen: set[int] = field(default_factory=set)
    # Text the caller has been given, and how much of it the current try was given as its prefix.
    text: list[str] = field(default_factory=list)
    prefix_parts: int = 0
    declined: dict[str, int] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)
    unavailable_rounds: int = 0
    not_before: float = 0.0
    wake: float = 0.0
    last_error: LanmeshError | None = None
    state: CallState = CallState.NEW

    def move(self, to: CallState) -> None:
        if to not in _MOVES[self.state]:
            raise IllegalMove(f"call {self.key}: {self.state} -> {to}")
        self.state = to


def request_call(
    key: int,
    sink: Sink,
    model: str,
    task: str | Task,
    input: Any,
    *,
    params: dict[str, Any] | None,
    timeout: float,
    priority: int,
    require: dict[str, str] | None,
    stream: bool,
    now: float,
) -> Call:
    """A request Call, with the checks a caller should hear about at once rather than from a node."""
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
        raise ValueError(f"priority must be an integer 0..9, got {priority!r}")
    try:
        task_ = _TASKS.get(task)  # a dict lookup: Task(task) costs an enum call per request
    except TypeError:  # unhashable
        task_ = None
    if task_ is None:
        raise ValueError(f"task must be one of {list(_TASKS)}, got {task!r}")
    return Call(
        key=key,
        kind="request",
        timeout=timeout,
        deadline=now + timeout,
        sink=sink,
        model=model,
        task=task_,
        input=input,
        params=dict(params) if params else {},
        priority=priority,
        require=dict(require) if require else {},
        stream=stream,
    )


def generation_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    """The sampling parameters a caller set (unset ones are left to the node's defaults)."""
    given = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    params: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return params


__all__ = ["Call", "CallKind", "CallState", "IllegalMove", "Sink", "generation_params", "request_call"]
