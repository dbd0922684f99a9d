"""Certificates, revocation lists and invite codes: what the mesh authority signs and every member checks.

Pure code over bytes and a clock given by the caller: no sockets, no files. Signatures are Ed25519 (PyNaCl, over
libsodium); every signed body starts with a domain tag so a signature over one kind of document can never pass as
another. A member's key is its CURVE public key (32 raw bytes; Z85 text where humans or ZeroMQ see it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from zmq.utils import z85

from protocol import is_name

CERT_DOMAIN = b"lanmesh-cert-1"
REVOCATIONS_DOMAIN = b"lanmesh-revocations-1"
INVITE_PREFIX = "lanmesh-invite-1:"
KEY_BYTES = 32
MAX_CERT_BYTES = 1024  # a certificate is ~170 bytes; anything far larger is not one
MAX_REVOKED = 100_000


class CertificateError(ValueError):
    """A certificate, revocation list or invite code that is malformed, forged, expired or not for this mesh."""


class Role(IntEnum):
    """What a member may do; each role may do all the ones below it may."""

    CLIENT = 1  # send requests, read status
    NODE = 2  # also serve, forward, gossip, fetch model files
    ADMIN = 3  # also load, unload, switch, pull, roll out, invite, revoke

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"role must be client, node or admin, got {text!r}") from None

    def __str__(self) -> str:
        return self.name.lower()


def fingerprint(public: bytes) -> str:
    """What shows a key (an authority's verify key, raw 32 bytes): 32 hex digits of its sha256."""
    return hashlib.sha256(public).hexdigest()[:32]


def key_text(raw: bytes) -> str:
    """A raw 32-byte CURVE key as Z85 text (what ZeroMQ and the ZAP User-Id use)."""
    return z85.encode(raw).decode("ascii")


def key_bytes(text: str | bytes) -> bytes:
    """Z85 text of a CURVE key back to its 32 raw bytes; ValueError for anything else."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    if len(raw) != 40:
        raise ValueError(f"a key is 40 Z85 characters, got {len(raw)}")
    try:
        out = z85.decode(raw)
    except (ValueError, KeyError, IndexError):
        raise ValueError("a key must be Z85 text") from None
    if len(out) != KEY_BYTES:
        raise ValueError("a key must decode to 32 bytes")
    return bytes(out)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(data: bytes, what: str, max_len: int) -> Any:
    if not isinstance(data, bytes) or len(data) > max_len:
        raise CertificateError(f"{what} is not bytes of at most {max_len}")
    try:
        return msgpack.unpackb(data, raw=False, max_array_len=MAX_REVOKED + 16, max_map_len=16, max_ext_len=0)
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise CertificateError(f"{what} is malformed: {exc}") from None


def _verify(authority: VerifyKey, domain: bytes, body: bytes, signature: bytes, what: str) -> None:
    try:
        authority.verify(domain + body, signature)
    except (BadSignatureError, ValueError, TypeError):
        raise CertificateError(f"{what} is not signed by this mesh's authority") from None


# ----------------------------------------------------------------- certificates


@dataclass(frozen=True, slots=True)
class Certificate:
    """A member's certificate: its name, CURVE key (32 raw bytes) and role, valid from `not_before` to `not_after`
    (wall-clock seconds), numbered `serial` by the authority that signed it."""

    name: str
    key: bytes
    role: Role
    not_before: int
    not_after: int
    serial: int
    signature: bytes = b""

    def body(self) -> bytes:
        return _pack([1, self.name, self.key, int(self.role), self.not_before, self.not_after, self.serial])

    def encode(self) -> bytes:
        return _pack([self.body(), self.signature])

    def text(self) -> str:
        return base64.b64encode(self.encode()).decode("ascii")

    @property
    def key_text(self) -> str:
        return key_text(self.key)

    def problem(self, now: float) -> str:
        """Why this (signed) certificate is not usable at wall-clock `now` ('' when it is)."""
        if now < self.not_before - 300:  # five minutes of clock skew between the authority and this machine
            return f"the certificate of {self.name} is not valid yet"
        if now >= self.not_after:
            return f"the certificate of {self.name} expired"
        return ""

    @classmethod
    def decode(cls, data: bytes, authority: VerifyKey) -> Certificate:
        """A certificate from its bytes, its signature checked; `CertificateError` for anything else."""
        outer = _unpack(data, "certificate", MAX_CERT_BYTES)
        if not isinstance(outer, list) or len(outer) != 2 or not all(isinstance(x, bytes) for x in outer):
            raise CertificateError("certificate is not [body, signature]")
        body, signature = outer
        _verify(authority, CERT_DOMAIN, body, signature, "certificate")
        fields = _unpack(body, "certificate body", MAX_CERT_BYTES)
        if not isinstance(fields, list) or len(fields) < 7 or fields[0] != 1:
            raise CertificateError("certificate body has an unknown layout")
        _, name, key, role, not_before, not_after, serial = fields[:7]
        if not is_name(name):
            raise CertificateError("certificate names no valid member name")
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise CertificateError("certificate key is not 32 bytes")
        if not all(type(v) is int for v in (role, not_before, not_after, serial)) or role not in (1, 2, 3):
            raise CertificateError("certificate role, validity or serial is malformed")
        return cls(name, key, Role(role), not_before, not_after, serial, signature)

    @classmethod
    def from_text(cls, text: str, authority: VerifyKey) -> Certificate:
        try:
            data = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError, ValueError):
            raise CertificateError("certificate text is not base64") from None
        return cls.decode(data, authority)


# ----------------------------------------------------------------- revocation lists


@dataclass(frozen=True, slots=True)
class Revoked:
    key: bytes
    name: str
    at: int  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class RevocationList:
    """Every key the authority revoked; `serial` grows with each revocation, so the newest list wins."""

    serial: int
    entries: tuple[Revoked, ...] = ()
    signature: bytes = b""

    def body(self) -> bytes:
        return _pack([1, self.serial, [[e.key, e.name, e.at] for e in self.entries]])

    def encode(self) -> bytes:
        return _pack([self.body(), self.signature])

    def keys(self) -> frozenset[bytes]:
        return frozenset(e.key for e in self.entries)

    @classmethod
    def decode(cls, data: bytes, authority: VerifyKey) -> RevocationList:
        outer = _unpack(data, "revocation list", 64 + MAX_REVOKED * 200)
        if not isinstance(outer, list) or len(outer) != 2 or not all(isinstance(x, bytes) for x in outer):
            raise CertificateError("revocation list is not [body, signature]")
        body, signature = outer
        _verify(authority, REVOCATIONS_DOMAIN, body, signature, "revocation list")
        fields = _unpack(body, "revocation list body", len(body))
        if not isinstance(fields, list) or len(fields) < 3 or fields[0] != 1 or type(fields[1]) is not int:
            raise CertificateError("revocation list has an unknown layout")
        entries = []
        for e in fields[2] if isinstance(fields[2], list) else ():
            if not (isinstance(e, list) and len(e) >= 3 and isinstance(e[0], bytes) and len(e[0]) == KEY_BYTES
                    and isinstance(e[1], str) and type(e[2]) is int):  # fmt: skip
                raise CertificateError("revocation list entry is malformed")
            entries.append(Revoked(e[0], e[1][:256], e[2]))
        return cls(fields[1], tuple(entries), signature)


# ----------------------------------------------------------------- the authority's keys


@dataclass(frozen=True, slots=True)
class AuthorityKey:
    """The mesh's signing key. Only the authority holds it; everyone holds `verify_key`."""

    seed: bytes  # 32 bytes

    @classmethod
    def generate(cls) -> AuthorityKey:
        return cls(bytes(SigningKey.generate()))

    @property
    def verify_key(self) -> VerifyKey:
        return SigningKey(self.seed).verify_key

    @property
    def public(self) -> bytes:
        return bytes(self.verify_key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)

    def sign_certificate(self, cert: Certificate) -> Certificate:
        signed = SigningKey(self.seed).sign(CERT_DOMAIN + cert.body()).signature
        return Certificate(cert.name, cert.key, cert.role, cert.not_before, cert.not_after, cert.serial, signed)

    def sign_revocations(self, serial: int, entries: tuple[Revoked, ...]) -> RevocationList:
        body = RevocationList(serial, entries).body()
        return RevocationList(serial, entries, SigningKey(self.seed).sign(REVOCATIONS_DOMAIN + body).signature)


def verify_key(public: bytes) -> VerifyKey:
    if len(public) != KEY_BYTES:
        raise CertificateError("an authority key is 32 bytes")
    return VerifyKey(public)


# ----------------------------------------------------------------- invite codes


@dataclass(frozen=True, slots=True)
class InviteCode:
    """What `lanmesh invite` prints: where the authority node is, its CURVE key (so the joiner talks to the real
    node), the authority's key (so the joiner checks what it gets), and the one-time token."""

    address: str  # host:port of the authority node's ROUTER
    node_key: bytes
    authority: bytes
    token: bytes

    def text(self) -> str:
        body = _pack([1, self.address, self.node_key, self.authority, self.token])
        return INVITE_PREFIX + base64.urlsafe_b64encode(body).decode("ascii").rstrip("=")

    @classmethod
    def parse(cls, text: str) -> InviteCode:
        text = "".join(text.split())
        if not text.startswith(INVITE_PREFIX):
            raise CertificateError(f"an invite code starts with {INVITE_PREFIX!r}; copy the whole line `lanmesh "
                                   "invite` printed")  # fmt: skip
        raw = text[len(INVITE_PREFIX) :]
        try:
            body = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise CertificateError("the invite code is damaged (not base64); copy it again") from None
        try:
            fields = _unpack(body, "invite code", 1024)
        except CertificateError:
            raise CertificateError("the invite code is damaged; copy it again") from None
        if not (
            isinstance(fields, list)
            and len(fields) >= 5
            and fields[0] == 1
            and isinstance(fields[1], str)
            and all(isinstance(x, bytes) and len(x) == n for x, n in zip(fields[2:5], (32, 32, 16), strict=True))
        ):
            raise CertificateError("the invite code is damaged; copy it again")  # fmt: skip
        return cls(fields[1], fields[2], fields[3], fields[4])


def token_hash(token: bytes) -> str:
    return hashlib.sha256(b"lanmesh-invite-token" + token).hexdigest()


__all__ = [
    "AuthorityKey",
    "Certificate",
    "CertificateError",
    "InviteCode",
    "Revoked",
    "RevocationList",
    "Role",
    "fingerprint",
    "key_bytes",
    "key_text",
    "token_hash",
    "verify_key",
]
