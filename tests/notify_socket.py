"""A stand-in for systemd's notify socket: records each datagram a node sends, when it came and from which PID
(systemd's NotifyAccess=main accepts only the main process's)."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Notification:
    fields: dict[str, str]  # KEY=value lines of one datagram
    pid: int  # the sender, from the kernel (SCM_CREDENTIALS)
    at: float  # time.monotonic() when it arrived


class NotifySocket:
    """A unix datagram socket bound where $NOTIFY_SOCKET will point: a short file path, or `abstract` (`@name`)."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._folder: Path | None = None
        if abstract:
            name = f"lanmesh-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:  # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
            self._folder = Path(tempfile.mkdtemp(prefix="lanmesh-notify-"))
            self.address = str(self._folder / "notify")
            self.sock.bind(self.address)
        self.received: list[Notification] = []

    def receive(self, timeout: float) -> Notification | None:
        """The next datagram, or None after `timeout` seconds without one."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        note = Notification(fields, pid, time.monotonic())
        self.received.append(note)
        return note

    def wait_for(self, line: str, timeout: float = 10.0) -> Notification:
        """The first datagram (from now on) holding `line`: `KEY=value`, or `KEY` with any value."""
        key, _, value = line.partition("=")
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            note = self.receive(left)
            if note is not None and key in note.fields and (not value or note.fields[key] == value):
                return note
        raise AssertionError(f"no {line} within {timeout}s; got {self.received}")

    def collect(self, seconds: float) -> list[Notification]:
        """Every datagram that arrives in the next `seconds`."""
        end = time.monotonic() + seconds
        notes = []
        while (left := end - time.monotonic()) > 0:
            note = self.receive(left)
            if note is not None:
                notes.append(note)
        return notes

    def close(self) -> None:
        self.sock.close()
        if self._folder is not None:
            os.unlink(self.address)
            self._folder.rmdir()
            self._folder = None
