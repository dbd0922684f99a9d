"""A mesh authority for tests: enrols members (node, client, admin) straight into identity files, as `lanmesh init`
and `lanmesh join` would leave them, and the rogue that tests aim at a mesh."""

from __future__ import annotations

from pathlib import Path

import zmq

from mesh import Authority, KnownNode, MemberIdentity, Role, load_key


class TestAuthority:
    __test__ = False  # not a test class: pytest must not collect it

    """An authority in `folder`/authority; `enrol` writes `folder`/NAME/mesh.key (mode 0600)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.authority = Authority.create(folder / "authority")

    def enrol(self, name: str, role: Role = Role.NODE, valid_s: int = 86_400, nodes: list[KnownNode] | None = None,
              replace: bool = False) -> Path:  # fmt: skip
        public, secret = zmq.curve_keypair()
        cert = self.authority.issue(name, zmq.utils.z85.decode(public), role, valid_s, replace=replace)
        path = self.folder / name / "mesh.key"
        MemberIdentity.make(cert.encode(), public, secret, self.authority.key.public, nodes or []).write(path)
        return path

    def identity(self, name: str) -> MemberIdentity:
        key = load_key(self.folder / name / "mesh.key")
        assert isinstance(key, MemberIdentity)
        return key

    def known(self, name: str, address: str) -> KnownNode:
        """How another member finds the node `name` running at `address`."""
        return KnownNode(name, address, self.identity(name).key_text)

    def state(self, name: str) -> Path:
        return self.folder / name / "state"


# A member holding a *client* key that poses as a node: it binds a ROUTER and a PUB with its own key, answers a
# node's certificate and hello with its own (a client's) and publishes load reports that would draw every request
# to it. argv: key file, its host, router port, the model to lure, how many seconds to run.
ROGUE = """
import sys, time, zmq
from mesh import load_key
from protocol import Credentials, Hello, LoadReport, ModelLoad, PeerAddr, Reply, Request, decode, encode
key = load_key(sys.argv[1])
host, port, model, seconds = sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
ctx = zmq.Context()
router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
for s in (router, pub):
    s.setsockopt(zmq.CURVE_SERVER, 1)
    s.setsockopt(zmq.CURVE_PUBLICKEY, key.public)
    s.setsockopt(zmq.CURVE_SECRETKEY, key.secret)
router.bind(f"tcp://{host}:{port}")
pub.bind(f"tcp://{host}:{port + 1}")
me = PeerAddr(key.name, host, port, port + 1, key.key_text)
print("ready", flush=True)
served = 0
end = time.monotonic() + seconds
seq = 0
while time.monotonic() < end:
    if router.poll(50):
        ident, frame = router.recv_multipart()
        msg = decode(frame)
        if isinstance(msg, Credentials):
            router.send_multipart([ident, key.certificate_frame()])
        elif isinstance(msg, Hello):
            router.send_multipart([ident, encode(Hello(me, 1, key.fingerprint))])
        elif isinstance(msg, Request):
            served += 1
            router.send_multipart([ident, encode(Reply(msg.id, "rogue answer", key.name))])
    seq += 1
    pub.send(encode(LoadReport(key.name, 1, seq, me, {model: ModelLoad(0, 0, 10_000, 1e6)}, {}, (), False,
                               key.fingerprint)))
print("served", served, flush=True)
"""
