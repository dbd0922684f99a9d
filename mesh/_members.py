"""Who is who on one node, in a mesh of member identities: the certificates presented to it, the names bound to
keys, the revocation list, and the rule of which role may send what through which door.

`Members` is the node's book. The mesh loop owns it; the ZAP thread only reads `revoked` and `node_keys`, which
are swapped whole (never mutated), so it needs no lock. Its decisions are plain and told the time, so they are
unit-tested without sockets (`tests/unit/test_members.py`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey

from protocol import Admin, Cancel, Credentials, Fetch, Hello, Join, Ping, Request, Revocations

from ._certs import Certificate as Cert
from ._certs import CertificateError, RevocationList, Role, key_text

log = logging.getLogger("lanmesh.security")

# Admin actions a client may ask (reading); every other action needs an admin.
READ_ONLY_ADMIN = frozenset({"models", "members"})
MEMBERSHIP_ACTIONS = frozenset({"invite", "revoke", "members"})  # answered by the mesh's authority, not the models
# The role each message needs at a node's ROUTER (a forwarded Request and a changing Admin need more; see `need`).
ROLE_OF: dict[type, Role] = {
    Request: Role.CLIENT,
    Cancel: Role.CLIENT,
    Ping: Role.CLIENT,
    Admin: Role.CLIENT,
    Hello: Role.NODE,
    Fetch: Role.NODE,
    Revocations: Role.NODE,
}
# What a key the node does not know may send: its certificate, or an invite token.
FROM_ANYONE = (Credentials, Join)
STATE_FILE = "revocations"


def role_needed(msg: Any) -> Role:
    """The least role that may send `msg` to a node's ROUTER (node-to-node messages unknown here need a node)."""
    t = type(msg)
    if t is Request:
        return Role.NODE if msg.hops else Role.CLIENT
    if t is Admin:
        return Role.CLIENT if msg.action in READ_ONLY_ADMIN else Role.ADMIN
    return ROLE_OF.get(t, Role.NODE)


@dataclass(frozen=True, slots=True)
class Member:
    """A key this node knows, by the certificate it presented."""

    name: str
    role: Role
    key: bytes
    cert: Cert
    cert_bytes: bytes

    @property
    def uid(self) -> str:
        return key_text(self.key)


class Members:
    """The book of one node (see the module docstring). `own` is this node's own certificate."""

    def __init__(
        self,
        authority: VerifyKey,
        own: Cert,
        own_bytes: bytes,
        stats: collections.Counter[str],
        *,
        state_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], float],
    ) -> None:
        self.authority = authority
        self.stats = stats
        self.clock = clock
        self.state_dir = Path(state_dir).expanduser() if state_dir else None
        self.by_uid: dict[str, Member] = {}  # the ZAP User-Id (Z85 key) -> member; read for every message
        self._names: dict[str, bytes] = {}  # member name -> the key it is bound to
        self.revocations: RevocationList | None = None
        self.revoked: frozenset[bytes] = frozenset()  # read by the ZAP thread
        self.node_keys: frozenset[bytes] = frozenset()  # keys of node members: who may subscribe to gossip (ZAP)
        self.own = self._add(own, own_bytes)
        self._load_state()

    # ------------------------------------------------------------- certificates

    def present(self, cert_bytes: bytes, key: bytes) -> tuple[Member | None, str]:
        """Take a certificate presented on a connection made with `key` (raw): the member, or None and why not."""
        known = self.by_uid.get(key_text(key))
        if known is not None and known.cert_bytes == cert_bytes and self.clock() < known.cert.not_after:
            return known, ""  # presented again (each new connection does): its signature is not checked twice
        try:
            cert = Cert.decode(cert_bytes, self.authority)
        except CertificateError as exc:
            return None, str(exc)
        if cert.key != key:
            return None, f"a certificate for {cert.name} presented by another key"
        problem = cert.problem(self.clock())
        if problem:
            if known is not None and known.cert.key == cert.key and problem.endswith("expired"):
                self._remove(known)  # its certificate ran out: gone now, not at the next sweep
            return None, problem
        if cert.key in self.revoked:
            return None, f"{cert.name}'s key was revoked"
        bound = self._names.get(cert.name)
        if bound is not None and bound != key:
            holder = self.by_uid.get(key_text(bound))
            if holder is not None and holder.cert.serial >= cert.serial:
                self.stats["name_refused"] += 1
                return None, f"the name {cert.name} belongs to another key here"
            if holder is not None:  # a newer certificate for the name: the authority re-enrolled it
                self._remove(holder)
        return self._add(cert, cert_bytes), ""

    def _add(self, cert: Cert, cert_bytes: bytes) -> Member:
        member = Member(cert.name, cert.role, cert.key, cert, cert_bytes)
        old = self.by_uid.get(member.uid)
        if old is not None and old.name != member.name:
            self._names.pop(old.name, None)
        self.by_uid[member.uid] = member
        self._names[member.name] = member.key
        self._refresh_node_keys()
        return member

    def _remove(self, member: Member) -> None:
        self.by_uid.pop(member.uid, None)
        if self._names.get(member.name) == member.key:
            del self._names[member.name]
        self._refresh_node_keys()

    def _refresh_node_keys(self) -> None:
        self.node_keys = frozenset(m.key for m in self.by_uid.values() if m.role >= Role.NODE)

    def member(self, uid: str | None) -> Member | None:
        return self.by_uid.get(uid) if uid else None

    def bound_key(self, name: str) -> bytes | None:
        """The key `name` is bound to here (the one whose certificate this node took), if any."""
        return self._names.get(name)

    def claim_problem(self, name: str, key: bytes) -> str:
        """Why a claim that node `name` has `key` (a Hello, a digest, an announcement) is refused ('' if it is not
        known to be false): the key is revoked, belongs to another member, or the name to another key."""
        if key in self.revoked:
            return "its key was revoked"
        holder = self.by_uid.get(key_text(key))
        if holder is not None and holder.name != name:
            return f"that key belongs to {holder.name}"
        if holder is not None and holder.role < Role.NODE:
            return f"{name} is a {holder.role} and may not serve"
        bound = self._names.get(name)
        if bound is not None and bound != key:
            return f"the name {name} belongs to another key"
        return ""

    def expire(self) -> list[Member]:
        """Members whose certificates expired: removed from the book (the caller drops their links)."""
        now = self.clock()
        gone = [m for m in self.by_uid.values() if m is not self.own and now >= m.cert.not_after]
        for m in gone:
            self._remove(m)
        return gone

    # ------------------------------------------------------------- revocations

    @property
    def serial(self) -> int:
        return self.revocations.serial if self.revocations is not None else 0

    def adopt(self, document: bytes) -> list[Member] | None:
        """Take a revocation list (checked against the authority): the members it revokes that this node knew, or
        None when it is not newer than the one held. `CertificateError` when it is forged or malformed."""
        doc = RevocationList.decode(document, self.authority)
        if doc.serial <= self.serial:
            return None
        self.revocations = doc
        self.revoked = doc.keys()
        gone = [m for m in self.by_uid.values() if m.key in self.revoked]
        for m in gone:
            self._remove(m)
        self._save_state(document)
        return gone

    def _load_state(self) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / STATE_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read the stored revocation list %s (%s): starting without it", path, exc)
            return
        try:
            self.adopt(data)
        except CertificateError as exc:
            log.warning("ignoring the stored revocation list %s: %s", path, exc)

    def _save_state(self, document: bytes) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / STATE_FILE
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_bytes(document)
            os.replace(tmp, path)
        except OSError as exc:  # revoked here all the same; only a restart would forget it until a peer says it
            log.warning("cannot store the revocation list in %s: %s", path, exc)
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------- ZAP (its own thread)

    def zap_admits(self, key: bytes, gossip: bool) -> tuple[bool, str]:
        """Whether a CURVE handshake with `key` may complete: never a revoked key; on the PUB (`gossip`) only a node
        this node knows; on the ROUTER anyone else (an unknown key may only present a certificate or join)."""
        if key in self.revoked:
            return False, "revoked key"
        if gossip and key not in self.node_keys:
            return False, "not a node of this mesh (its certificate comes first, on the node's ROUTER)"
        return True, "OK"


__all__ = ["FROM_ANYONE", "MEMBERSHIP_ACTIONS", "READ_ONLY_ADMIN", "ROLE_OF", "Member", "Members", "role_needed"]
