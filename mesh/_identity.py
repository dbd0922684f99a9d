"""A member's identity file: its own CURVE key pair (the secret never leaves the machine), its certificate, the
authority's public key and the nodes it knows (name, address, key) - and, for a client, which key to expect of
the node at each address.

The file is found like the shared mesh key (`--key-file`, `$LANMESH_KEY_FILE`, `~/.config/lanmesh/mesh.key`) and
told apart by `kind = "member"`. CURVE makes a client name the server's key before it connects; `NodeKeys` is
where a member looks it up: the nodes of its file, its own key for a node on its own machine, and every node of
the status rows it reads (each row's certificate checked against the authority).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import stat
import threading
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from nacl.signing import VerifyKey

from protocol import Credentials, DecodeError, Ping, Pong, decode, encode, is_name

from ._certs import Certificate, CertificateError, Role, fingerprint, key_bytes, key_text
from ._security import ZAP_DOMAIN, MeshKeyError, require_curve


@dataclass(frozen=True, slots=True)
class KnownNode:
    """A node a member knows how to reach: its name, `host:port` and CURVE key (Z85)."""

    name: str
    address: str
    key: str


def _host_port(endpoint: str) -> str:
    """`tcp://host:port` or `host:port` as `host:port` (brackets of an IPv6 host kept)."""
    return endpoint[len("tcp://") :] if endpoint.startswith("tcp://") else endpoint


def _is_local(host: str) -> bool:
    """Whether `host` is this machine: loopback, or an address a socket here can bind."""
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in ("localhost", "localhost.")
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.bind((host, 0))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class NodeKeys:
    """Which CURVE key to expect of the node at each address (thread-safe: a client's threads share it)."""

    def __init__(self, authority: VerifyKey, known: Iterable[KnownNode], own: tuple[str, str] | None) -> None:
        self.authority = authority
        self._lock = threading.Lock()
        self._by_address: dict[str, str] = {n.address: n.key for n in known}
        self._own = own  # (this member's key, its name) when it is a node: a node on this machine is itself

    def key_for(self, endpoint: str) -> str | None:
        address = _host_port(endpoint)
        with self._lock:
            found = self._by_address.get(address)
        if found is not None:
            return found
        if self._own is not None:
            host, _, _ = address.rpartition(":")
            if _is_local(host):
                return self._own[0]
        return None

    def learn_rows(self, rows: Sequence[Any]) -> int:
        """Take the keys of a node's status rows (each row's `certificate` checked against the authority and its
        `key`); returns how many addresses were new."""
        new = 0
        for row in rows if isinstance(rows, list) else ():
            if not isinstance(row, dict):
                continue
            address, text = row.get("address"), row.get("certificate")
            if not isinstance(address, str) or not isinstance(text, str):
                continue
            try:
                cert = Certificate.from_text(text, self.authority)
            except CertificateError:
                continue
            if cert.role < Role.NODE or cert.name != row.get("node"):
                continue
            with self._lock:
                if self._by_address.get(address) != cert.key_text:
                    self._by_address[address] = cert.key_text
                    new += 1
        return new

    def learn(self, address: str, key: str) -> None:
        """A node's key, from a source already trusted (a peer that presented its certificate to this node)."""
        with self._lock:
            self._by_address[address] = key

    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._by_address)


@dataclass(frozen=True, slots=True)
class MemberIdentity:
    """This machine's membership of a mesh (see the module docstring). Use it as `security=` for a client, or as a
    node's key: its ROUTER and PUB then use this key as their CURVE server key."""

    name: str
    role: Role
    public: bytes  # Z85 text, 40 bytes
    secret: bytes = field(repr=False)
    certificate: bytes = field(repr=False)  # as the authority signed it
    authority: bytes = field(repr=False)  # the authority's verify key, 32 raw bytes
    nodes: tuple[KnownNode, ...] = ()
    keys: NodeKeys | None = field(default=None, compare=False, repr=False)

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self.authority)

    @property
    def fingerprint(self) -> str:
        """The mesh's fingerprint (its authority's), which mDNS and status show."""
        return fingerprint(self.authority)

    @property
    def cert(self) -> Certificate:
        return Certificate.decode(self.certificate, self.verify_key)

    @property
    def node_keys(self) -> NodeKeys:
        assert self.keys is not None
        return self.keys

    @classmethod
    def make(cls, cert_bytes: bytes, public: bytes, secret: bytes, authority: bytes,
             nodes: Sequence[KnownNode] = ()) -> MemberIdentity:  # fmt: skip
        """An identity from its parts, checked: the certificate is the authority's and names this key pair."""
        verify = VerifyKey(authority)
        try:
            cert = Certificate.decode(cert_bytes, verify)
        except CertificateError as exc:
            raise MeshKeyError(f"the certificate does not belong to this mesh: {exc}") from None
        if cert.key_text.encode() != public:
            raise MeshKeyError("the certificate names another key than this identity's")
        require_curve()
        if zmq.curve_public(secret) != public:
            raise MeshKeyError("public_key does not belong to secret_key (the file was edited or mixed from two)")
        own = (cert.key_text, cert.name) if cert.role >= Role.NODE else None
        keys = NodeKeys(verify, nodes, own)
        return cls(cert.name, cert.role, public, secret, cert_bytes, authority, tuple(nodes), keys)

    # ------------------------------------------------------------- the file

    @classmethod
    def from_toml(cls, data: dict[str, Any], where: str) -> MemberIdentity:
        try:
            cert = base64.b64decode(str(data["certificate"]).encode(), validate=True)
            authority = base64.b64decode(str(data["authority"]).encode(), validate=True)
            public, secret = str(data["public_key"]).encode(), str(data["secret_key"]).encode()
        except (KeyError, binascii.Error, ValueError):
            raise MeshKeyError(f"member identity {where} lacks certificate, authority or its keys; join again "
                               "(lanmesh join CODE)") from None  # fmt: skip
        for field_name, text in (("public_key", public), ("secret_key", secret)):
            try:
                key_bytes(text)
            except ValueError as exc:
                raise MeshKeyError(f"member identity {where}: {field_name}: {exc}") from None
        if len(authority) != 32:
            raise MeshKeyError(f"member identity {where}: the authority key is not 32 bytes")
        nodes = []
        for entry in data.get("node", []):
            if not isinstance(entry, dict):
                continue
            name, address, key = entry.get("name"), entry.get("address"), entry.get("key")
            if isinstance(name, str) and is_name(name) and isinstance(address, str) and isinstance(key, str):
                nodes.append(KnownNode(name, address, key))
        return cls.make(cert, public, secret, authority, nodes)

    def write(self, path: str | os.PathLike[str], *, force: bool = False) -> Path:
        """Write the identity with mode 0600 (its folder 0700 when made here); never overwrite unless `force`."""
        p = Path(path).expanduser()
        if p.exists() and not force:
            raise FileExistsError(f"{p} already exists; pass --force to replace it (or --key-file PATH)")
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lines = [
            "# lanmesh member identity: this machine's own key, and its certificate from the mesh authority.",
            "# Keep it secret (mode 0600); it never needs to leave this machine. `lanmesh revoke NAME` cancels it.",
            'kind = "member"',
            f'name = "{self.name}"',
            f'role = "{self.role}"',
            f'fingerprint = "{self.fingerprint}"',
            f'public_key = "{self.public.decode()}"',
            f'secret_key = "{self.secret.decode()}"',
            f'certificate = "{base64.b64encode(self.certificate).decode()}"',
            f'authority = "{base64.b64encode(self.authority).decode()}"',
        ]
        for n in self.nodes:
            lines += ["", "[[node]]", f'name = "{n.name}"', f'address = "{n.address}"', f'key = "{n.key}"']
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            if force:
                os.replace(tmp, p)
            else:
                os.link(tmp, p)
                tmp.unlink()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return p

    # ------------------------------------------------------------- sockets

    def configure_server(self, sock: zmq.Socket[Any], domain: bytes = ZAP_DOMAIN) -> None:
        """A socket that binds (ROUTER, PUB): CURVE server with this member's own key; every handshake goes to ZAP."""
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def configure_client(self, sock: zmq.Socket[Any], endpoint: str | None = None, server_key: str = "") -> None:
        """A socket about to connect to `endpoint`: this member's key pair, and the key to expect of that node
        (`server_key`, else the one `NodeKeys` knows for the endpoint). Set again before each connect."""
        key = server_key or (self.node_keys.key_for(endpoint) if endpoint else None)
        if not key:
            raise MeshKeyError(
                f"no key is known for the node at {_host_port(endpoint or '?')}: this member knows "
                f"{', '.join(self.node_keys.addresses()) or 'no node'}; use one of them (it tells the client the rest)"
            )
        sock.setsockopt(zmq.CURVE_SERVER, 0)
        sock.setsockopt(zmq.CURVE_SERVERKEY, key.encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)

    def certificate_frame(self, revocations: int = 0, reply: bool = False) -> bytes:
        """What this member sends first on every new connection (`reply`: a node linking to a peer asks for the
        peer's certificate in return)."""
        return encode(Credentials(self.certificate, revocations, reply))

    def learn_status(self, rows: Sequence[Any]) -> None:
        self.node_keys.learn_rows(rows)

    def resolve(self, endpoint: str, timeout: float = 1.5) -> None:
        """Make sure a key is known for the node at `endpoint`: if not, ask the nodes this member knows for their
        status (each row carries a node's certificate) until one lists it. Blocking; `configure_client` says what
        is wrong when none does."""
        if self.node_keys.key_for(endpoint) is not None:
            return
        for address in self.node_keys.addresses():
            rows = self._ask_status(address, timeout)
            if rows:
                self.node_keys.learn_rows(rows)
                if self.node_keys.key_for(endpoint) is not None:
                    return

    def _ask_status(self, address: str, timeout: float) -> list[Any]:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            self.configure_client(sock, f"tcp://{address}")
            sock.connect(f"tcp://{address}")
            sock.send(self.certificate_frame())
            sock.send(encode(Ping("keys", self.name, True)))
            end = time.monotonic() + timeout
            while (left := end - time.monotonic()) > 0 and sock.poll(int(left * 1000)):
                try:
                    msg = decode(sock.recv())
                except DecodeError:
                    continue
                if isinstance(msg, Pong) and msg.id == "keys":
                    return msg.status or []
            return []
        except (zmq.ZMQError, MeshKeyError):
            return []
        finally:
            ctx.destroy(0)

    def describe(self) -> str:
        return f"CURVE, member {self.name} ({self.role}) of mesh {self.fingerprint}"

    @property
    def key_text(self) -> str:
        return self.public.decode()


def load_identity_file(p: Path, text: str) -> MemberIdentity:
    """A member identity from a key file's text (already read and checked for its mode by the caller)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MeshKeyError(f"key file {p} is not a lanmesh key file: {exc}") from None
    return MemberIdentity.from_toml(data, str(p))


def is_identity_text(text: str) -> bool:
    try:
        return tomllib.loads(text).get("kind") == "member"
    except tomllib.TOMLDecodeError:
        return False


def private_file_problem(p: Path) -> str:
    try:
        st = p.stat()
    except OSError:
        return ""
    if st.st_mode & 0o077:
        return f"{p} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {p}`"
    return ""


__all__ = [
    "KnownNode",
    "MemberIdentity",
    "NodeKeys",
    "is_identity_text",
    "key_text",
    "load_identity_file",
]
