"""When a call ends without an answer, the client tells the node running its try to stop (a `Cancel`), and never
when the node has answered already. Driven without sockets through `CallTable`."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fake_wire import A, B, Outcome, answer, make_table, start

from mesh import Call
from mesh.errors import DeadlineExceeded, MeshUnavailable, ProtocolError
from protocol import Chunk, Error, ErrorCode, Reject, Reply


def test_a_cancelled_call_sends_cancel_with_its_live_try_id_to_the_node_carrying_it() -> None:
    table, wire = make_table(A, B)
    start(table)
    out = start(table)
    ep, req = wire.last()
    table.cancel(2, "cancelled")
    assert [(c_ep, c.id, c.reason) for c_ep, c in wire.cancels] == [(ep, req.id, "cancelled")]
    assert table.pending == 1 and out.value is None and out.error is None
    answer(table, ep, Reply(req.id, "late", "n1"))
    assert out.value is None and table.stale_replies == 1


def test_a_passed_deadline_cancels_the_try_on_its_node() -> None:
    table, wire = make_table(A)
    out = start(table, timeout=2.0)
    ep, req = wire.last()
    table.expire(2.0)
    assert isinstance(out.error, DeadlineExceeded)
    assert [(c_ep, c.id, c.reason) for c_ep, c in wire.cancels] == [(A, req.id, "deadline")]


def test_a_call_that_never_reached_a_node_has_nothing_to_cancel() -> None:
    table, wire = make_table()
    out = start(table, timeout=2.0)
    table.expire(2.0)
    assert isinstance(out.error, MeshUnavailable) and not wire.cancels


def test_a_try_abandoned_at_the_try_timeout_is_cancelled_before_the_request_goes_elsewhere() -> None:
    table, wire = make_table(A, B, try_timeout=0.5)
    out = start(table)
    first_ep, first = wire.last()
    table.expire(0.5)
    second_ep, second = wire.last()
    assert second_ep != first_ep
    assert [(ep, c.id, c.reason) for ep, c in wire.cancels] == [(first_ep, first.id, "try timeout")]
    answer(table, second_ep, Reply(second.id, "ok", "n2"))
    assert out.value.output == "ok" and len(wire.cancels) == 1


def test_closing_cancels_every_live_try_on_its_own_node() -> None:
    table, wire = make_table(A, B)
    outs = [start(table) for _ in range(4)]
    table.fail_all(MeshUnavailable("client closed"))
    assert all(isinstance(o.error, MeshUnavailable) for o in outs)
    sent = {(ep, req.id) for ep, req in wire.sent}
    assert {(ep, c.id) for ep, c in wire.cancels} == sent
    assert {c.reason for _, c in wire.cancels} == {"client closed"}


@pytest.mark.parametrize(
    "reply",
    [
        Reply("", "ok", "n1"),
        Error("", ErrorCode.BAD_REQUEST, "no", "n1"),
        Error("", ErrorCode.INTERNAL, "model failed", "n1"),
        Error("", ErrorCode.UNAVAILABLE, "leaving", "n1"),
        Error("", ErrorCode.OVERLOADED, "full", "n1"),
        Reject("", "n1", 3),
    ],
    ids=lambda r: type(r).__name__ + (f"-{r.code.name}" if isinstance(r, Error) else ""),
)
def test_a_try_its_node_answered_is_never_cancelled(reply: Reply | Error | Reject) -> None:
    table, wire = make_table(A, B)
    start(table)
    ep, req = wire.last()
    answer(table, ep, replace(reply, id=req.id))
    table.expire(1.0)  # past any backoff: a refused call is re-sent
    table.cancel(1)  # and then given up: only a re-sent try is still running anywhere
    assert [c.id for _, c in wire.cancels] == [r.id for _, r in wire.sent[1:]]


def test_a_stream_cut_short_by_a_bad_chunk_is_cancelled_on_its_node() -> None:
    table, wire = make_table(A)
    out = start(table, stream=True)
    ep, req = wire.last()
    answer(table, ep, Chunk(req.id, 0, {"not": "text"}, "n1"))
    assert isinstance(out.error, ProtocolError)
    assert [(c_ep, c.id) for c_ep, c in wire.cancels] == [(A, req.id)]


def test_tries_on_a_node_that_dropped_are_cancelled_when_it_comes_back() -> None:
    # A hung node (caught by heartbeats) resumes its work when it wakes; the client re-sent that work elsewhere.
    table, wire = make_table(A)
    short, long = start(table, timeout=2.0), start(table, timeout=30.0)
    on_a = [req.id for _, req in wire.sent]
    table.node_up(B, 0.5)
    table.node_down(A, 1.0)
    assert [ep for ep, _ in wire.sent[2:]] == [B, B], "both re-sent to B"
    assert not wire.cancels, "no connection to send them on"
    assert short.error is None and long.error is None
    table.node_up(A, 5.0)  # the 2 s call's deadline has passed: its node dropped that work itself
    assert [(ep, c.id, c.reason) for ep, c in wire.cancels] == [(A, on_a[1], "node lost")]


def test_a_cancel_the_socket_cannot_take_now_is_sent_when_the_node_is_back() -> None:
    table, wire = make_table(A)
    start(table)
    _, req = wire.last()
    wire.refuse.add(A)
    table.cancel(1)
    assert not wire.cancels
    wire.refuse.clear()
    table.node_down(A, 1.0)
    table.node_up(A, 2.0)
    assert [c.id for _, c in wire.cancels] == [req.id]


def test_pings_and_status_calls_are_never_cancelled() -> None:
    table, wire = make_table(A)
    for kind in ("ping", "status"):
        call = Call(table.new_key(), kind, 1.0, 1.0, Outcome())
        table.start(call, 0.0)
        table.cancel(call.key)
    assert len(wire.sent) == 2 and not wire.cancels
