"""Member identities on a node's loop: the door every ROUTER message passes (who may send what), certificates
presented on connections, revocation lists adopted and spread, and the authority's answers (joins, invites,
revocations) on worker threads.

A part `MeshNode` is composed of when its key is a member identity (`_identity`); the decisions are the book's
(`_members`). It runs on the node's loop thread, except `handle`, which the node's service workers call.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from protocol import (
    Admin,
    Credentials,
    DecodeError,
    Digest,
    Error,
    ErrorCode,
    Fetch,
    Hello,
    Join,
    Reject,
    Reply,
    Request,
    Revocations,
    Suspicion,
    decode,
    encode,
)

from ._authority import DEFAULT_VALID_S, Authority, AuthorityError
from ._certs import CertificateError, InviteCode, Role, key_bytes, key_text
from ._identity import MemberIdentity
from ._members import FROM_ANYONE, Member, Members, role_needed
from ._peers import Peer
from ._security import RejectionLog

if TYPE_CHECKING:
    from ._links import PeerLinks
    from ._services import Services
    from ._settings import MeshSettings

log = logging.getLogger("lanmesh.security")

_EXPIRY_EVERY_S = 1.0
_PUSH_EVERY_S = 2.0  # at most one revocation list a peer behind is sent per this period (its reports repeat)
DEFAULT_INVITE_S = 3600.0
_STRANGER_FRAME = 8192  # bytes: the most a key this node does not know may send (a certificate, a join)
_WARN_EXPIRY_S = 14 * 86_400.0  # a node whose own certificate runs out sooner says so, hourly


class Trust:
    """See the module docstring. `drop_peer(peer, why)` forgets a peer and re-sends what ran there; `router_frame`
    is how the node handles a ROUTER message without member identities (requests, cancels, pings)."""

    def __init__(
        self,
        identity: MemberIdentity,
        members: Members,
        links: PeerLinks,
        stats: collections.Counter[str],
        settings: MeshSettings,
        *,
        send_client: Callable[[bytes, Any], None],
        drop_peer: Callable[[Peer, str], None],
        post: Callable[[str, Any], None],
        router_frame: Callable[[bytes, bytes, Any], None],
        services: Services,
        on_hello: Callable[..., None],
        rebind_pub: Callable[[], None],
        guarded: Callable[..., None],
    ) -> None:
        self.identity = identity
        self.members = members
        self.links = links
        self.stats = stats
        self.node_id = settings.node_id
        self.authority = settings.authority
        self._send_client = send_client
        self._drop_peer = drop_peer
        self._post = post
        self._router_frame = router_frame
        self.services = services
        self._on_hello = on_hello
        self._guarded = guarded
        self._rebind_pub = rebind_pub
        self.limits = settings.limits
        self._log = RejectionLog()
        # Until it has heard a node's revocation serial (or this long passed with nobody), the node acts only for
        # itself: a list issued while it was away would otherwise reach it after a revoked key's requests.
        self.synced = False
        self._sync_deadline = time.monotonic() + settings.dead_after
        if self.authority is not None:  # the authority's own list is the newest there is
            if self.authority.revocations is not None:
                self.members.adopt(self.authority.revocations.encode())
            self.synced = True
        self._next_expiry = 0.0
        self._next_expiry_warning = 0.0
        self._pushed: dict[str, float] = {}  # peer -> when it was last sent the list
        self._refused: dict[str, str] = {}  # key -> why its certificate was refused (its requests hear why)
        self.address = ""  # host:port of this node's ROUTER, once bound (invite codes name it)
        self.directory: list[tuple[str, str, str]] = []  # (name, host:port, key) of verified nodes: joiners get it

    @property
    def serial(self) -> int:
        return self.members.serial

    def credentials(self) -> bytes:
        """What this node sends first on a link to a peer: its certificate, asking for the peer's."""
        return self.identity.certificate_frame(self.serial, reply=True)

    # ------------------------------------------------------------- the door (every ROUTER message)

    def on_part(self, ident: bytes, part: zmq.Frame) -> None:
        """A message on the node's ROUTER: its sender's key is the ZAP User-Id libzmq put on it (~1 us to read),
        looked up in the book; a key the book does not know may send only a small frame (a certificate, a join)."""
        uid = str(part.get("User-Id"))
        member = self.members.by_uid.get(uid)
        if member is None and len(part) > _STRANGER_FRAME:
            self.stats["unknown_key"] += 1
            return
        self._guarded("a message from a member", self.on_frame, ident, part.bytes, member, uid)

    def from_node(self, part: zmq.Frame) -> bool:
        """Whether a multi-part message on the ROUTER (a pipeline stage's: only nodes send them) comes from a node's
        key; otherwise it is counted (role_refused, unknown_key) and the caller drops it whole."""
        member = self.members.by_uid.get(str(part.get("User-Id")))
        if member is not None and member.role >= Role.NODE:
            return True
        self.stats["unknown_key" if member is None else "role_refused"] += 1
        return False

    def on_frame(self, ident: bytes, frame: bytes, member: Member | None, uid: str | None) -> None:
        """A message on the node's ROUTER from the connection with key `uid`: through the door, then certificates,
        joins, revocations and hellos here, the rest as without member identities (`router_frame`)."""
        try:
            msg = decode(frame, self.limits)
        except DecodeError:
            msg = None  # the node's own handler answers what it can of it
        if msg is not None and not self.admit(ident, msg, member, uid):
            return
        if isinstance(msg, Credentials):
            self.on_credentials(ident, msg, uid)
        elif isinstance(msg, Revocations):
            self.on_revocations(msg.document, member.name if member is not None else "?")
        elif isinstance(msg, Hello):
            self._on_hello(ident, msg, by_itself=True)  # on a connection made with its own key
        elif isinstance(msg, Join | Admin | Fetch):
            refused = self.services.submit(ident, msg, uid or "")
            if refused is not None:
                self._send_client(ident, refused)
        else:
            self._router_frame(ident, frame, msg)

    def admit(self, ident: bytes, msg: Any, member: Member | None, uid: str | None) -> bool:
        """Whether `msg`, from the connection whose key is `uid` (`member` when known), may go on; otherwise it is
        answered here (when it can be) and counted."""
        t = type(msg)
        if t in FROM_ANYONE:
            return True
        if member is None:
            self._refuse_stranger(ident, msg, uid)
            return False
        needed = role_needed(msg)
        if member.role < needed:
            self._refuse(ident, msg, "role_refused", member.name,
                         f"{member.name} is a {member.role}; {t.__name__}{_action(msg)} needs a {needed}")  # fmt: skip
            return False
        if t is Hello and (msg.addr.node != member.name or msg.addr.key != member.uid):
            self._refuse(ident, msg, "name_refused", member.name,
                         f"{member.name} said hello as {msg.addr.node}")  # fmt: skip
            return False
        sender = msg.node if t is Digest else msg.by if t is Suspicion else member.name
        if sender != member.name:  # gossip names its sender: only as itself
            self._refuse(ident, msg, "name_refused", member.name, f"{member.name} sent a {t.__name__} as {sender}")
            return False
        if t is Request and not self.synced and member is not self.members.own:
            why = "this node is catching up with the mesh's revocations; try another node"
            self.stats["sync_refused"] += 1
            if msg.hops:
                self._send_client(ident, Reject(msg.id, self.node_id, 0, why))
            else:
                self._send_client(ident, Error(msg.id, ErrorCode.UNAVAILABLE, why, self.node_id))
            return False
        return True

    def _refuse_stranger(self, ident: bytes, msg: Any, uid: str | None) -> None:
        revoked = False
        if uid:
            try:
                revoked = key_bytes(uid) in self.members.revoked
            except ValueError:
                pass
        source = f"key {uid[:8]}..." if uid else "a connection without a key"
        if revoked:
            self._refuse(ident, msg, "revoked_refused", source, f"{type(msg).__name__} from a revoked key")
            return
        self.stats["unknown_key"] += 1
        rid = getattr(msg, "id", None)
        refused = self._refused.get(uid or "")
        if refused and isinstance(rid, str):  # its certificate was refused: a retry changes nothing
            self._send_client(ident, Error(rid, ErrorCode.UNAUTHORIZED, f"this node refused your certificate: "
                                           f"{refused}", self.node_id))  # fmt: skip
        elif type(msg) is Request and rid is not None:
            # The certificate may be on its way (the sender's connection is new, or this node restarted): retryable.
            why = "this node does not know your certificate yet (it is sent first on each connection); try again"
            if msg.hops:
                self._send_client(ident, Reject(rid, self.node_id, 0, why))
            else:
                self._send_client(ident, Error(rid, ErrorCode.UNAVAILABLE, why, self.node_id))
        elif rid is not None:
            why = "this node does not know your key: present a certificate of this mesh (lanmesh join)"
            self._send_client(ident, Error(rid, ErrorCode.UNAUTHORIZED, why, self.node_id))
        self._note("unknown key", source, f"{type(msg).__name__} before a certificate")

    def _refuse(self, ident: bytes, msg: Any, counter: str, source: str, why: str) -> None:
        self.stats[counter] += 1
        rid = getattr(msg, "id", None)
        if rid is not None and isinstance(rid, str):
            self._send_client(ident, Error(rid, ErrorCode.UNAUTHORIZED, why, self.node_id))
        self._note(counter.replace("_", " "), source, why)

    def _note(self, kind: str, source: str, why: str) -> None:
        line = self._log.note(kind, source, why)
        if line is not None:
            log.warning("refused: %s", line, extra={"source": source, "kind": kind})

    # ------------------------------------------------------------- certificates

    def on_credentials(self, ident: bytes, msg: Credentials, uid: str | None) -> None:
        """A member presents its certificate on this node's ROUTER (first thing on its connection)."""
        try:
            key = key_bytes(uid or "")
        except ValueError:
            self.stats["credentials_refused"] += 1
            return
        member, why = self.members.present(msg.cert, key)
        if member is None:
            self.stats["credentials_refused"] += 1
            if len(self._refused) >= 1024:
                self._refused.clear()
            self._refused[key_text(key)] = why
            self._note("certificate refused", f"key {key_text(key)[:8]}...", why)
            return
        self._refused.pop(key_text(key), None)
        if member.role >= Role.NODE and member is not self.members.own:
            if msg.reply:  # a peer (or a seed contact) learns who this node is on the same connection
                self._send_client(ident, Credentials(self.identity.certificate, self.serial))
            if msg.revocations < self.serial and self.members.revocations is not None:
                self._send_client(ident, Revocations(self.members.revocations.encode()))  # it catches up
            self._heard_serial(msg.revocations)

    def on_peer_credentials(self, peer: Peer, msg: Credentials) -> None:
        """A peer's certificate, answered on the DEALER this node made with the key its claim named."""
        member, why = self.members.present(msg.cert, key_bytes(peer.addr.key))
        if member is None or member.name != peer.node or member.role < Role.NODE:
            if member is not None:
                why = f"its certificate names {member.name}, a {member.role}"
            self.stats["name_refused"] += 1
            self._note("peer refused", f"{peer.addr.host}:{peer.addr.port}", f"claimed to be {peer.node}: {why}")
            self._drop_peer(peer, "peer-refused")
            return
        if not peer.verified:
            peer.verified = True
            self.identity.node_keys.learn(f"{peer.addr.host}:{peer.addr.port}", peer.addr.key)  # pulls connect there
            log.info("peer %s presented its certificate (%s)", peer.node, member.role)
        self.links.subscribe(peer)  # it knows this node now (it answered this node's certificate): its gossip
        if msg.revocations < self.serial:
            self._push(peer, force=True)
        self._heard_serial(msg.revocations)

    def from_peer(self, peer: Peer, msg: Any) -> bool:
        """Handle what only member identities have on a peer's DEALER (its certificate, a revocation list), and
        swallow anything else it says before its certificate; False: the node goes on with `msg`."""
        if isinstance(msg, Credentials):
            self.on_peer_credentials(peer, msg)
        elif isinstance(msg, Revocations):
            self.on_revocations(msg.document, peer.node)
        elif not peer.verified:
            self.stats["unverified_peer"] += 1
        else:
            return False
        return True

    def peer_serial(self, peer: Peer, serial: int) -> None:
        """A peer's gossip says which revocation list it holds: one behind is sent ours."""
        if serial < self.serial:
            self._push(peer)
        self._heard_serial(serial)

    def _push(self, peer: Peer, force: bool = False) -> None:
        doc = self.members.revocations
        now = time.monotonic()
        if doc is None or (not force and now - self._pushed.get(peer.node, -_PUSH_EVERY_S) < _PUSH_EVERY_S):
            return
        self._pushed[peer.node] = now
        try:
            peer.dealer.send(encode(Revocations(doc.encode())), zmq.NOBLOCK)
        except zmq.Again:
            return  # not connected: its next report asks again
        self.links.poller.touch(peer.dealer)  # a send may take the notification of a message that just arrived

    def _heard_serial(self, serial: int) -> None:
        if not self.synced and serial <= self.serial:
            self.synced = True
            log.info("revocation list %d is the mesh's latest a node knows: serving the mesh", self.serial)

    # ------------------------------------------------------------- revocations

    def on_revocations(self, document: bytes, source: str) -> None:
        """A revocation list from an admin's command, a peer or a join: adopt it if newer, act on it, spread it."""
        try:
            gone = self.members.adopt(document)
        except CertificateError as exc:
            self.stats["revocations_refused"] += 1
            self._note("revocation list refused", source, str(exc))
            return
        if gone is None:
            return
        self.stats["revocation_lists"] += 1
        doc = self.members.revocations
        assert doc is not None
        names = sorted({e.name for e in doc.entries if e.key in {m.key for m in gone}} | {m.name for m in gone})
        log.warning("revocation list %d from %s: %d keys revoked%s", doc.serial, source, len(doc.entries),
                    f" (known here: {', '.join(names)})" if names else "")  # fmt: skip
        self._cut(doc.keys(), "peer-revoked")
        if key_bytes(self.identity.key_text) in doc.keys():
            log.error("THIS node's key was revoked: the mesh refuses it; enrol again (lanmesh join)")
        self._heard_serial(doc.serial)
        for peer in self.links.peers:
            if peer.verified:
                self._push(peer, force=True)

    def _cut(self, keys: frozenset[bytes] | set[bytes], why: str) -> None:
        """Drop every link to a peer whose key is in `keys` (its work is re-sent elsewhere) and end its
        subscription to this node's gossip."""
        for peer in self.links.peers:
            try:
                if key_bytes(peer.addr.key) in keys:
                    log.warning("dropping peer %s: its key is no longer valid (%s)", peer.node, why)
                    self._drop_peer(peer, why)
            except ValueError:
                continue
        self._rebind_pub()

    # ------------------------------------------------------------- housekeeping

    def housekeeping(self, now: float) -> None:
        if not self.synced and now >= self._sync_deadline:
            self.synced = True
            log.info("no node told this one of a newer revocation list in time: serving the mesh (list %d)",
                     self.serial)  # fmt: skip
        if now < self._next_expiry:
            return
        self._next_expiry = now + _EXPIRY_EVERY_S
        left = self.members.own.cert.not_after - time.time()
        if left < _WARN_EXPIRY_S and now >= self._next_expiry_warning:
            self._next_expiry_warning = now + 3600.0
            log.warning("this node's certificate %s: enrol it again before then (lanmesh invite --name %s, then "
                        "lanmesh join CODE here)", f"expires in {left / 86_400:.1f} days" if left > 0 else "expired",
                        self.node_id)  # fmt: skip
        gone = self.members.expire()
        for m in gone:
            self._refused[m.uid] = f"the certificate of {m.name} expired"
        if gone:
            log.warning("certificates expired: %s", ", ".join(m.name for m in gone))
            self._cut({m.key for m in gone}, "peer-expired")
        self.directory = [(self.node_id, self.address, self.identity.key_text)] + [
            (p.node, f"{p.addr.host}:{p.addr.port}", p.addr.key) for p in self.links.peers if p.verified
        ]

    def row(self, key: str) -> dict[str, Any]:
        """What a status row says of the node with `key`: its key and certificate (clients learn keys from them)."""
        member = self.members.by_uid.get(key)
        if member is None:
            return {"key": key}
        return {"key": key, "certificate": member.cert.text(), "role": str(member.role)}

    def view(self) -> dict[str, Any]:
        own = self.members.own
        return {
            "member": own.name,
            "role": str(own.role),
            "authority": self.authority is not None,
            "revocations": self.serial,
            "members_known": len(self.members.by_uid),
            "synced": self.synced,
            **{
                k: self.stats[k]
                for k in ("role_refused", "name_refused", "unknown_key", "revoked_refused", "credentials_refused")
            },  # fmt: skip
        }

    # ------------------------------------------------------------- the authority (worker threads)

    def handle(self, msg: Join | Admin, uid: str) -> Reply | Error:
        """Answer a Join, or an admin's invite, revoke or members (the door checked the role)."""
        try:
            if isinstance(msg, Join):
                return self._join(msg, uid)
            if msg.action == "members":
                return Reply(msg.id, self._members(), self.node_id)
            authority = self._authority()
            if msg.action == "invite":
                return self._invite(msg, authority)
            doc = authority.revoke(str(msg.args.get("name", "")))
            self._post("revocations", doc.encode())  # this node acts on it and spreads it, on its loop
            return Reply(msg.id, {"serial": doc.serial, "revoked": len(doc.entries)}, self.node_id)
        except (AuthorityError, ValueError) as exc:
            return Error(msg.id, ErrorCode.BAD_REQUEST, str(exc), self.node_id)

    def _authority(self) -> Authority:
        if self.authority is None:
            raise AuthorityError(
                f"{self.node_id} does not hold the mesh authority; ask the node that does (the one `lanmesh init` "
                "ran on, where invites come from)"
            )
        return self.authority

    def _join(self, msg: Join, uid: str) -> Reply:
        authority = self._authority()
        cert = authority.join(msg.token, key_bytes(uid), msg.name)
        log.info("%s joined the mesh as a %s", cert.name, cert.role)
        revocations = authority.revocations
        return Reply(msg.id, {
            "certificate": cert.encode(),
            "authority": authority.key.public,
            "revocations": revocations.encode() if revocations is not None else b"",
            "nodes": [list(n) for n in self.directory],
        }, self.node_id)  # fmt: skip

    def _invite(self, msg: Admin, authority: Authority) -> Reply:
        args = msg.args
        role = Role.parse(str(args.get("role", "node")))
        expires = float(args.get("expires_s", DEFAULT_INVITE_S))
        valid = int(args.get("valid_s") or DEFAULT_VALID_S)
        name = str(args.get("name", ""))
        token = authority.invite(role, expires, valid, name)
        code = InviteCode(self.address, key_bytes(self.identity.key_text), authority.key.public, token)
        return Reply(msg.id, {"code": code.text(), "role": str(role), "expires_s": expires, "name": name},
                     self.node_id)  # fmt: skip

    def _members(self) -> dict[str, Any]:
        known = {m.name: m for m in list(self.members.by_uid.values())}
        rows: dict[str, dict[str, Any]] = {
            m.name: {"name": m.name, "role": str(m.role), "key": m.uid, "not_after": m.cert.not_after,
                     "seen": True} for m in known.values()
        }  # fmt: skip
        revoked = self.members.revocations.keys() if self.members.revocations is not None else frozenset()
        if self.authority is not None:
            for i in self.authority.issued():
                if i.name not in rows or rows[i.name]["key"] != key_text(i.key):
                    rows.setdefault(i.name, {"name": i.name, "role": str(i.role), "key": key_text(i.key),
                                             "not_after": i.not_after, "seen": False})  # fmt: skip
        for row in rows.values():
            row["revoked"] = key_bytes(row["key"]) in revoked
        return {"members": sorted(rows.values(), key=lambda r: r["name"]), "revocations": self.serial}


def _action(msg: Any) -> str:
    return f" {msg.action}" if isinstance(msg, Admin) else ""


__all__ = ["DEFAULT_INVITE_S", "Trust"]
