"""The HTTP API's keys: what a good one is (checked when the node starts), comparing a caller's in constant time,
and keys per caller (`CallerKeys`, `lanmesh apikey`), kept hashed in the node's state folder.

Light on purpose (no web stack): the node's configuration and the command line use it before anything loads."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIN_API_KEY_CHARS = 16  # a shorter HTTP API key is refused at start: the gateway may face the whole LAN


def key_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def check_api_key(key: str, where: str) -> str:
    """`key`, or a ValueError saying it is too short to guess safely (the message never shows the key)."""
    if len(key) < MIN_API_KEY_CHARS:
        raise ValueError(
            f"{where} has {len(key)} characters; an API key needs at least {MIN_API_KEY_CHARS} so it cannot be "
            "guessed (make one: python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    return key


# ---------------------------------------------------------------- keys per caller

API_KEYS_FILE = "api-keys.json"  # in the node's state folder (`--state-dir`)
DEFAULT_CALLER = "default"  # the name the single --api-key answers to
_CHECK_EVERY_S = 1.0  # how often the gateway looks whether the file changed (keys added or revoked live)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class CallerKeys:
    """The HTTP API's keys, one per caller (`lanmesh apikey add NAME`), kept as sha256 in `folder`/api-keys.json,
    plus the single `--api-key` as caller `default`. The file is read again when it changes, so a key added or
    revoked on a running node counts within a second. A key is 32 random bytes: its sha256 is safe to keep."""

    def __init__(self, folder: Path | None, single: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.path = folder / API_KEYS_FILE if folder is not None else None
        self.single = single
        self.clock = clock
        self._lock = threading.Lock()
        self._by_digest: dict[str, str] = {}  # sha256 of a live key -> its caller's name
        self._revoked: dict[str, str] = {}  # sha256 of a revoked key -> whose it was
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self._read()

    # ------------------------------------------------------------- the gateway

    def configured(self) -> bool:
        """Whether any key exists (then every guarded route needs one)."""
        self._maybe_read()
        return bool(self.single or self._by_digest)

    def caller(self, given: str) -> str | None:
        """The name of the caller whose key `given` is, or None."""
        if self.single and key_matches(given, self.single):
            return DEFAULT_CALLER
        self._maybe_read()
        return self._by_digest.get(_digest(given))

    def revoked_owner(self, given: str) -> str | None:
        """Whose revoked key `given` is (for the refusal's log line), or None."""
        return self._revoked.get(_digest(given))

    def _maybe_read(self) -> None:
        now = self.clock()
        if now >= self._next_check:
            self._next_check = now + _CHECK_EVERY_S
            self._read()

    def _read(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._by_digest, self._revoked, self._stamp = {}, {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        data = self._load()
        self._by_digest = {e["sha256"]: name for name, e in data.items() if not e.get("revoked")}
        self._revoked = {e["sha256"]: name for name, e in data.items() if e.get("revoked")}
        self._stamp = stamp

    def _load(self) -> dict[str, dict[str, Any]]:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the API keys in {self.path}: {exc}") from None
        return data if isinstance(data, dict) else {}

    # ------------------------------------------------------------- `lanmesh apikey`

    def add(self, name: str) -> str:
        """A new key for `name` (shown once: only its sha256 is kept); ValueError when `name` has a live key."""
        assert self.path is not None
        with self._lock:
            data = self._load()
            if name in data and not data[name].get("revoked"):
                raise ValueError(f"{name} has an API key already; revoke it first (lanmesh apikey revoke {name})")
            key = "lm-" + secrets.token_urlsafe(32)
            data[name] = {"sha256": _digest(key), "created": int(time.time())}
            self._write(data)
        return key

    def revoke(self, name: str) -> None:
        assert self.path is not None
        with self._lock:
            data = self._load()
            if name not in data or data[name].get("revoked"):
                raise ValueError(f"no live API key is named {name} (lanmesh apikey list shows them)")
            data[name]["revoked"] = int(time.time())
            self._write(data)

    def listing(self) -> list[dict[str, Any]]:
        return [{"name": n, **{k: v for k, v in e.items() if k != "sha256"}} for n, e in sorted(self._load().items())]

    def _write(self, data: dict[str, dict[str, Any]]) -> None:
        assert self.path is not None
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
