"""Mesh security: the shared mesh key file and its fingerprint, CURVE set-up for server and client sockets, the ZAP
authenticator, and the limits a request must fit.

With one shared keypair, nodes use it as their CURVE server key, and every member (node or client) connects with
it as both its own key and the server's; ZAP then admits exactly that public key, which only someone who holds the
secret half can present. With member identities (`_identity`, `_members`, `_trust`) every member has its own key,
and ZAP admits any key that is not revoked (`judge_member_zap`), naming it as the User-Id of every message. Core
decisions (`judge_zap`, `judge_member_zap`, `RequestLimits.check`) are plain functions; `Authenticator` is the
thin thread that carries them out on a node's ZeroMQ context.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import queue
import re
import stat
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from protocol import Request, Task

log = logging.getLogger("lanmesh.security")

KEY_ENV = "LANMESH_KEY_FILE"
INSECURE_ENV = "LANMESH_INSECURE"
DEFAULT_KEY_PATH = "~/.config/lanmesh/mesh.key"
ZAP_DOMAIN = b"lanmesh"
GOSSIP_ZAP_DOMAIN = b"lanmesh-gossip"  # a member identity's PUB: only nodes may subscribe
FINGERPRINT_HEX = 32  # 128 bits of sha256(public key): enough to tell meshes apart, hex so mDNS TXT carries it

_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq asks whatever is bound here
_ZAP_VERSION = b"1.0"
_TRUE = ("1", "true", "yes", "on")
# Server-side handshake events worth counting: ZAP denials are counted by the handler itself (with the address).
# Only protocol failures (a plaintext peer, a wrong server key) are refusals. NO_DETAIL is libzmq's word for a
# connection that ended or timed out mid-handshake: every short-lived client whose close races its handshake
# makes one, so counting it drowned real attacks (992 "refusals" for 2,000 legitimate clients).
# LISTENING tells which endpoints are our own (libzmq names those, not the peer, on an accepted connection).
_WATCHED_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_LISTENING
_LOG_EVERY_S = 10.0  # per (kind, source): the first rejection is logged at once, repeats once per this period


class MeshKeyError(ValueError):
    """A mesh key file is missing, malformed, or unsafe; the message says which file and what to do."""


class CurveUnavailable(ImportError):
    """The installed libzmq was built without CURVE, so the mesh cannot be encrypted."""


def require_curve() -> None:
    """Raise `CurveUnavailable` with a clear message unless this libzmq can do CURVE."""
    if not zmq.has("curve"):
        raise CurveUnavailable(
            f"libzmq {zmq.zmq_version()} was built without CURVE (libsodium), so lanmesh cannot encrypt the mesh; "
            "install a pyzmq wheel (they bundle CURVE) or run an open mesh with --insecure"
        )


# ----------------------------------------------------------------- the key


@dataclass(frozen=True, slots=True)
class MeshKey:
    """The mesh's CURVE keypair (Z85 text, 40 characters each). Holding it is membership of the mesh."""

    public: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def generate(cls) -> MeshKey:
        require_curve()
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MeshKey:
        """Read a key file written by `write` (`lanmesh keygen`); raise `MeshKeyError` on anything wrong."""
        p, text = read_key_file(path)
        return cls.parse(p, text)

    @classmethod
    def parse(cls, p: Path, text: str) -> MeshKey:
        """A key file's text (read by `read_key_file`) as a shared mesh key."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise MeshKeyError(f"mesh key file {p} is not a lanmesh key file: {exc}") from None
        public, secret = data.get("public_key"), data.get("secret_key")
        if not isinstance(public, str) or not isinstance(secret, str):
            raise MeshKeyError(f"mesh key file {p} lacks public_key and secret_key; write a new one with keygen")
        key = cls(public.encode("ascii", "replace"), secret.encode("ascii", "replace"))
        problem = key.problem()
        if problem:
            raise MeshKeyError(f"mesh key file {p}: {problem}")
        return key

    def problem(self) -> str:
        """Why this is not a usable keypair ('' when it is)."""
        for name, text in (("public_key", self.public), ("secret_key", self.secret)):
            if len(text) != 40:
                return f"{name} must be 40 Z85 characters, got {len(text)}"
            try:
                z85.decode(text)
            except (ValueError, KeyError, IndexError):
                return f"{name} is not valid Z85 text"
        require_curve()
        if zmq.curve_public(self.secret) != self.public:
            return "public_key does not belong to secret_key (the file was edited or mixed from two keys)"
        return ""

    @property
    def fingerprint(self) -> str:
        """What mDNS and gossip show of the key: hex sha256 of the raw public key, first 32 digits."""
        return fingerprint_of(self.public)

    def write(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the key file with mode 0600 (its folder 0700 if made here); never overwrite unless `force`."""
        p = Path(path).expanduser()
        if p.exists() and not force:
            raise FileExistsError(f"{p} already exists; pass --force to replace it (every node then needs the new key)")
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = (
            "# lanmesh mesh key: every node and client of one mesh holds this same file.\n"
            "# Keep it secret (mode 0600): whoever has it can join the mesh and read its traffic.\n"
            f'fingerprint = "{self.fingerprint}"\n'
            f'public_key = "{self.public.decode()}"\n'
            f'secret_key = "{self.secret.decode()}"\n'
        )
        # Written beside the target with 0600 from the first byte, then renamed over it: no moment where the
        # secret is readable by others, and no half-written key file.
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if force:
                os.replace(tmp, p)
            else:
                os.link(tmp, p)  # fails if someone created the file meanwhile, unlike a rename
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return p

    # ------------------------------------------------------------- sockets

    def configure_server(self, sock: zmq.Socket[Any], domain: bytes = b"") -> None:
        """A socket that binds (ROUTER, PUB): CURVE server, and every handshake must pass ZAP (fail closed)."""
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        # Without this libzmq lets a CURVE handshake through when no ZAP handler answers: any key would do.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def configure_client(self, sock: zmq.Socket[Any], endpoint: str | None = None, server_key: str = "") -> None:
        """A socket that connects (DEALER, SUB, the client's DEALERs): prove the mesh key, expect it of the server
        (every node's; `endpoint` and `server_key` matter only to a member identity)."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def describe(self) -> str:
        return f"CURVE, mesh key {self.fingerprint}"


def read_key_file(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """A key file's path and text, once it is known to be a regular file only its owner can read."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MeshKeyError(
            f"key file {p} does not exist; create one with `lanmesh keygen {p}` (one key shared by the mesh) or "
            "`lanmesh join CODE` (this machine's own, from an invite)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshKeyError(f"cannot read key file {p}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MeshKeyError(f"key file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise MeshKeyError(
            f"key file {p} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it holds a secret: run `chmod 600 {p}`"
        )
    return p, text


class Plaintext:
    """`security=Plaintext()`: talk to an open mesh (nodes run with --insecure), even where a key file exists."""

    fingerprint = ""

    def configure_server(self, sock: zmq.Socket[Any], domain: bytes = b"") -> None:
        """Nothing to set: ZeroMQ's NULL mechanism (no encryption, no authentication)."""

    def configure_client(self, sock: zmq.Socket[Any], endpoint: str | None = None, server_key: str = "") -> None:
        """Nothing to set: ZeroMQ's NULL mechanism (no encryption, no authentication)."""

    def describe(self) -> str:
        return "plaintext (no mesh key)"


def fingerprint_of(public_z85: bytes) -> str:
    return hashlib.sha256(z85.decode(public_z85)).hexdigest()[:FINGERPRINT_HEX]


def same_host(claimed: str, seen: str | None) -> bool:
    """Whether a host a message claims is the address its connection comes from (ZMQ `Peer-Address`).

    Only IP literals are compared: a host name would need a DNS lookup on the mesh loop, and a connection
    without a transport address (inproc) has nothing to compare.
    """
    if not seen:
        return True
    try:
        want = ipaddress.ip_address(claimed)
    except ValueError:
        return True
    try:
        got = ipaddress.ip_address(seen.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(got, ipaddress.IPv6Address) and got.ipv4_mapped is not None:
        return want == got.ipv4_mapped
    return want == got


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


def valid_peer_host(host: str) -> bool:
    """Whether a claimed peer host is an IPv4 address or a DNS name: anything else would make ZeroMQ's
    connect() raise on the mesh loop (or resolve garbage)."""
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return _HOSTNAME.fullmatch(host) is not None


def handshake_failure(endpoint: str, event: int) -> str:
    """What a client tells its caller when its handshake with `endpoint` failed (a socket-monitor event)."""
    if event & zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"{endpoint} refused this client's key: it is not this mesh's key (check --key-file / ${KEY_ENV})"
    if event & zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return (
            f"{endpoint} and this client disagree on encryption: one of them has a mesh key and the other runs "
            f"without one (node started with --insecure, or no key file given to the client via --key-file / "
            f"${KEY_ENV})"
        )
    return (
        f"the encrypted handshake with {endpoint} failed: the node holds another mesh key than this client, "
        "or runs an open mesh (--insecure)"
    )


# ----------------------------------------------------------------- ZAP (RFC 27)


@dataclass(frozen=True, slots=True)
class ZapVerdict:
    """The answer to one ZAP request, and who asked (for the log)."""

    request_id: bytes
    accepted: bool
    reason: str
    address: str
    mechanism: str
    user: bytes = b"mesh"  # the User-Id every message of an accepted connection carries


def judge_zap(frames: list[bytes], mesh_public: bytes) -> ZapVerdict:
    """Decide one ZAP request: admit exactly CURVE clients presenting the mesh public key (raw 32 bytes)."""
    if len(frames) < 6:
        return ZapVerdict(frames[1] if len(frames) > 1 else b"", False, "malformed ZAP request", "?", "?")
    version, request_id, domain, address, _identity, mechanism = frames[:6]
    credentials = frames[6:]
    addr = address.decode("utf-8", "replace")
    mech = mechanism.decode("ascii", "replace")
    if version != _ZAP_VERSION:
        return ZapVerdict(request_id, False, f"ZAP version {version!r} is not 1.0", addr, mech)
    if domain != ZAP_DOMAIN:
        return ZapVerdict(request_id, False, f"unknown ZAP domain {domain!r}", addr, mech)
    if mechanism != b"CURVE":
        return ZapVerdict(request_id, False, f"mechanism {mech} is not allowed: the mesh needs CURVE", addr, mech)
    if len(credentials) != 1 or credentials[0] != mesh_public:
        return ZapVerdict(request_id, False, "client key is not the mesh key", addr, mech)
    return ZapVerdict(request_id, True, "OK", addr, mech)


def judge_member_zap(frames: list[bytes], admits: Callable[[bytes, bool], tuple[bool, str]]) -> ZapVerdict:
    """Decide one ZAP request in a mesh of member identities: any CURVE key that `admits(key, gossip)` lets in
    (never a revoked one; on the PUB only nodes), its Z85 text as the User-Id of every message it sends."""
    if len(frames) < 6:
        return ZapVerdict(frames[1] if len(frames) > 1 else b"", False, "malformed ZAP request", "?", "?")
    version, request_id, domain, address, _identity, mechanism = frames[:6]
    credentials = frames[6:]
    addr = address.decode("utf-8", "replace")
    mech = mechanism.decode("ascii", "replace")
    if version != _ZAP_VERSION:
        return ZapVerdict(request_id, False, f"ZAP version {version!r} is not 1.0", addr, mech)
    if domain not in (ZAP_DOMAIN, GOSSIP_ZAP_DOMAIN):
        return ZapVerdict(request_id, False, f"unknown ZAP domain {domain!r}", addr, mech)
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return ZapVerdict(request_id, False, f"mechanism {mech} is not allowed: the mesh needs CURVE", addr, mech)
    ok, reason = admits(credentials[0], domain == GOSSIP_ZAP_DOMAIN)
    return ZapVerdict(request_id, ok, reason, addr, mech, z85.encode(credentials[0]) if ok else b"")


def zap_reply(verdict: ZapVerdict) -> list[bytes]:
    status = b"200" if verdict.accepted else b"400"
    user = verdict.user if verdict.accepted else b""
    return [_ZAP_VERSION, verdict.request_id, status, verdict.reason.encode(), user, b""]


class RejectionLog:
    """Rate-limited warnings for refused connections: the first from a source at once, then a count per period."""

    def __init__(self, every: float = _LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def note(self, kind: str, source: str, detail: str) -> str | None:
        """The line to log now for this rejection, or None while its source is within its quiet period."""
        now = self.clock()
        key = (kind, source)
        last, suppressed = self._last.get(key, (-self.every, 0))
        if now - last < self.every:
            self._last[key] = (last, suppressed + 1)
            return None
        if len(self._last) > 1024:  # a scan of many sources must not grow this without bound
            self._last.clear()
        self._last[key] = (now, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        return f"{kind}: {detail} from {source}{more}"


class Authenticator:
    """The ZAP handler of one node's ZeroMQ context, and a watch on its server sockets' failed handshakes.

    `start()` returns once the handler is bound, so binding CURVE sockets after it is safe. `on_reject(kind,
    source)` is called on this thread for every refused connection: kind `auth_rejected` (ZAP said no; source
    is the peer's IP) or `handshake_failed` (wrong server key, or a plaintext peer; source is the endpoint the
    monitor event names, which libzmq 4.3 makes the peer's address on a connecting socket but our own bound
    address on an accepting one: its stable monitor API does not say who connected).
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        key: Any,
        on_reject: Callable[[str, str], None],
        admits: Callable[[bytes, bool], tuple[bool, str]] | None = None,
    ) -> None:
        self.ctx = ctx
        # A shared mesh key: admit exactly it. A member identity: whoever `admits(key, gossip)` lets in.
        self._mesh_public = z85.decode(key.public)
        self._admits = admits
        self._on_reject = on_reject
        self._log = RejectionLog()
        self._watches: queue.SimpleQueue[tuple[zmq.Socket[Any], str]] = queue.SimpleQueue()
        self._own_endpoints: set[str] = set()  # where our watched sockets listen
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: zmq.ZMQError | None = None
        self._thread = threading.Thread(target=self._run, name="lanmesh-zap", daemon=True)

    def start(self, timeout: float = 5.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the ZAP authenticator did not start in time")
        if self._error is not None:
            raise self._error

    def watch(self, sock: zmq.Socket[Any], name: str) -> None:
        """Count failed handshakes on `sock` (call from the thread that owns `sock`, before it binds)."""
        self._watches.put((sock.get_monitor_socket(_WATCHED_EVENTS), name))

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            zap = self.ctx.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(_ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        monitors: dict[zmq.Socket[Any], str] = {}
        try:
            while not self._stop.is_set():
                while not self._watches.empty():
                    mon, name = self._watches.get()
                    monitors[mon] = name
                    poller.register(mon, zmq.POLLIN)
                for sock, _ in poller.poll(100):
                    if sock is zap:
                        self._answer(zap)
                    else:
                        self._read_monitor(sock, monitors[sock])
        except zmq.ContextTerminated:
            return  # the node is shutting down around us
        finally:
            for mon in monitors:
                mon.close(0)
            zap.close(0)

    def _answer(self, zap: zmq.Socket[Any]) -> None:
        frames = zap.recv_multipart()
        if self._admits is not None:
            verdict = judge_member_zap(frames, self._admits)
        else:
            verdict = judge_zap(frames, self._mesh_public)
        zap.send_multipart(zap_reply(verdict))
        if not verdict.accepted:
            self._rejected("auth_rejected", verdict.address, f"{verdict.mechanism} client refused ({verdict.reason})")

    def _read_monitor(self, mon: zmq.Socket[Any], name: str) -> None:
        while True:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                return
            raw = event.get("endpoint", b"")
            endpoint = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            if event["event"] & zmq.EVENT_LISTENING:
                self._own_endpoints.add(endpoint)
                continue
            # The peer where libzmq names it; else our socket (the log then says who cannot be known).
            peer = endpoint if endpoint and endpoint not in self._own_endpoints else None
            detail = f"plaintext or wrong-key peer on {name}: handshake failed (zmq protocol error {event['value']:#x})"
            self._rejected("handshake_failed", peer or f"an unknown peer (libzmq does not say) on {name}", detail)

    def _rejected(self, kind: str, source: str, detail: str) -> None:
        self._on_reject(kind, source)
        line = self._log.note(kind, source, detail)
        if line is not None:
            log.warning("refused a connection: %s", line, extra={"source": source, "kind": kind})


# ----------------------------------------------------------------- request limits


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may ask of a node, beyond what the codec already bounds (frame size, nesting)."""

    max_prompt_chars: int = 262_144
    max_tokens: int = 4096
    max_embed_inputs: int = 256

    def check(self, req: Request) -> str | None:
        """Why `req` is refused (a message for a BAD_REQUEST), or None when it fits."""
        task, data = req.task, req.input
        chars = len(req.prefix)
        if task is Task.COMPLETE:
            chars += len(data)
        elif task is Task.CHAT:
            chars += sum(len(m["content"]) for m in data)
        elif task is Task.EMBED:
            if isinstance(data, list):
                if len(data) > self.max_embed_inputs:
                    return f"{len(data)} inputs to embed; this node takes at most {self.max_embed_inputs} per request"
                chars += sum(len(x) for x in data)
            else:
                chars += len(data)
        if chars > self.max_prompt_chars:
            return f"input of {chars} characters is over this node's limit of {self.max_prompt_chars}"
        if "max_tokens" in req.params:
            n = req.params["max_tokens"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return f"max_tokens must be a positive integer, got {n!r}"
            if n > self.max_tokens:
                return f"max_tokens {n} is over this node's limit of {self.max_tokens}"
        return None


__all__ = [
    "DEFAULT_KEY_PATH",
    "GOSSIP_ZAP_DOMAIN",
    "INSECURE_ENV",
    "KEY_ENV",
    "Authenticator",
    "CurveUnavailable",
    "MeshKey",
    "MeshKeyError",
    "Plaintext",
    "RejectionLog",
    "RequestLimits",
    "ZapVerdict",
    "fingerprint_of",
    "handshake_failure",
    "judge_member_zap",
    "judge_zap",
    "read_key_file",
    "require_curve",
    "same_host",
    "valid_peer_host",
]
