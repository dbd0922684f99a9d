"""Every message lanmesh puts on the wire, as frozen dataclasses.

The field order of each class is its wire order (see `_encode.py`); new fields
are only ever appended, with a default, so older peers can still decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._errors import ErrorCode


class Task(StrEnum):
    """What a request asks a model to do."""

    CHAT = "chat"  # input: list of {"role": str, "content": str}
    COMPLETE = "complete"  # input: prompt string
    EMBED = "embed"  # input: string or list of strings
    INFER = "infer"  # input: any msgpack value, model-defined


@dataclass(frozen=True, slots=True)
class Request:
    """One unit of inference work.

    `deadline_ms` is the time budget left when the message was sent (not a
    wall-clock time, so clock skew between machines does not matter); every
    hop converts it to a local monotonic deadline and re-stamps what is left.
    `prefix` is output already delivered to the client by a node that failed
    mid-stream: the new node continues after it.
    """

    id: str
    model: str
    task: Task
    input: Any
    params: dict[str, Any] = field(default_factory=dict)
    deadline_ms: int = 60_000
    priority: int = 0
    hops: int = 0
    origin: str = ""
    stream: bool = False
    require: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    # A pipeline try (see Stage): the chain of (node, stage name) that serves it, the receiver first, and the exact
    # tokens a failed chain already generated (the text of which is `prefix`). Sent only when set.
    stages: tuple[tuple[str, str], ...] = ()
    prefix_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """The successful end of a request (or of a stream).

    `node` served it, `route` says why it went there (e.g. `local`,
    `p2c:a<b`, `retry-after:peer-dead`); `queue` is the serving node's queue
    length for that model, which refreshes the sender's load estimate.
    """

    id: str
    output: Any
    node: str
    route: str = ""
    queue: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a streamed reply; `seq` counts from 0 per request."""

    id: str
    seq: int
    data: Any
    node: str
    route: str = ""


@dataclass(frozen=True, slots=True)
class Error:
    """A failed request. `code` is one of the closed set in `ErrorCode`."""

    id: str
    code: ErrorCode
    message: str
    node: str = ""
    queue: int = 0


@dataclass(frozen=True, slots=True)
class Reject:
    """A node declines a request it cannot queue; the sender may try elsewhere."""

    id: str
    node: str
    queue: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop the request `id`: its caller is gone (closed connection, Ctrl-C, its deadline passed) or the try was
    abandoned for another node. It travels like the request (client -> entry -> serving node); nobody answers it.
    Queued work is dropped, running work stops at its next step. Peers older than this message ignore it."""

    id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Admin:
    """An operator's command to one node, authenticated like all traffic (the mesh key): `action` is one of
    models (what it has and serves), load, unload, switch, pull; `args` its arguments. Answered with a Reply whose
    output says what was done, or an Error."""

    id: str
    action: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask a peer for part of a model's files: `length` bytes of `path` from `offset`, of the model `name` at
    `version` (its content hash). An empty `path` asks for the manifest (a JSON list of files, sizes and hashes)."""

    id: str
    name: str
    version: str
    path: str = ""
    offset: int = 0
    length: int = 0


@dataclass(frozen=True, slots=True)
class Data:
    """The bytes a `Fetch` asked for (fewer at the end of a file)."""

    id: str
    node: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """Load of one model on one node: running, waiting, how many may run, and how fast it serves.

    `rate` is the requests per second the node completes when busy, measured (0: not measured yet).
    Capacity counts slots; rate tells a fast node from a slow one with the same number of slots.
    `version` is the content hash of the model's files (hex; "" from older peers), so a request may pin one.
    `tasks` are the tasks it serves (`Task` values: chat, complete, embed, infer), so a picker can offer a chat
    model for chat and an embedding model for embeddings; () from older peers: not known.
    """

    inflight: int
    queued: int
    capacity: int
    rate: float = 0.0
    version: str = ""
    tasks: tuple[str, ...] = ()
    layers: int = 0  # a stage (`name[a-b]`): how many layers the whole model has; 0 for a whole model


@dataclass(frozen=True, slots=True)
class StageWant:
    """A node wants to serve a model it cannot hold whole (see `LoadReport.wants`): of the build `version`, it can
    give a stage `budget` bytes, and runs `speed` times as fast as a one-core node (its cores)."""

    version: str
    budget: int
    speed: float = 1.0


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """How to reach a node: its ROUTER port and its gossip PUB port; in a mesh of member identities also its CURVE
    public key (`key`, Z85 text), which a node connecting there must expect of the server ("" otherwise)."""

    node: str
    host: str
    port: int
    pub_port: int
    key: str = ""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A node's own news: its load, models, labels, whether it is leaving.

    `incarnation` changes on every restart and `seq` grows with every report within one incarnation, so receivers
    can tell a restart from a stale or repeated report, and a report outranks a `Suspicion` of an older one.
    `on_change`: the node reports only when something changed past a threshold and otherwise stays quiet (its
    liveness is probed; membership travels in `Digest`s); older nodes leave it False, report every gossip interval
    and list their live peers in `peers`.

    `prefixes` says, per chat model, what the node's prefix cache holds: the 8-byte digests of the chains of chat
    messages whose keys and values it keeps (`mesh._prefixes`), most recent first, at most PREFIX_REPORT_BYTES in
    all. It is news: a model left out is unchanged since the last report that named it, and b"" means the cache
    holds nothing. `revocations`: the serial of the revocation list the sender holds (member identities; 0: none).
    """

    node: str
    incarnation: int
    seq: int
    addr: PeerAddr
    models: dict[str, ModelLoad] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    peers: tuple[PeerAddr, ...] = ()
    leaving: bool = False
    fingerprint: str = ""
    prefixes: dict[str, bytes] = field(default_factory=dict)
    wants: dict[str, StageWant] = field(default_factory=dict)  # models this node would hold a stage of
    revocations: int = 0  # the serial of the revocation list the sender holds (member identities; 0: none)
    on_change: bool = False


MEMBER_STATES = ("alive", "suspect", "dead", "left")


@dataclass(frozen=True, slots=True)
class Suspicion:
    """`by` says that `node` has gone quiet: suspect, or with `dead`, dead. It names the incarnation and report
    (`seq`) of `node` it last knew, so a newer report of `node` outranks it: `node` refutes it by reporting again.
    Published by the nodes that watch `node`; sent to `node` itself by a node that hears from it while it holds it
    suspect or dead."""

    node: str
    incarnation: int
    seq: int
    by: str
    dead: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    """One entry of a membership digest: a node, the last report of it known (`incarnation`, `seq`) and its
    state (`MEMBER_STATES`)."""

    addr: PeerAddr
    incarnation: int
    seq: int
    state: str = "alive"

    @property
    def node(self) -> str:
        return self.addr.node


@dataclass(frozen=True, slots=True)
class Digest:
    """Anti-entropy between two nodes. Without `members`: the sender's `count` and `checksum` of its membership
    view, to compare; a receiver whose view differs answers with its own `members`. With `members`: the sender's
    whole view, so the receiver learns what it lacks (and the asker answers once with its own, so both do)."""

    node: str
    count: int
    checksum: int
    members: tuple[Member, ...] = ()


@dataclass(frozen=True, slots=True)
class Hello:
    """Sent by a node to a peer it found (seed, mDNS, digest) so the peer learns it too."""

    addr: PeerAddr
    incarnation: int
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Leave:
    """Published by a node that is shutting down: route nothing new to it."""

    node: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Ping:
    """A liveness probe, or (with `want_status`) a request for the node's view of the mesh."""

    id: str
    node: str = ""
    want_status: bool = False


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a `Ping`; `status` lists the nodes the answering node sees."""

    id: str
    node: str
    status: list[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class Stage:
    """Stage-to-stage traffic of a pipeline (a model whose layers several nodes hold). The header of a multi-part
    message: when `shape` is not empty, one more frame follows with the tensor's raw bytes (`dtype`, C order).

    `id` names the sequence (the entry's try id), `model` the receiving stage (`name[a-b]`), `first` the node of the
    pipeline's first stage, which owns the request. Kinds:
    - `run`: the residual stream of positions `start`..`start + len(tokens) - 1`; `tokens` are those positions' token
      ids; `last`: the prompt is complete after them (each later input is one decode step); `due`: the last stage
      chooses a token after them (not while tokens a failed chain generated are replayed, one decode step each, so
      their keys and values are computed as they first were). A sequence's first `run` to a stage also carries the
      `request` (its encoded Request), the chain (`stages`), the key/value tokens it may need (`need`) and what is
      left of its deadline (`deadline_ms`).
    - `token`: from the last stage to the first: `tokens` is the token picked, `data` a map with `text` (a piece to
      stream), `output` and `meta` (the request is done), or `code` and `message` (it failed).
    - `close`: the sequence is over (`data`: why); its keys and values are freed.
    """

    id: str
    model: str
    kind: str
    first: str
    start: int = 0
    tokens: tuple[int, ...] = ()
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    last: bool = False
    request: bytes = b""
    stages: tuple[tuple[str, str], ...] = ()
    need: int = 0
    deadline_ms: int = 0
    data: Any = None
    due: bool = False


@dataclass(frozen=True, slots=True)
class Credentials:
    """A member presents its certificate (the authority-signed bytes) as the first message on a new connection, so
    the node learns who the connection's key is; `revocations` is the serial of the revocation list it holds. With
    `reply` (a node linking to a peer) the node answers with its own. Only in a mesh of member identities."""

    cert: bytes
    revocations: int = 0
    reply: bool = False


@dataclass(frozen=True, slots=True)
class Join:
    """Spend a one-time invite `token`: the authority node signs a certificate for the key this connection was
    made with, named `name` unless the invite names it. Answered with a Reply (the certificate, the revocation
    list, the nodes the authority knows) or an Error."""

    id: str
    token: bytes
    name: str = ""


@dataclass(frozen=True, slots=True)
class Revocations:
    """The mesh authority's signed revocation list, spread node to node; a higher serial replaces a lower one."""

    document: bytes


Message = (
    Request
    | Reply
    | Chunk
    | Error
    | Reject
    | LoadReport
    | Hello
    | Leave
    | Ping
    | Pong
    | Cancel
    | Admin
    | Fetch
    | Data
    | Suspicion
    | Digest
    | Stage
    | Credentials
    | Join
    | Revocations
)

__all__ = [
    "Admin",
    "Cancel",
    "Credentials",
    "Chunk",
    "Data",
    "Digest",
    "Error",
    "ErrorCode",
    "Fetch",
    "Hello",
    "Join",
    "Leave",
    "LoadReport",
    "MEMBER_STATES",
    "Member",
    "Message",
    "ModelLoad",
    "PeerAddr",
    "Ping",
    "Pong",
    "Reject",
    "Reply",
    "Request",
    "Suspicion",
    "Stage",
    "StageWant",
    "Revocations",
    "Task",
]
