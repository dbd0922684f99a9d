"""The mesh authority: its signing key and what it remembers (pending invites, the certificates it issued, the
revocation list), in a folder of its own on the machine that ran `lanmesh init`.

`Authority` is used from worker threads (joins, admins' commands) and holds a lock; every change is written to
disk (a temporary file renamed over the old one) before it is answered, so a crash never loses an issued
certificate or a revocation. Invite tokens are kept only as their sha256: the folder shows no usable code.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol import name_problem

from ._certs import (
    AuthorityKey,
    Certificate,
    CertificateError,
    RevocationList,
    Revoked,
    Role,
    key_text,
    token_hash,
)

AUTHORITY_DIR = "authority"  # beside the key file: ~/.config/lanmesh/authority
_KEY_FILE = "signing.key"
_STATE_FILE = "state.json"
DEFAULT_VALID_S = 365 * 86_400
MAX_INVITE_S = 30 * 86_400


class AuthorityError(ValueError):
    """What the authority refuses (a spent or unknown invite, a name taken, an unknown member): the message says
    what to do."""


@dataclass(frozen=True, slots=True)
class Issued:
    name: str
    key: bytes
    role: Role
    serial: int
    not_after: int


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only, atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Authority:
    """The mesh's authority, kept in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, key: AuthorityKey, state: dict[str, Any]) -> None:
        self.folder = folder
        self.key = key
        self._lock = threading.Lock()
        self._seen: tuple[int, int] = self._stamp()
        self._load(state)

    def _stamp(self) -> tuple[int, int]:
        try:
            st = (self.folder / _STATE_FILE).stat()
        except FileNotFoundError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        """Read the state again if another process (a command run on this machine) changed it since."""
        if self._stamp() != self._seen:
            self._load(json.loads((self.folder / _STATE_FILE).read_text(encoding="utf-8")))
            self._seen = self._stamp()

    def _load(self, state: dict[str, Any]) -> None:
        key = self.key
        self._next_serial: int = int(state.get("next_serial", 1))
        self._invites: dict[str, dict[str, Any]] = dict(state.get("invites", {}))
        self._issued: dict[str, Issued] = {}
        for name, e in state.get("issued", {}).items():
            self._issued[name] = Issued(name, base64.b64decode(e["key"]), Role(e["role"]), e["serial"], e["not_after"])
        raw = state.get("revocations")
        self._revocations: RevocationList | None = (
            RevocationList.decode(base64.b64decode(raw), key.verify_key) if raw else None
        )

    # ------------------------------------------------------------- files

    @classmethod
    def create(cls, folder: str | os.PathLike[str]) -> Authority:
        """A new authority in `folder` (made with mode 0700); FileExistsError if one is there already."""
        p = Path(folder).expanduser()
        if (p / _KEY_FILE).exists():
            raise FileExistsError(f"{p} already holds a mesh authority; a mesh has one (remove it to start over)")
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = AuthorityKey.generate()
        text = (
            "# lanmesh mesh authority: whoever holds this file can admit anyone to the mesh. Keep it here only.\n"
            f'fingerprint = "{key.fingerprint}"\n'
            f'seed = "{base64.b64encode(key.seed).decode()}"\n'
        )
        _write_private(p / _KEY_FILE, text)
        authority = cls(p, key, {})
        authority._save()
        return authority

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> Authority:
        p = Path(folder).expanduser()
        key_path = p / _KEY_FILE
        try:
            st = key_path.stat()
            data = tomllib.loads(key_path.read_text(encoding="utf-8"))
            seed = base64.b64decode(data["seed"])
        except FileNotFoundError:
            raise AuthorityError(f"{p} holds no mesh authority; make one with `lanmesh init`") from None
        except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as exc:
            raise AuthorityError(f"cannot read the mesh authority in {p}: {exc}") from None
        if st.st_mode & 0o077:
            raise AuthorityError(f"{key_path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}): run "
                                 f"`chmod 600 {key_path}`")  # fmt: skip
        if len(seed) != 32:
            raise AuthorityError(f"{key_path} is damaged (its seed is not 32 bytes)")
        try:
            state = json.loads((p / _STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = {}
        except (OSError, ValueError) as exc:
            raise AuthorityError(f"cannot read {p / _STATE_FILE}: {exc}") from None
        try:
            return cls(p, AuthorityKey(seed), state)
        except (KeyError, ValueError, TypeError, CertificateError) as exc:
            raise AuthorityError(f"{p / _STATE_FILE} is damaged: {exc}") from None

    def _save(self) -> None:
        state = {
            "next_serial": self._next_serial,
            "invites": self._invites,
            "issued": {
                n: {
                    "key": base64.b64encode(i.key).decode(),
                    "role": int(i.role),
                    "serial": i.serial,
                    "not_after": i.not_after,
                }
                for n, i in self._issued.items()
            },  # fmt: skip
            "revocations": base64.b64encode(self._revocations.encode()).decode() if self._revocations else "",
        }
        _write_private(self.folder / _STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        self._seen = self._stamp()

    # ------------------------------------------------------------- what it does

    @property
    def revocations(self) -> RevocationList | None:
        return self._revocations

    def issued(self) -> list[Issued]:
        with self._lock:
            self._refresh()
            return sorted(self._issued.values(), key=lambda i: i.serial)

    def issue(self, name: str, key: bytes, role: Role, valid_s: int = DEFAULT_VALID_S, now: float | None = None,
              replace: bool = False) -> Certificate:  # fmt: skip
        """Sign a certificate for `key` as `name`. A name held by another (live) key is refused unless `replace`,
        which revokes that key first."""
        with self._lock:
            self._refresh()
            return self._issue(name, key, role, valid_s, time.time() if now is None else now, replace)

    def _issue(self, name: str, key: bytes, role: Role, valid_s: int, now: float, replace: bool) -> Certificate:
        problem = name_problem(name, "member name")
        if problem:
            raise AuthorityError(problem)
        revoked = self._revocations.keys() if self._revocations else frozenset()
        if key in revoked:
            raise AuthorityError("this key was revoked; make a new one (lanmesh join makes one each time)")
        old = self._issued.get(name)
        if old is not None and old.key != key and old.key not in revoked and old.not_after > now:
            if not replace:
                raise AuthorityError(
                    f"the name {name} belongs to another key; choose another name (lanmesh join CODE --name NAME), "
                    f"or ask for an invite that names it (lanmesh invite --name {name}) to replace that key"
                )
            self._revoke([old], now)
        cert = self.key.sign_certificate(
            Certificate(name, key, role, int(now) - 60, int(now) + int(valid_s), self._next_serial)
        )
        self._next_serial += 1
        self._issued[name] = Issued(name, key, role, cert.serial, cert.not_after)
        self._save()
        return cert

    def invite(self, role: Role, expires_s: float, valid_s: int = DEFAULT_VALID_S, name: str = "",
               now: float | None = None) -> bytes:  # fmt: skip
        """A new one-time token (16 random bytes) for a member of `role`, usable for `expires_s` seconds; only its
        hash is kept. `name`: the name the joiner gets (it replaces a key holding it)."""
        if not 0 < expires_s <= MAX_INVITE_S:
            raise AuthorityError(f"an invite expires after more than 0 s and at most {MAX_INVITE_S // 86_400} days")
        problem = name_problem(name, "member name") if name else None
        if problem:
            raise AuthorityError(problem)
        now = time.time() if now is None else now
        token = secrets.token_bytes(16)
        with self._lock:
            self._refresh()
            self._invites = {h: i for h, i in self._invites.items() if i["expires"] > now}  # forget spent ones
            self._invites[token_hash(token)] = {"role": int(role), "expires": now + expires_s, "valid_s": int(valid_s),
                                                "name": name}  # fmt: skip
            self._save()
        return token

    def join(self, token: bytes, key: bytes, proposed_name: str, now: float | None = None) -> Certificate:
        """Spend an invite token: a certificate for `key` (the joiner's CURVE key, as its handshake proved)."""
        now = time.time() if now is None else now
        with self._lock:
            self._refresh()
            invite = self._invites.get(token_hash(token))
            if invite is None:
                raise AuthorityError("this invite code is unknown or was used already; ask for a new one "
                                     "(lanmesh invite)")  # fmt: skip
            if invite["expires"] <= now:
                del self._invites[token_hash(token)]
                self._save()
                raise AuthorityError("this invite code expired; ask for a new one (lanmesh invite)")
            name = invite["name"] or proposed_name
            cert = self._issue(name, key, Role(invite["role"]), invite["valid_s"], now, replace=bool(invite["name"]))
            del self._invites[token_hash(token)]  # spent only once a certificate was made: a taken name costs nothing
            self._save()
            return cert

    def revoke(self, who: str, now: float | None = None) -> RevocationList:
        """Revoke the member named `who` (or whose key, Z85, it is): a new revocation list, signed."""
        now = time.time() if now is None else now
        with self._lock:
            self._refresh()
            found = [i for i in self._issued.values() if who in (i.name, key_text(i.key))]
            if not found:
                raise AuthorityError(f"no member named {who!r} was enrolled by this authority (lanmesh members lists "
                                     "them)")  # fmt: skip
            return self._revoke(found, now)

    def _revoke(self, members: list[Issued], now: float) -> RevocationList:
        old = self._revocations
        have = old.keys() if old else frozenset()
        entries = tuple(old.entries if old else ()) + tuple(
            Revoked(m.key, m.name, int(now)) for m in members if m.key not in have
        )
        self._revocations = self.key.sign_revocations((old.serial if old else 0) + 1, entries)
        self._save()
        return self._revocations


__all__ = ["AUTHORITY_DIR", "DEFAULT_VALID_S", "Authority", "AuthorityError", "Issued"]
