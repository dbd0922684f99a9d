"""`lanmesh init`, `invite`, `join`, `revoke`, `members`: a mesh where every machine has its own key.

`init` makes the mesh authority and this machine's identity; `invite` asks the authority's node for a one-time
code; `join CODE` (on the new machine) makes a key pair there and gets it certified over an encrypted connection
to the node the code names, expecting that node's key; `revoke NAME` ends a member everywhere; `members` lists them.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from mesh import (
    AUTHORITY_DIR,
    Authority,
    AuthorityError,
    CertificateError,
    InviteCode,
    KnownNode,
    MemberIdentity,
    MeshKeyError,
    RevocationList,
    Role,
    client_security,
    default_key_path,
    key_path,
    key_text,
    load_key,
)
from protocol import Error, Join, Reply, decode, encode, name_problem

from ..runtime.config import DEFAULT_PORT, NodeConfig
from .model_commands import AdminError, admin_call

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
JOIN_TIMEOUT_S = 15.0


def duration(text: str) -> float:
    """`90s`, `30m`, `1h`, `7d`, `2w` (or plain seconds) as seconds."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 1h, 7d or 365d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _member_name(text: str) -> str:
    problem = name_problem(text, "member name")
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def default_name() -> str:
    """This machine's name as a member name (its hostname, made to pass the name rule)."""
    host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-_")[:64]
    return host or "machine"


def default_node(explicit: str | None, key_file: str | None = None) -> str:
    """The node a command talks to: the one given, else one this machine's identity knows (a client's machine runs
    no node), else the node on this machine."""
    if explicit:
        return explicit
    try:
        key = load_key(key_file) if key_file else client_security()
    except (MeshKeyError, OSError, ValueError):
        key = None
    if isinstance(key, MemberIdentity) and key.role < Role.NODE and key.nodes:
        return key.nodes[0].address
    return f"127.0.0.1:{DEFAULT_PORT}"


def _security(args: argparse.Namespace) -> Any:
    return load_key(args.key_file) if args.key_file else client_security()


def _key_file_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--key-file", dest="key_file", metavar="FILE",
                   help=f"{what} (default: $LANMESH_KEY_FILE, then ~/.config/lanmesh/mesh.key)")  # fmt: skip


# ---------------------------------------------------------------- init


def _cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.key_file).expanduser() if args.key_file else (key_path() or default_key_path())
    if path.exists():
        print(f"lanmesh init: {path} exists already; this machine is enrolled (or holds a shared key). To start a "
              "new mesh here, move it away first, or give --key-file PATH", file=sys.stderr)  # fmt: skip
        return 1
    folder = Path(args.authority_dir).expanduser() if args.authority_dir else path.parent / AUTHORITY_DIR
    try:
        authority = Authority.create(folder)
        public, secret = zmq.curve_keypair()
        cert = authority.issue(args.name, zmq.utils.z85.decode(public), Role.ADMIN, int(args.valid_for))
        identity = MemberIdentity.make(cert.encode(), public, secret, authority.key.public)
        identity.write(path)
    except (FileExistsError, AuthorityError, MeshKeyError) as exc:
        print(f"lanmesh init: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lanmesh init: cannot write {exc.filename or path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"made mesh {authority.key.fingerprint}: its authority is in {folder} (keep it on this machine only)")
    print(f"this machine is {identity.name} (admin); its own key is in {path} (mode 0600)")
    print("next: start `lanmesh node` here, then `lanmesh invite` for each machine to add (`lanmesh join CODE` there)")
    return 0


# ---------------------------------------------------------------- invite


def _cmd_invite(args: argparse.Namespace) -> int:
    node = default_node(args.node, args.key_file)
    body = {"role": args.role, "expires_s": args.expires, "valid_s": int(args.valid_for)}
    if args.name:
        body["name"] = args.name
    try:
        out = admin_call(node, "invite", body, _security(args), 10.0)
    except (AdminError, MeshKeyError) as exc:
        print(f"lanmesh invite: {exc}", file=sys.stderr)
        return 1
    minutes = args.expires / 60
    who = f" as {out['name']}" if out.get("name") else ""
    print(f"one-time code for a {out['role']}{who}, valid {minutes:g} min; on the new machine run:\n")
    print(f"  lanmesh join {out['code']}\n")
    return 0


# ---------------------------------------------------------------- join


def join(code_text: str, name: str, timeout: float = JOIN_TIMEOUT_S) -> tuple[MemberIdentity, bytes]:
    """Spend an invite: a new key pair here, certified by the authority's node the code names. Returns the
    identity (not yet written) and the mesh's revocation list (b"" if none)."""
    code = InviteCode.parse(code_text)
    public, secret = zmq.curve_keypair()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Whoever answers must hold the key the code names: a stranger at that address cannot complete CURVE.
        sock.setsockopt(zmq.CURVE_SERVERKEY, key_text(code.node_key).encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.connect(f"tcp://{code.address}")
        rid = f"join-{os.getpid()}"
        sock.send(encode(Join(rid, code.token, name)))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0 and sock.poll(int(left * 1000)):
            msg = decode(sock.recv())
            if isinstance(msg, Error) and msg.id == rid:
                raise AuthorityError(f"{code.address} refused: {msg.message}")
            if isinstance(msg, Reply) and msg.id == rid and isinstance(msg.output, dict):
                return _identity_from(msg.output, code, public, secret)
        raise AuthorityError(f"the node at {code.address} did not answer within {timeout:g}s (is it running, and "
                             "reachable from here? the code names that address)")  # fmt: skip
    finally:
        ctx.destroy(0)


def _identity_from(out: dict[str, Any], code: InviteCode, public: bytes, secret: bytes) -> tuple[MemberIdentity, bytes]:
    if out.get("authority") != code.authority:
        raise CertificateError("the node answered for another mesh than the code names; ask for a new code")
    nodes = [KnownNode(str(n[0]), str(n[1]), str(n[2])) for n in out.get("nodes", [])
             if isinstance(n, list) and len(n) == 3]  # fmt: skip
    identity = MemberIdentity.make(bytes(out["certificate"]), public, secret, code.authority, nodes)
    revocations = bytes(out.get("revocations") or b"")
    if revocations:
        RevocationList.decode(revocations, identity.verify_key)  # checked now: a node stores it as its own
    return identity, revocations


def _cmd_join(args: argparse.Namespace) -> int:
    path = Path(args.key_file).expanduser() if args.key_file else default_key_path()
    if path.exists() and not args.force:
        print(f"lanmesh join: {path} exists already (this machine has a key); pass --force to replace it, or "
              "--key-file PATH to write another", file=sys.stderr)  # fmt: skip
        return 1
    try:
        identity, revocations = join(args.code, args.name or default_name())
        identity.write(path, force=args.force)
    except (CertificateError, AuthorityError, MeshKeyError) as exc:
        print(f"lanmesh join: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"lanmesh join: cannot write {exc.filename or path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if revocations and identity.role >= Role.NODE:
        state = NodeConfig(state_dir=args.state_dir or "").state_folder()
        try:
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            (state / "revocations").write_bytes(revocations)
        except OSError as exc:
            print(f"lanmesh join: note: cannot store the revocation list in {state} ({exc}); the node learns it "
                  "from its peers", file=sys.stderr)  # fmt: skip
    print(f"joined mesh {identity.fingerprint} as {identity.name} ({identity.role}); this machine's key is in {path}")
    if identity.role >= Role.NODE:
        print("start `lanmesh node` to serve; it finds the other nodes by mDNS, or through the one that enrolled it")
    else:
        first = identity.nodes[0].address if identity.nodes else "the node that enrolled it"
        print(f"send requests with `lanmesh request` or `lanmesh chat`: they go to {first} and the nodes it knows")
    return 0


# ---------------------------------------------------------------- revoke, members


def _cmd_revoke(args: argparse.Namespace) -> int:
    node = default_node(args.node, args.key_file)
    try:
        out = admin_call(node, "revoke", {"name": args.member}, _security(args), 10.0)
    except (AdminError, MeshKeyError) as exc:
        print(f"lanmesh revoke: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {args.member}: revocation list {out['serial']} ({out['revoked']} keys) is spreading to every node")
    return 0


def _cmd_members(args: argparse.Namespace) -> int:
    node = default_node(args.node, args.key_file)
    try:
        out = admin_call(node, "members", {}, _security(args), 10.0)
    except (AdminError, MeshKeyError) as exc:
        print(f"lanmesh members: {exc}", file=sys.stderr)
        return 1
    rows = [["NAME", "ROLE", "KEY", "EXPIRES", "STATE"]]
    for m in out["members"]:
        expires = time.strftime("%Y-%m-%d", time.localtime(m["not_after"]))
        state = "revoked" if m["revoked"] else ("seen" if m["seen"] else "enrolled")
        rows.append([m["name"], m["role"], m["key"][:12] + "...", expires, state])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"revocation list: {out['revocations']}")
    return 0


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("init", help="start a mesh where every machine has its own key (run once, on the first node)",
                       description="Make the mesh authority (it signs every member's certificate) and this machine's "
                       "own identity (an admin). Then run `lanmesh node` here and `lanmesh invite` for each other "
                       "machine.")  # fmt: skip
    p.add_argument("--name", type=_member_name, default=default_name(), help="this machine's name (its hostname)")
    p.add_argument("--valid-for", dest="valid_for", type=duration, default=duration("365d"),
                   help="how long this machine's certificate lasts (365d)")  # fmt: skip
    p.add_argument("--authority-dir", dest="authority_dir", help="where the authority lives (beside the key file)")
    _key_file_arg(p, "where to write this machine's identity")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("invite", help="a one-time code that lets one more machine join",
                       description="Ask the node holding the mesh authority for a one-time code; `lanmesh join CODE` "
                       "on the new machine enrols it. Needs an admin's identity.")  # fmt: skip
    p.add_argument(
        "--role",
        choices=["client", "node", "admin"],
        default="node",
        help="node: serves and routes; client: sends requests only; admin: also manages the mesh (node)",
    )
    p.add_argument("--expires", type=duration, default=duration("1h"), help="the code works for this long (1h)")
    p.add_argument("--valid-for", dest="valid_for", type=duration, default=duration("365d"),
                   help="how long the new member's certificate lasts (365d)")  # fmt: skip
    p.add_argument(
        "--name",
        type=_member_name,
        help="the name the machine gets (by default it picks one); an enrolled name is taken over",
    )
    p.add_argument("--node", help="the node holding the authority, HOST:PORT (default: this machine's)")
    _key_file_arg(p, "an admin's identity")
    p.set_defaults(func=_cmd_invite)

    p = sub.add_parser("join", help="enrol this machine with a code from `lanmesh invite`",
                       description="Make this machine's own key pair (its secret never leaves it) and get it "
                       "certified by the mesh, using a one-time code from `lanmesh invite`.")  # fmt: skip
    p.add_argument("code", help="the code `lanmesh invite` printed")
    p.add_argument("--name", type=_member_name, help="this machine's name (default: its hostname)")
    p.add_argument("--force", action="store_true", help="replace an existing key file")
    p.add_argument("--state-dir", dest="state_dir", help="a node's state folder (~/.local/state/lanmesh)")
    _key_file_arg(p, "where to write this machine's identity")
    p.set_defaults(func=_cmd_join)

    p = sub.add_parser("revoke", help="end a member's access everywhere (a lost laptop, a retired node)",
                       description="The authority signs a revocation; every node refuses the member's key and "
                       "drops its connections within seconds. Needs an admin's identity.")  # fmt: skip
    p.add_argument("member", type=_member_name, help="the member's name (lanmesh members lists them)")
    p.add_argument("--node", help="the node holding the authority, HOST:PORT (default: this machine's)")
    _key_file_arg(p, "an admin's identity")
    p.set_defaults(func=_cmd_revoke)

    p = sub.add_parser(
        "members",
        help="the mesh's members: names, roles, keys, expiry, revoked",
        description="List the members the node knows (the authority's node: every one enrolled).",
    )
    p.add_argument("--node", help="a node, HOST:PORT (default: this machine's)")
    _key_file_arg(p, "this machine's identity")
    p.set_defaults(func=_cmd_members)


# ---------------------------------------------------------------- lanmesh apikey


def _cmd_apikey(args: argparse.Namespace) -> int:
    from ..api.keys import CallerKeys

    if args.action != "list" and not args.name:
        print(f"lanmesh apikey {args.action}: give the caller's name", file=sys.stderr)
        return 2
    keys = CallerKeys(NodeConfig(state_dir=args.state_dir or "").state_folder())
    try:
        if args.action == "add":
            key = keys.add(args.name)
            print(f"API key for {args.name} (shown once; the node keeps only its hash):\n\n  {key}\n")
            print("send it as `Authorization: Bearer KEY`; a running node takes it within a second")
        elif args.action == "revoke":
            keys.revoke(args.name)
            print(f"revoked the API key of {args.name}: a running node refuses it within a second")
        else:
            for row in keys.listing():
                state = "revoked " + time.strftime("%Y-%m-%d", time.localtime(row["revoked"])) if row.get(
                    "revoked") else "live"  # fmt: skip
                print(f"{row['name']:<24} created {time.strftime('%Y-%m-%d', time.localtime(row['created']))}  {state}")
    except (ValueError, OSError) as exc:
        print(f"lanmesh apikey: {exc}", file=sys.stderr)
        return 1
    return 0


def add_apikey_parser(sub: Any) -> None:
    p = sub.add_parser("apikey", help="the HTTP API's keys, one per caller: add, list, revoke",
                       description="Keys for the node's OpenAI-compatible HTTP API, one per caller (a person, an "
                       "app), kept hashed in the node's state folder; run on the node's machine. The caller's name "
                       "shows in the node's log, metrics and web console.")  # fmt: skip
    p.add_argument("action", choices=["add", "list", "revoke"])
    p.add_argument("name", nargs="?", type=_member_name, help="the caller's name (add, revoke)")
    p.add_argument("--state-dir", dest="state_dir", help="the node's state folder ($STATE_DIRECTORY, else "
                   "~/.local/state/lanmesh)")  # fmt: skip
    p.set_defaults(func=_cmd_apikey)
