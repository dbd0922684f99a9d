"""A `CallTable` on a fake wire, for sans-IO client tests: every frame the table sends is recorded, decoded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import protocol
from mesh import CallTable, NodeDirectory, request_call
from mesh.errors import LanmeshError
from protocol import Cancel, Ping, Request

A, B = "tcp://10.0.0.1:7700", "tcp://10.0.0.2:7700"


class Outcome:
    """Records what the table tells one caller."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.value: Any = None
        self.error: LanmeshError | None = None

    def chunk(self, data: str, node: str) -> None:
        self.chunks.append(data)

    def done(self, value: Any) -> None:
        self.value = value

    def fail(self, exc: LanmeshError) -> None:
        self.error = exc


class Wire:
    """Stands in for the runtime: records every frame sent, decoded, per endpoint (Cancels apart from the rest),
    and the node connections the table asked it to open and close."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Request | Ping]] = []
        self.cancels: list[tuple[str, Cancel]] = []
        self.refuse: set[str] = set()
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.table: CallTable | None = None

    def transmit(self, endpoint: str, frame: bytes) -> bool:
        if endpoint in self.refuse:
            return False
        msg = protocol.decode(frame)
        if isinstance(msg, Cancel):
            self.cancels.append((endpoint, msg))
            return True
        assert isinstance(msg, (Request, Ping))
        self.sent.append((endpoint, msg))
        return True

    def nodes_changed(self) -> None:
        assert self.table is not None
        for opened, ep in self.table.take_node_changes():
            (self.opened if opened else self.closed).append(ep)

    def last(self) -> tuple[str, Any]:  # Any: tests know whether they sent a Request or a Ping
        return self.sent[-1]

    def status_pings(self) -> list[tuple[str, Ping]]:
        return [(ep, msg) for ep, msg in self.sent if isinstance(msg, Ping) and msg.want_status]


def make_table(
    *up: str,
    try_timeout: float | None = None,
    endpoints: Sequence[str] = (A, B),
    directory: NodeDirectory | None = None,
) -> tuple[CallTable, Wire]:
    wire = Wire()
    table = CallTable(
        endpoints, client_id="client-test", transmit=wire.transmit, try_timeout=try_timeout, directory=directory,
        on_nodes_changed=wire.nodes_changed,
    )  # fmt: skip
    wire.table = table
    for ep in up:
        table.node_up(ep, 0.0)
    return table, wire


def start(table: CallTable, model: str = "m", *, stream: bool = False, timeout: float = 10.0, now: float = 0.0):
    out = Outcome()
    call = request_call(
        table.new_key(), out, model, "complete" if stream else "infer", "hello", params=None, timeout=timeout,
        priority=0, require=None, stream=stream, now=now,
    )  # fmt: skip
    table.start(call, now)
    return out


def answer(table: CallTable, endpoint: str, msg: protocol.Message, now: float = 0.0) -> None:
    table.receive(endpoint, protocol.encode(msg), now)
