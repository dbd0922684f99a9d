"""How `lanmesh node` shows a start's progress (model builds and loads take minutes on a first start).

At a terminal: one line, redrawn in place and fitted to the terminal's width, with log lines printed above it
(`ProgressLine` is also the log handler's stream). Piped (a file, journald): a log line when the stage changes, and
at most every `StageLog.EVERY_S` seconds while it lasts, never a carriage return.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger("lanmesh.node")

_CLEAR = "\r\x1b[K"  # back to the line's start, erase to its end


class ProgressLine:
    """A one-line progress display on a terminal: `line(what, fraction)` redraws it, `write()` prints text above it."""

    def __init__(self, stream: TextIO, columns: Callable[[], int] | None = None) -> None:
        self.stream = stream
        self._columns = columns or (lambda: shutil.get_terminal_size((80, 24)).columns)
        self._lock = threading.Lock()
        self._shown = ""  # the line on the screen now ("" when none)

    def __call__(self, what: str, fraction: float) -> None:
        """A ProgressFn: `what` is happening, `fraction` of this model's load is done (1.0 ends the line)."""
        with self._lock:
            line = "" if fraction >= 1.0 else self.render(what, fraction, self._columns())
            if line != self._shown:
                self.stream.write(_CLEAR + line)
                self.stream.flush()
                self._shown = line

    @staticmethod
    def render(what: str, fraction: float, columns: int) -> str:
        """`  42% [#####.......] what`, cut to fit `columns` (the last column is left free: writing it wraps)."""
        done = min(max(fraction, 0.0), 1.0)
        width = 20 if columns >= 100 else 12
        filled = int(done * width)
        head = f"{int(done * 100):3d}% [{'#' * filled}{'.' * (width - filled)}] "
        room = max(columns - 1 - len(head), 8)
        text = " ".join(what.split())  # one line, whatever the stage said
        if len(text) > room:
            text = text[: room - 3] + "..."
        return head + text

    def write(self, text: str) -> int:
        """Print `text` (a log record) above the progress line, which is drawn again below it."""
        with self._lock:
            if self._shown:
                self.stream.write(_CLEAR)
            self.stream.write(text)
            if self._shown and text.endswith("\n"):
                self.stream.write(self._shown)
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Erase the line (the start is over, or failed)."""
        with self._lock:
            if self._shown:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._shown = ""


class StageLog:
    """A ProgressFn for a start whose output is not a terminal: one log line per stage, plain text."""

    EVERY_S = 15.0  # within one stage (a 30-layer build says "layer N/30" 30 times), at most one line this often

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stage = ""
        self._said_at = 0.0

    def __call__(self, what: str, fraction: float) -> None:
        if fraction >= 1.0:
            return  # the node logs "model X ready in N s" itself
        stage = re.sub(r"\d+", "#", what)  # "layer 3/30" and "layer 4/30" are one stage
        now = self._clock()
        if stage == self._stage and now - self._said_at < self.EVERY_S:
            return
        self._stage, self._said_at = stage, now
        log.info("%s (%d%%)", " ".join(what.split()), int(min(max(fraction, 0.0), 1.0) * 100))
