"""lanmesh's distributed layer, and its one public face: nothing outside `mesh/` imports a `mesh._*` module
(`tests/unit/test_layout.py` checks it).

    from mesh import Client
    with Client("192.168.1.20:5555") as client:
        print(client.chat("smollm2", [{"role": "user", "content": "Hi"}]).text)

What lives where (private modules, free to move behind this face):

- clients: `Client` (`_client.py`, over `_client_io.py`), `AsyncClient` (`_aclient.py`); both feed the sans-IO
  `CallTable` (`_calls.py`: retries, fail-over, cancels, learning the mesh), `NodeDirectory` (`_directory.py`)
- a node's mesh layer: `MeshNode` (`_node.py`: the socket loop, where a request enters and is answered),
  `EntryTable` (`_entry.py`: the entry's tries, retries and fail-over), `RoutingPolicy` and `CacheAwarePolicy`
  (`_routing.py`; the chains of chat messages they compare and the gossiped summaries: `_prefixes.py`),
  `FailureDetector` (`_failure.py`), `Gossip` (`_gossip.py`: what a node tells whom, over the `MemberView` of
  `_view.py`), `Membership` (`_membership.py`: gossip on the node's sockets), `PeerLinks` (`_links.py`: the
  DEALER per peer that forwards requests), `Discovery` (`_discovery.py`: mDNS)
- security: `MeshKey`, CURVE and the ZAP `Authenticator` (`_security.py`); member identities: certificates
  (`_certs.py`), the authority (`_authority.py`), a node's book of members (`_members.py`), a member's identity
  file (`_identity.py`), finding a machine's key (`_keyfiles.py`)
- errors: `mesh.errors` (one exception per wire error code)

The mDNS names (`Discovery`, `browse`, `discovery`, ...) load zeroconf on first use, so a client that is given
addresses imports none of it.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._aclient import AsyncClient, AsyncStream
from ._authority import AUTHORITY_DIR, Authority, AuthorityError
from ._backoff import HELLO, backoff_schedules
from ._call import Call, request_call
from ._calls import CallTable
from ._certs import AuthorityKey, Certificate, CertificateError, InviteCode, RevocationList, Role, key_text
from ._client import Client, Stream
from ._dealers import connect_dealer
from ._directory import NodeDirectory
from ._endpoints import parse_endpoints
from ._entry import EntryTable, PendingState
from ._failure import FORGOTTEN, INCARNATION_AHEAD_S, FailureDetector, PeerState, Transition
from ._gossip import Gossip, GossipHost, GossipSettings
from ._identity import KnownNode, MemberIdentity
from ._keyfiles import MeshSecurity, client_security, default_key_path, key_path, load_key, load_mesh_key
from ._members import Members, role_needed
from ._news import ReportNews
from ._node import MeshNode
from ._pipeline import StageHolder, compose_chain, holders_of
from ._prefixes import (
    SUMMARY_BYTES,
    bound_summaries,
    chat_chain,
    next_link,
    pack_summary,
    request_chain,
    summary_news,
    unpack_summary,
)
from ._results import PingReply, Result
from ._routing import POLICIES, CacheAwarePolicy, Choice, RoutingPolicy
from ._security import (
    INSECURE_ENV,
    KEY_ENV,
    Authenticator,
    CurveUnavailable,
    MeshKey,
    MeshKeyError,
    Plaintext,
    RejectionLog,
    RequestLimits,
    fingerprint_of,
    handshake_failure,
    judge_member_zap,
    judge_zap,
    require_curve,
    same_host,
    zap_reply,
)
from ._settings import LocalServer, MeshSettings, RequestObserver
from ._sockets import SocketPoller
from ._view import MemberView, outranks, ring_key
from ._watchdog import LoopWatchdog
from .errors import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    LanmeshError,
    MeshUnavailable,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    Unauthorized,
)

# Loaded on first use (zeroconf): name -> attribute of mesh._discovery ("" = the module itself).
_DISCOVERY = {
    "discovery": "",
    "Announcement": "Announcement",
    "Discovery": "Discovery",
    "SERVICE_TYPE": "SERVICE_TYPE",
    "browse": "browse",
    "instance_name": "instance_name",
    "parse_txt": "parse_txt",
    "txt_for": "txt_for",
}


def __getattr__(name: str) -> Any:
    if name in _DISCOVERY:
        module = importlib.import_module("._discovery", __name__)
        return getattr(module, _DISCOVERY[name]) if _DISCOVERY[name] else module
    raise AttributeError(f"module 'mesh' has no attribute {name!r}")


__all__ = [
    "StageHolder",
    "compose_chain",
    "holders_of",
    # clients
    "AsyncClient",
    "AsyncStream",
    "Client",
    "PingReply",
    "Result",
    "Stream",
    "connect_dealer",
    "parse_endpoints",
    # errors
    "BadRequest",
    "DeadlineExceeded",
    "InternalError",
    "LanmeshError",
    "MeshUnavailable",
    "ModelNotFound",
    "Overloaded",
    "ProtocolError",
    "Unauthorized",
    # security
    "AUTHORITY_DIR",
    "Authority",
    "AuthorityError",
    "AuthorityKey",
    "Certificate",
    "CertificateError",
    "InviteCode",
    "KnownNode",
    "MemberIdentity",
    "Members",
    "role_needed",
    "MeshSecurity",
    "RevocationList",
    "Role",
    "key_text",
    "INSECURE_ENV",
    "KEY_ENV",
    "Authenticator",
    "CurveUnavailable",
    "MeshKey",
    "MeshKeyError",
    "Plaintext",
    "RejectionLog",
    "RequestLimits",
    "client_security",
    "default_key_path",
    "fingerprint_of",
    "handshake_failure",
    "judge_member_zap",
    "judge_zap",
    "key_path",
    "load_key",
    "load_mesh_key",
    "require_curve",
    "same_host",
    "zap_reply",
    # a node's mesh layer
    "LocalServer",
    "LoopWatchdog",
    "MeshNode",
    "MeshSettings",
    "RequestObserver",
    "SocketPoller",
    # the pure policies (fed with observations and `now`; no sockets): for tests and simulations
    "FORGOTTEN",
    "INCARNATION_AHEAD_S",
    "POLICIES",
    "Gossip",
    "GossipHost",
    "GossipSettings",
    "MemberView",
    "ReportNews",
    "outranks",
    "ring_key",
    "Call",
    "CallTable",
    "Choice",
    "EntryTable",
    "FailureDetector",
    "NodeDirectory",
    "PeerState",
    "PendingState",
    "CacheAwarePolicy",
    "RoutingPolicy",
    "Transition",
    "backoff_schedules",
    "HELLO",
    "request_call",
    # what a node's prefix cache holds, as entries know it (chains of chat messages, gossiped summaries)
    "SUMMARY_BYTES",
    "bound_summaries",
    "chat_chain",
    "next_link",
    "pack_summary",
    "request_chain",
    "summary_news",
    "unpack_summary",
    # mDNS (loaded on first use)
    "Announcement",
    "Discovery",
    "SERVICE_TYPE",
    "browse",
    "discovery",
    "instance_name",
    "parse_txt",
    "txt_for",
]
