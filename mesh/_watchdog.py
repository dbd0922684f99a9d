"""The mesh loop's watchdog: a node whose loop died or stopped turning leaves the mesh and exits, so a supervisor
(systemd, a container runtime) restarts it, instead of a zombie that still answers ZeroMQ heartbeats."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("lanmesh.mesh")

EXIT_STALLED = 70  # the process's exit status after the watchdog fired (EX_SOFTWARE)


def within(call: Callable[[], None], timeout: float, what: str) -> None:
    """Run `call` in a thread of its own and wait for it at most `timeout` seconds: leaving (an mDNS goodbye) must
    go on even when a library is stuck or raises."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except Exception:
            log.exception("%s failed", what)
        done.set()

    threading.Thread(target=run, name=what.replace(" ", "-"), daemon=True).start()
    if not done.wait(timeout):
        log.error("%s did not finish within %gs", what, timeout)


class LoopWatchdog:
    """Checks, from a thread of its own, that `loop` is alive and `last_turn()` is recent."""

    def __init__(
        self,
        loop: threading.Thread,
        last_turn: Callable[[], float],
        limit: float,
        stopped: threading.Event,
        *,
        goodbye: Callable[[], None],
        on_stall: Callable[[str], None] | None = None,
    ) -> None:
        self.loop = loop
        self.last_turn = last_turn
        self.limit = limit
        self.stopped = stopped  # set when the loop stopped on purpose
        self.goodbye = goodbye
        self.on_stall = on_stall or exit_now
        self._thread = threading.Thread(target=self._watch, name="lanmesh-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(min(1.0, self.limit / 4)):
            silent = time.monotonic() - self.last_turn()
            if not self.loop.is_alive():
                reason = "the mesh loop died"
            elif silent > self.limit:
                reason = f"the mesh loop has not turned for {silent:.1f}s (--stall-timeout {self.limit:g})"
            else:
                continue
            log.critical("%s: unregistering and exiting so a supervisor can restart this node", reason)
            self.goodbye()
            self.on_stall(reason)
            return


def exit_now(reason: str) -> None:
    """What the watchdog does in a node process: exit non-zero at once (threads may be stuck holding locks)."""
    logging.shutdown()
    os._exit(EXIT_STALLED)
