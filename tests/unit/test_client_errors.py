"""The client's error types and its failover decisions, driven without sockets through `CallTable`."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from fake_wire import A, B, Outcome, answer, make_table, start

import protocol
from mesh import Call, Client, PingReply, Result, parse_endpoints, request_call
from mesh.errors import (
    BadRequest,
    DeadlineExceeded,
    InternalError,
    LanmeshError,
    MeshUnavailable,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    Unauthorized,
    error_from_wire,
)
from protocol import Chunk, Error, ErrorCode, Ping, Pong, Reject, Reply, Request

# ----------------------------------------------------------------- error types

EXPECTED = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.UNKNOWN_MODEL: ModelNotFound,
    ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorCode.UNAVAILABLE: MeshUnavailable,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.INTERNAL: InternalError,
}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_wire_error_code_becomes_its_own_exception_type(code: ErrorCode) -> None:
    exc = error_from_wire(Error("r1", code, "it broke", "node-7", 12))
    assert type(exc) is EXPECTED[code]
    assert isinstance(exc, LanmeshError)
    assert exc.code is code
    assert exc.node == "node-7"
    assert "it broke" in str(exc) and "node-7" in str(exc)


def test_overloaded_carries_the_queue_length_the_node_reported() -> None:
    exc = error_from_wire(Error("r1", ErrorCode.OVERLOADED, "full", "n", 42))
    assert isinstance(exc, Overloaded) and exc.queue == 42


def test_errors_survive_pickling_with_node_code_and_queue() -> None:
    exc = pickle.loads(pickle.dumps(Overloaded("full", node="n1", queue=5)))
    assert type(exc) is Overloaded
    assert (exc.node, exc.queue, exc.code, exc.message) == ("n1", 5, ErrorCode.OVERLOADED, "full")
    assert pickle.loads(pickle.dumps(ProtocolError("bad frame"))).code is None


# ----------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "garbage",
    ["", "localhost", "host:", ":7700", "host:0", "host:70000", "host:77x", "udp://h:1", "ho st:1", "[::1]7700",
     "a:1,", 42, [1, 2], b"h:1"],
)  # fmt: skip
def test_garbage_node_addresses_are_refused_with_a_clear_value_error(garbage: Any) -> None:
    with pytest.raises(ValueError, match="node|nodes"):
        parse_endpoints(garbage)


def test_node_addresses_are_normalised_to_tcp_endpoints() -> None:
    assert parse_endpoints("127.0.0.1:7700") == ("tcp://127.0.0.1:7700",)
    assert parse_endpoints("tcp://box.local:7700") == ("tcp://box.local:7700",)
    assert parse_endpoints("[::1]:7700") == ("tcp://[::1]:7700",)
    assert parse_endpoints("a:1, b:2,a:1") == ("tcp://a:1", "tcp://b:2")
    assert parse_endpoints(["a:1", "tcp://b:2"]) == ("tcp://a:1", "tcp://b:2")


# ----------------------------------------------------------------- answers a retry cannot fix


@pytest.mark.parametrize(
    "code",
    [ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_MODEL, ErrorCode.UNAUTHORIZED, ErrorCode.INTERNAL,
     ErrorCode.DEADLINE_EXCEEDED],
)  # fmt: skip
def test_errors_a_retry_cannot_fix_are_raised_at_once_without_a_second_try(code: ErrorCode) -> None:
    table, wire = make_table(A, B)
    out = start(table)
    ep, req = wire.last()
    answer(table, ep, Error(req.id, code, "no", "n1"))
    assert type(out.error) is EXPECTED[code]
    assert len(wire.sent) == 1
    assert table.pending == 0


@pytest.mark.parametrize("code", list(ErrorCode))
def test_a_second_try_is_sent_exactly_for_the_codes_protocol_calls_retryable(code: ErrorCode) -> None:
    table, wire = make_table(A, B)
    out = start(table)
    ep, req = wire.last()
    answer(table, ep, Error(req.id, code, "no", "n1"), now=0.0)
    table.expire(1.0)  # past any backoff
    assert (len(wire.sent) == 2) == (code in protocol.RETRYABLE)
    assert code is not ErrorCode.INTERNAL or type(out.error) is InternalError, "a model failure is not retried"


def test_unavailable_answer_is_retried_on_another_node() -> None:
    table, wire = make_table(A, B)
    out = start(table)
    first_ep, first = wire.last()
    answer(table, first_ep, Error(first.id, ErrorCode.UNAVAILABLE, "shutting down", "n1"))
    second_ep, second = wire.last()
    assert second_ep != first_ep and second.id != first.id
    answer(table, second_ep, Reply(second.id, "ok", "n2"))
    assert out.error is None
    assert out.value.output == "ok" and out.value.tries == 2


def test_rejected_request_moves_to_another_node_after_a_short_backoff() -> None:
    table, wire = make_table(A, B)
    out = start(table)
    first_ep, first = wire.last()
    answer(table, first_ep, Reject(first.id, "n1", 9, "queue full"), now=1.0)
    assert len(wire.sent) == 1, "a refused request waits a moment before the next try"
    wake = table.next_wake()
    assert wake is not None and 1.0 < wake <= 1.2
    table.expire(wake)
    second_ep, second = wire.last()
    assert second_ep != first_ep and second.id != first.id
    assert second.deadline_ms < first.deadline_ms, "the deadline is re-stamped with what is left"
    answer(table, second_ep, Reply(second.id, "ok", "n2"))
    assert out.value.node == "n2"


def test_reject_from_the_only_node_raises_overloaded_with_its_queue() -> None:
    table, wire = make_table(A)
    out = start(table)
    ep, req = wire.last()
    answer(table, ep, Reject(req.id, "n1", 9, "queue full"))
    assert isinstance(out.error, Overloaded) and out.error.queue == 9
    assert len(wire.sent) == 1


def test_overloaded_when_every_connected_node_refused() -> None:
    table, wire = make_table(A, B)
    out = start(table)
    ep, req = wire.last()
    answer(table, ep, Error(req.id, ErrorCode.OVERLOADED, "full", "n1", 3), now=0.0)
    table.expire(1.0)
    ep, req = wire.last()
    answer(table, ep, Reject(req.id, "n2", 4), now=1.0)
    assert isinstance(out.error, Overloaded)
    assert len(wire.sent) == 2


# ----------------------------------------------------------------- failover


def test_requests_on_a_dropped_node_are_resent_elsewhere_with_new_ids_and_restamped_deadlines() -> None:
    table, wire = make_table(A, B)
    outs = [start(table) for _ in range(4)]
    on_a = {req.id: req for ep, req in wire.sent if ep == A}
    assert len(on_a) == 2
    table.node_down(A, now=2.0)
    resent = wire.sent[4:]
    assert len(resent) == 2 and all(ep == B for ep, _ in resent)
    assert not {req.id for _, req in resent} & set(on_a)
    assert all(isinstance(req, Request) and req.deadline_ms == 8000 for _, req in resent)
    for ep, req in wire.sent:
        if ep == B:
            answer(table, B, Reply(req.id, req.id, "n2"))
    assert all(o.value is not None and o.error is None for o in outs)


def test_late_reply_from_an_abandoned_try_is_ignored() -> None:
    table, wire = make_table(A, B)
    out = start(table)
    old_ep, old = wire.last()
    table.node_down(old_ep, 0.5)
    new_ep, new = wire.last()
    answer(table, old_ep, Reply(old.id, "stale", "n1"))
    assert table.stale_replies == 1 and table.pending == 1
    answer(table, new_ep, Reply(new.id, "fresh", "n2"))
    assert out.value.output == "fresh"


def test_request_waits_for_a_node_then_goes_out_when_one_connects() -> None:
    table, wire = make_table()
    out = start(table, timeout=5.0)
    assert not wire.sent
    table.node_up(B, now=1.5)
    ep, req = wire.last()
    assert ep == B and req.deadline_ms == 3500 and req.origin == "client-test"
    answer(table, B, Reply(req.id, 1, "n2"))
    assert out.value.output == 1


def test_no_node_by_the_deadline_raises_mesh_unavailable() -> None:
    table, wire = make_table()
    out = start(table, timeout=2.0)
    table.expire(2.0)
    assert isinstance(out.error, MeshUnavailable)
    assert A in str(out.error)


def test_deadline_while_in_flight_raises_deadline_exceeded() -> None:
    table, wire = make_table(A)
    out = start(table, timeout=2.0)
    table.expire(1.9)
    assert out.error is None
    table.expire(2.0)
    assert isinstance(out.error, DeadlineExceeded)
    answer(table, A, Reply(wire.last()[1].id, "too late", "n1"))
    assert out.value is None


def test_per_try_timeout_resends_to_another_node() -> None:
    table, wire = make_table(A, B, try_timeout=0.5)
    out = start(table)
    first_ep, _ = wire.last()
    table.expire(0.5)
    second_ep, second = wire.last()
    assert second_ep != first_ep
    answer(table, second_ep, Reply(second.id, "ok", "n2"))
    assert out.value.tries == 2


def test_send_refused_by_the_socket_is_retried_shortly() -> None:
    table, wire = make_table(A)
    wire.refuse.add(A)
    out = start(table)
    assert not wire.sent
    wire.refuse.clear()
    wake = table.next_wake()
    assert wake is not None and wake < 0.01
    table.expire(wake)
    assert len(wire.sent) == 1 and out.error is None


# ----------------------------------------------------------------- streams


def test_stream_failover_sends_text_so_far_as_prefix_and_caller_sees_only_new_text() -> None:
    table, wire = make_table(A, B)
    out = start(table, stream=True)
    ep1, r1 = wire.last()
    for i, word in enumerate(["Hello", " wor"]):
        answer(table, ep1, Chunk(r1.id, i, word, "n1"))
    table.node_down(ep1, 0.1)
    ep2, r2 = wire.last()
    assert ep2 != ep1 and r2.prefix == "Hello wor" and r2.stream
    answer(table, ep1, Chunk(r1.id, 2, "LATE", "n1"))  # the dead try's leftovers are not shown
    answer(table, ep2, Chunk(r2.id, 0, "ld", "n2"))
    answer(table, ep2, Chunk(r2.id, 1, "!", "n2"))
    answer(table, ep2, Reply(r2.id, "Hello world!", "n2"))
    assert out.chunks == ["Hello", " wor", "ld", "!"]
    assert out.value.output == "Hello world!" and out.value.tries == 2


def test_duplicate_chunks_in_a_try_are_ignored() -> None:
    table, wire = make_table(A)
    out = start(table, stream=True)
    ep, req = wire.last()
    for seq, data in [(0, "a"), (0, "a"), (1, "b"), (1, "b")]:
        answer(table, ep, Chunk(req.id, seq, data, "n1"))
    answer(table, ep, Reply(req.id, "ab", "n1"))
    assert out.chunks == ["a", "b"] and out.value.output == "ab"


def test_text_a_node_put_only_in_its_final_reply_still_reaches_the_stream() -> None:
    table, wire = make_table(A)
    out = start(table, stream=True)
    ep, req = wire.last()
    answer(table, ep, Chunk(req.id, 0, "ab", "n1"))
    answer(table, ep, Reply(req.id, {"role": "assistant", "content": "abcd"}, "n1"))
    assert out.chunks == ["ab", "cd"] and out.value.text == "abcd"


# ----------------------------------------------------------------- bad replies


def test_undecodable_reply_for_a_request_raises_protocol_error() -> None:
    table, wire = make_table(A)
    out = start(table)
    ep, req = wire.last()
    bad = bytes([protocol.VERSION]) + __import__("msgpack").packb([2, req.id, "x", "n1", "", 0, "not-a-map"])
    table.receive(ep, bad, 0.0)
    assert isinstance(out.error, ProtocolError) and out.error.code is None


def test_frames_no_request_can_claim_are_counted_and_do_not_disturb_others() -> None:
    table, wire = make_table(A)
    out = start(table)
    table.receive(A, b"\x01\xc1", 0.0)
    answer(table, A, Ping("p", "peer"))
    assert table.protocol_errors == 2 and out.error is None and table.pending == 1


def test_unencodable_input_is_a_bad_request() -> None:
    table, wire = make_table(A)
    out = Outcome()
    call = request_call(
        table.new_key(), out, "m", "infer", object(), params=None, timeout=1.0, priority=0, require=None,
        stream=False, now=0.0,
    )  # fmt: skip
    table.start(call, 0.0)
    assert isinstance(out.error, BadRequest) and table.pending == 0


def test_ping_is_answered_with_the_pong_and_round_trip() -> None:
    table, wire = make_table(A)
    out = Outcome()
    table.start(Call(table.new_key(), "status", 1.0, 1.0, out), 0.0)
    ep, ping = wire.last()
    assert isinstance(ping, Ping) and ping.want_status
    answer(table, ep, Pong(ping.id, "n1", [{"node": "n1"}]), now=0.25)
    assert isinstance(out.value, PingReply) and out.value.rtt == 0.25 and out.value.pong.status == [{"node": "n1"}]


def test_bad_call_arguments_are_refused_before_anything_is_sent() -> None:
    for task, timeout, priority in (("infer", 1.0, 12), ("infer", 0.0, 0), ("dance", 1.0, 0)):
        with pytest.raises(ValueError):
            request_call(
                1, Outcome(), "m", task, "x", params=None, timeout=timeout, priority=priority, require=None,
                stream=False, now=0.0,
            )  # fmt: skip


# ----------------------------------------------------------------- results and discovery


def test_result_text_reads_the_common_output_shapes() -> None:
    def result(output: Any) -> Result:
        return Result(output, "n", "local", {"usage": {"total_tokens": 3}}, "id")

    assert result("hi").text == "hi"
    assert result({"role": "assistant", "content": "hi"}).text == "hi"
    assert result({"message": {"role": "assistant", "content": "hi"}}).text == "hi"
    assert result("hi").usage == {"total_tokens": 3}
    with pytest.raises(TypeError, match="no text"):
        _ = result([[0.1, 0.2]]).text


def test_discover_raises_mesh_unavailable_when_no_node_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from mesh import discovery

    monkeypatch.setattr(discovery, "browse", lambda timeout, interfaces: [])
    with pytest.raises(MeshUnavailable, match=r"no lanmesh node answered mDNS within 0.5s"):
        Client.discover(timeout=0.5)
