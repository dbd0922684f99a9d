"""lanmesh's distributed layer. The public surface: the client library, and the node's mesh loop.

from mesh import Client
with Client("192.168.1.20:5555") as client:
    print(client.chat("smollm2", [{"role": "user", "content": "Hi"}]).text)
"""

from ._aclient import AsyncClient, AsyncStream
from ._client import Client, Result, Stream
from ._failure import FailureDetector, PeerState
from ._node import MeshNode
from ._routing import Choice, RoutingPolicy
from ._security import MeshKey, MeshKeyError, Plaintext
from ._settings import LocalServer, MeshSettings
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

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "BadRequest",
    "Choice",
    "Client",
    "DeadlineExceeded",
    "FailureDetector",
    "InternalError",
    "LanmeshError",
    "LocalServer",
    "MeshKey",
    "MeshKeyError",
    "MeshNode",
    "MeshSettings",
    "MeshUnavailable",
    "ModelNotFound",
    "Overloaded",
    "PeerState",
    "Plaintext",
    "ProtocolError",
    "Result",
    "RoutingPolicy",
    "Stream",
    "Unauthorized",
]
