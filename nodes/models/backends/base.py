"""What every model backend implements, and the `Job` the executor hands it."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from protocol import ErrorCode, Request, Task

ProgressFn = Callable[[str, float], None]  # (what is happening, fraction done 0..1)


class Job:
    """One queued request as a backend sees it.

    A backend must end every job exactly once with `finish()` or `fail()`;
    later calls are ignored, so a job can never be answered twice. `emit()`
    sends one stream chunk (only meaningful when `request.stream`).
    """

    __slots__ = (
        "request",
        "deadline",
        "enqueued_at",
        "_on_chunk",
        "_on_done",
        "_lock",
        "done",
        "_seq",
        "started",
        "_settled",
        "on_settled",
        "lane",
    )

    def __init__(
        self,
        request: Request,
        deadline: float,
        on_chunk: Callable[[Job, int, Any], None],
        on_done: Callable[[Job, Any, dict[str, Any] | None, ErrorCode | None, str], None],
    ) -> None:
        self.request = request
        self.deadline = deadline  # time.monotonic() value
        self.enqueued_at = time.monotonic()
        self._on_chunk = on_chunk
        self._on_done = on_done
        self._lock = threading.Lock()
        self.done = False
        self._seq = 0
        self.started = False  # taken from the queue by a model (it then counts as in flight until it is done)
        self._settled: threading.Event | None = None  # made by the first `sleep()`
        # Told first when the job is answered (the executor frees its slot); set once, before the job is queued.
        self.on_settled: Callable[[Job], None] | None = None
        self.lane: Any = None  # the executor's queue the job is in

    @property
    def emitted(self) -> bool:
        """Whether any stream chunk went out (a re-run from the start would repeat it)."""
        return self._seq > 0

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, data: Any) -> None:
        if self.done:
            return
        seq = self._seq
        self._seq += 1
        self._on_chunk(self, seq, data)

    def finish(self, output: Any, meta: dict[str, Any] | None = None) -> None:
        if self._settle():
            if self.on_settled is not None:
                self.on_settled(self)
            self._on_done(self, output, meta or {}, None, "")

    def fail(self, code: ErrorCode, message: str) -> None:
        if self._settle():
            if self.on_settled is not None:
                self.on_settled(self)
            self._on_done(self, None, None, code, message)

    def take(self) -> bool:
        """Mark the job taken by a model (in flight from now on); False when it was answered already (cancelled).

        Check and set happen under the job's lock, as does answering it: a cancel landing at that moment either
        sees the job started (and its answer frees the slot) or keeps it from starting, never neither.
        """
        with self._lock:
            if self.done:
                return False
            self.started = True
            return True

    def sleep(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the job is answered meanwhile (e.g. cancelled by its caller)."""
        with self._lock:
            if self.done:
                return True
            if self._settled is None:
                self._settled = threading.Event()
            settled = self._settled
        return settled.wait(seconds)

    def _settle(self) -> bool:
        with self._lock:
            if self.done:
                return False
            self.done = True
            if self._settled is not None:
                self._settled.set()
            return True


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; nothing elsewhere). A model's loading
    and a burst of long requests leave tens of MB freed but still resident in malloc's arenas."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim: Any = None
_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; nothing is lost, a page read again comes back from its file


def page_out_file(path: Path) -> int:
    """Unmap from this process the resident pages of its mappings of `path` (a file, or every file in a folder):
    reclaimed as clean file pages, one touched later is read back from the file, so nothing changes but the memory
    held. Returns the bytes advised; 0 where Linux cannot (no /proc, an older kernel)."""
    import ctypes

    target = str(path.resolve())
    inside = target.rstrip("/") + "/" if path.is_dir() else None
    try:
        with open("/proc/self/maps") as maps:
            fields = [line.rstrip("\n").split(maxsplit=5) for line in maps]
        ranges = [f[0] for f in fields if len(f) == 6 and (f[5] == target or (inside and f[5].startswith(inside)))]
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for span in ranges:
        start, end = (int(x, 16) for x in span.split("-"))
        if libc.madvise(start, end - start, _MADV_PAGEOUT) == 0:
            done += end - start
    return done


class JobSource(Protocol):
    """Where a continuous backend takes its work from (the executor's queue for its model)."""

    @property
    def stopping(self) -> bool: ...

    def take(self, limit: int, wait: float) -> list[Job]:
        """Up to `limit` queued jobs, highest priority first; waits up to `wait` s while none is queued."""
        ...


class Backend(ABC):
    """A model that can serve requests.

    `max_batch` is how many jobs the executor may hand to one `run()` call;
    `concurrency` how many `run()` calls may be in progress at once (each in
    its own worker thread). Capacity = max_batch * concurrency.

    A `continuous` backend instead runs one long `serve(source)` per worker and takes jobs from the queue
    whenever it has room (continuous batching: a request joins the running batch at the next step);
    `max_batch` is then the number of requests it runs at once.
    """

    name: str
    tasks: frozenset[Task]
    max_batch: int = 1
    concurrency: int = 1
    continuous: bool = False
    batch_wait: float | None = None  # seconds a batch may wait to fill; None: the node's --batch-wait-ms
    steps = 0  # continuous backends: decode steps run, and requests advanced by them (summed over steps)
    row_steps = 0
    model_layers = 0  # a pipeline stage: how many layers its whole model has (gossiped); 0 for a whole model
    held_for_others = 0  # a pipeline stage: sequences it holds for requests whose job is on another node
    labels: dict[str, str]

    def __init__(self) -> None:
        self.labels = {}

    def load(self, progress: ProgressFn | None = None) -> None:  # noqa: B027 - optional hook
        """Load weights; called once, off the mesh loop, before the first `run()`."""

    @abstractmethod
    def run(self, batch: list[Job]) -> None:
        """Serve every job in `batch`, ending each with `finish()` or `fail()`."""

    def serve(self, source: JobSource) -> None:
        """Continuous backends: serve jobs from `source` until it is stopping and nothing is left running."""
        raise NotImplementedError(f"{type(self).__name__} is not a continuous backend")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, sessions, GPU memory)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": sorted(t.value for t in self.tasks), "labels": dict(self.labels)}

    def files(self) -> tuple[str, Path] | None:
        """What another node needs to serve this model without building it: (the spec kind that loads them, the
        folder of files this backend loaded). None for models without files (synthetic ones)."""
        return None
