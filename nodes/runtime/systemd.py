"""Telling systemd how the node is doing (the sd_notify protocol, without libsystemd): READY=1 once it serves,
STATUS= lines while models load, STOPPING=1 when it leaves, and WATCHDOG=1 pings only while the mesh loop turns.
Without $NOTIFY_SOCKET every call does nothing."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("lanmesh.node")

_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# Each progress line during start-up asks for this much more time past TimeoutStartSec= (EXTEND_TIMEOUT_USEC):
# a first start builds models for minutes, and a build that stops reporting for this long is stuck.
START_EXTENSION_S = 300.0
_STATUS_EVERY_S = 1.0  # at most one progress STATUS a second (a GGUF conversion reports every tensor)


class ServiceNotifier:
    """Datagrams to systemd's notify socket. `socket_path` None: not run by systemd (every call does nothing);
    `watchdog_s` None: no WatchdogSec= (no pings)."""

    def __init__(self, socket_path: str | None = None, watchdog_s: float | None = None) -> None:
        self.socket_path = socket_path
        self.watchdog_s = watchdog_s if socket_path else None
        self._address = "\0" + socket_path[1:] if socket_path and socket_path.startswith("@") else socket_path
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed_once = False
        self._last_status = 0.0
        self._pinger: threading.Thread | None = None
        self._stop_pings = threading.Event()

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None, unset: bool = True) -> ServiceNotifier:
        """What systemd set for this process: $NOTIFY_SOCKET, and $WATCHDOG_USEC when $WATCHDOG_PID is unset or
        names this process. `unset` removes them from the environment, so child processes (model builders)
        never speak for the node."""
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if unset:
            for name in _ENV:
                env.pop(name, None)
        if not path.startswith(("/", "@")):
            if path:  # vsock: and other transports of newer systemd: not ours to speak
                log.warning("NOTIFY_SOCKET=%s is not a unix socket: systemd will not hear from this node", path)
            return cls()
        watchdog_s = None
        if usec and (not pid or pid == str(os.getpid())):
            if usec.isdigit() and int(usec) > 0:
                watchdog_s = int(usec) / 1e6
            else:
                log.warning("WATCHDOG_USEC=%r is not a positive number of microseconds: no watchdog pings", usec)
        return cls(path, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when systemd did not get it (logged once)."""
        if self._address is None:
            return False
        data = "\n".join(fields).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(data, self._address)
        except OSError as exc:
            if not self._failed_once:
                self._failed_once = True
                log.warning("cannot notify systemd at %s: %s", self.socket_path, exc)
            return False
        return True

    def status(self, text: str) -> None:
        """A line `systemctl status` shows."""
        self.send(f"STATUS={_one_line(text)}")

    def progress(self, what: str, fraction: float) -> None:
        """A model-load progress report: a STATUS line (at most one a second) that also extends the start-up
        timeout, so a long first build is not killed by TimeoutStartSec= while it makes progress."""
        now = time.monotonic()
        if now - self._last_status < _STATUS_EVERY_S and fraction < 1.0:
            return
        self._last_status = now
        self.send(
            f"STATUS=loading models: {_one_line(what)} ({fraction * 100:.0f}%)",
            f"EXTEND_TIMEOUT_USEC={int(START_EXTENSION_S * 1e6)}",
        )

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "leaving the mesh") -> None:
        self.send("STOPPING=1", f"STATUS={_one_line(status)}")

    def watch_loop(self, last_turn: Callable[[], float]) -> None:
        """Ping systemd's watchdog every half WatchdogSec=, but only when the mesh loop turned (`last_turn`, a
        monotonic time it sets every turn) since the previous check: a stuck loop stops the pings, and systemd
        acts once it has been stuck between WatchdogSec= and 1.5 times that."""
        if self.watchdog_s is None or self._pinger is not None:
            return
        interval = self.watchdog_s / 2

        def ping() -> None:
            since = time.monotonic()
            self.send("WATCHDOG=1")  # the loop just turned: start() returned
            while not self._stop_pings.wait(interval):
                now = time.monotonic()
                if last_turn() >= since:
                    self.send("WATCHDOG=1")
                else:
                    log.warning("mesh loop silent for %.1fs: no watchdog ping to systemd", now - last_turn())
                since = now

        self._pinger = threading.Thread(target=ping, name="systemd-watchdog", daemon=True)
        self._pinger.start()

    def close(self) -> None:
        """Stop the pings and close the socket."""
        self._stop_pings.set()
        if self._pinger is not None:
            self._pinger.join(5.0)
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
