"""Operators' commands (`Admin`) answered on a node's worker threads: every answer settles its place in the pool's
bound, even one that cannot be put on the wire. A real MeshNode on 127.0.0.1, a raw DEALER as the operator."""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from mesh import MeshNode, MeshSettings
from nodes.models.backends.synthetic import EchoBackend
from nodes.runtime.executor import Executor
from protocol import Admin, Error, ErrorCode, Fetch, Reply, decode, encode

pytestmark = pytest.mark.timeout(60)


def test_admin_answers_that_cannot_be_encoded_are_counted_and_never_exhaust_the_pool() -> None:
    executor = Executor([EchoBackend()])
    executor.start()
    node = MeshNode(executor, MeshSettings("ops", bind="127.0.0.1", port=0, mdns=False))

    def handler(msg: Admin | Fetch) -> Any:
        if isinstance(msg, Admin) and msg.args.get("break"):
            return Reply(msg.id, {"files": {object()}}, "ops")  # msgpack cannot put a set of objects on the wire
        return Reply(msg.id, {"ok": True}, "ops")

    node.services.handler = handler
    node.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{node.addr.port}")

    def ask(rid: str, **args: Any) -> Any:
        sock.send(encode(Admin(rid, "models", args)))
        assert sock.poll(10_000), f"no answer to {rid}"
        return decode(sock.recv())

    try:
        # More than the 16 Admin requests a node holds at once, one after another: each one's answer fails to encode.
        for i in range(40):
            answer = ask(f"bad-{i}", **{"break": True})
            assert isinstance(answer, Error) and answer.code is ErrorCode.INTERNAL, answer
            assert answer.id == f"bad-{i}" and "could not be sent" in answer.message, answer.message
        answer = ask("good")
        assert isinstance(answer, Reply) and answer.output == {"ok": True}, f"the node refuses operators: {answer}"
    finally:
        sock.close(0)
        ctx.term()
        node.stop()
        executor.stop(1.0)
