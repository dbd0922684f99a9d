"""The entry node's state machine, as a specification, with a fake clock and no sockets: long requests, refusals,
peers that die mid-stream, late and duplicate answers, cancels and deadlines."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from mesh import EntryTable, RoutingPolicy
from protocol import Cancel, Chunk, Error, ErrorCode, Reject, Reply, Request, Task, decode, encode

MODEL = "chat"
CLIENT = b"client-1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Host:
    """A node as the entry table sees it: who serves the model, and everything it was told to send."""

    clock: FakeClock
    node_id: str = "entry"
    alive: list[str] = field(default_factory=lambda: ["b", "c"])
    serves_here: bool = False
    here_full: bool = False
    unreachable: set[str] = field(default_factory=set)
    to_peers: list[tuple[str, Request | Cancel]] = field(default_factory=list)
    to_client: list[Reply | Chunk | Error] = field(default_factory=list)
    served_here: list[Request] = field(default_factory=list)
    outcomes: list[tuple[str, float]] = field(default_factory=list)

    def eligible(self, request: Request, excluded: set[str]) -> tuple[list[str], bool]:
        nodes = [n for n in self.alive if n not in excluded]
        if self.serves_here and self.node_id not in excluded:
            nodes.append(self.node_id)
        return nodes, bool(self.alive) or self.serves_here

    def servers(self, model: str) -> list[str]:
        return list(self.alive)

    def serve_here(
        self, client: bytes, request: Request, deadline: float, route: str, seq0: int, started: float
    ) -> bool:
        if self.here_full:
            return False
        self.served_here.append(request)
        return True

    def pipeline(self, request: Request, excluded: set[str], now: float) -> None:
        return None  # no stages here: tests/unit/test_entry_pipelines.py has them

    def serve_tracked(self, request: Request, deadline: float, started: float) -> bool:
        raise AssertionError("no pipeline starts here")

    def cancel_here(self, request_id: str, reason: str) -> None:
        raise AssertionError("no pipeline runs here")

    def send_peer(self, node: str, frame: bytes) -> bool:
        if node in self.unreachable:
            return False
        message = decode(frame)
        assert isinstance(message, Request | Cancel)
        self.to_peers.append((node, message))
        return True

    def send_client(self, client: bytes, frame: bytes) -> None:
        assert client == CLIENT
        message = decode(frame)
        assert isinstance(message, Reply | Chunk | Error)
        self.to_client.append(message)

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        self.outcomes.append((outcome, seconds))

    def first_chunk(self, model: str, seconds: float) -> None:
        pass

    # what the tests look at
    def requests_to(self, node: str) -> list[Request]:
        return [m for n, m in self.to_peers if n == node and isinstance(m, Request)]

    def cancels_to(self, node: str) -> list[Cancel]:
        return [m for n, m in self.to_peers if n == node and isinstance(m, Cancel)]

    def last_try(self) -> tuple[str, Request]:
        node, msg = next((n, m) for n, m in reversed(self.to_peers) if isinstance(m, Request))
        return node, msg


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, *, try_timeout: float | None = None, **host_args: object) -> tuple[EntryTable, Host]:
    host = Host(clock, **host_args)  # type: ignore[arg-type]
    policy = RoutingPolicy("entry", lambda m: (0, 1), rng=random.Random(1))
    return EntryTable(host, policy, max_tries=4, try_timeout=try_timeout), host


def request(rid: str = "r1", deadline_s: float = 120.0, stream: bool = False) -> Request:
    return Request(rid, MODEL, Task.COMPLETE, "hello", deadline_ms=int(deadline_s * 1000), stream=stream)


def test_a_long_request_is_served_once_however_long_it_takes(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(deadline_s=120), clock.now)
    node, first = host.last_try()
    for _ in range(40):  # 40 s of work on a live node
        clock.now += 1.0
        table.tick(clock.now)
    assert len(host.requests_to("b") + host.requests_to("c")) == 1, "re-sent although its node was alive"
    table.on_reply(node, Reply(first.id, "done", node), clock.now)
    assert host.to_client == [Reply("r1", "done", node, route=host.to_client[0].route)]  # type: ignore[union-attr]
    assert len(table) == 0 and host.cancels_to(node) == []


def test_a_forwarded_try_carries_the_hop_and_what_is_left_of_the_deadline(clock: FakeClock) -> None:
    table, host = make(clock, alive=["b"])
    clock.now += 0.0
    table.take(CLIENT, request(deadline_s=10), clock.now)
    _, sent = host.last_try()
    assert sent.hops == 1 and sent.origin == "entry" and sent.deadline_ms == 10_000 and sent.id == "r1"


def test_a_try_on_a_suspected_node_is_cancelled_there_before_it_is_sent_elsewhere(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(), clock.now)
    first_node, first = host.last_try()
    table.node_gone(first_node, "peer-suspect", clock.now)
    assert host.cancels_to(first_node) == [Cancel(first.id, "moved to another node (peer-suspect)")]
    second_node, second = host.last_try()
    assert second_node != first_node
    assert second.id != first.id, "a second try must travel under an id of its own"
    assert host.to_peers.index((first_node, host.cancels_to(first_node)[0])) < host.to_peers.index(
        (second_node, second)
    )


def test_a_late_answer_of_an_abandoned_try_is_dropped_and_the_client_gets_exactly_one(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(), clock.now)
    first_node, first = host.last_try()
    table.node_gone(first_node, "peer-suspect", clock.now)
    second_node, second = host.last_try()
    table.on_reply(first_node, Reply(first.id, "late", first_node), clock.now)  # the suspect was only slow
    assert host.to_client == []
    table.on_reply(second_node, Reply(second.id, "answer", second_node), clock.now)
    table.on_reply(second_node, Reply(second.id, "again", second_node), clock.now)  # a duplicate
    assert [m.output for m in host.to_client] == ["answer"]  # type: ignore[union-attr]
    assert table.counts["duplicate_replies"] == 2


def test_a_stream_that_moves_continues_after_what_the_client_has(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(stream=True), clock.now)
    node, first = host.last_try()
    for i, piece in enumerate(["The ", "capital "]):
        table.on_chunk(node, Chunk(first.id, i, piece, node), clock.now)
    table.node_gone(node, "peer-dead", clock.now)
    other, second = host.last_try()
    assert second.prefix == "The capital "
    table.on_chunk(node, Chunk(first.id, 2, "of", node), clock.now)  # the dead node's last words: dropped
    table.on_chunk(other, Chunk(second.id, 0, "is Paris", other), clock.now)
    table.on_reply(other, Reply(second.id, "The capital is Paris", other), clock.now)
    chunks = [m for m in host.to_client if isinstance(m, Chunk)]
    assert [c.seq for c in chunks] == [0, 1, 2] and [c.data for c in chunks] == ["The ", "capital ", "is Paris"]
    assert all(c.id == "r1" for c in chunks) and isinstance(host.to_client[-1], Reply)


def test_a_reject_sends_the_request_to_another_node_without_cancelling_anything(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(), clock.now)
    node, first = host.last_try()
    table.on_reject(node, Reject(first.id, node, 9, "queue full"), clock.now)
    other, _ = host.last_try()
    assert other != node and host.cancels_to(node) == []


def test_when_every_node_refuses_the_client_hears_overloaded_after_a_short_backoff(clock: FakeClock) -> None:
    table, host = make(clock, alive=["b"])
    table.take(CLIENT, request(), clock.now)
    for _ in range(10):
        node, sent = host.last_try()
        table.on_reject(node, Reject(sent.id, node, 5), clock.now)
        if host.to_client:
            break
        clock.now += 0.5
        table.tick(clock.now)
    (answer,) = host.to_client
    assert isinstance(answer, Error) and answer.code is ErrorCode.OVERLOADED and answer.id == "r1"
    assert len(host.requests_to("b")) == 4  # the first try and three rounds of backoff


def test_retryable_errors_move_the_request_and_others_are_final(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request("r1"), clock.now)
    node, sent = host.last_try()
    table.on_error(node, Error(sent.id, ErrorCode.UNAVAILABLE, "leaving", node), clock.now)
    other, second = host.last_try()
    assert other != node
    table.on_error(other, Error(second.id, ErrorCode.INTERNAL, "the model failed on this input", other), clock.now)
    (answer,) = host.to_client
    assert isinstance(answer, Error) and answer.code is ErrorCode.INTERNAL and answer.id == "r1"
    assert len(host.requests_to("b") + host.requests_to("c")) == 2  # INTERNAL is not tried on every node


def test_the_caller_cancelling_stops_the_try_where_it_runs_and_answers_nothing(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(), clock.now)
    node, sent = host.last_try()
    assert not table.cancel(CLIENT, "r-unknown", "", clock.now)
    assert table.cancel(CLIENT, "r1", "client went away", clock.now)
    assert host.cancels_to(node) == [Cancel(sent.id, "client went away")]
    assert host.to_client == [] and len(table) == 0
    assert host.outcomes[-1][0] == "cancelled"
    table.on_reply(node, Reply(sent.id, "too late", node), clock.now)
    assert host.to_client == []


def test_a_cancel_from_the_callers_new_connection_stops_the_request_too(clock: FakeClock) -> None:
    """A client whose connection dropped (the node hung, then woke) sends its Cancel again on a new connection."""
    table, host = make(clock)
    table.take(CLIENT, request(), clock.now)
    node, sent = host.last_try()
    assert table.cancel(b"the-same-client-reconnected", "r1", "client closed", clock.now)
    assert host.cancels_to(node) == [Cancel(sent.id, "client closed")] and len(table) == 0
    assert table.counts["cancelled_from_another_connection"] == 1


def test_a_passed_deadline_cancels_the_try_and_tells_the_client(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request(deadline_s=5), clock.now)
    node, sent = host.last_try()
    clock.now += 5.0
    table.tick(clock.now)
    assert host.cancels_to(node) == [Cancel(sent.id, "deadline passed")]
    (answer,) = host.to_client
    assert isinstance(answer, Error) and answer.code is ErrorCode.DEADLINE_EXCEEDED


def test_a_per_try_timeout_when_set_cancels_before_resending_under_a_new_id(clock: FakeClock) -> None:
    table, host = make(clock, try_timeout=30.0)
    table.take(CLIENT, request(deadline_s=120), clock.now)
    node, first = host.last_try()
    clock.now += 31.0
    table.tick(clock.now)
    other, second = host.last_try()
    assert host.cancels_to(node)[0].id == first.id and other != node and second.id != first.id


def test_an_unreachable_peer_is_skipped(clock: FakeClock) -> None:
    table, host = make(clock, alive=["b", "c"], unreachable={"b"})
    table.take(CLIENT, request(), clock.now)
    node, _ = host.last_try()
    assert node == "c"


def test_a_model_nobody_serves_is_answered_at_once(clock: FakeClock) -> None:
    table, host = make(clock, alive=[])
    table.take(CLIENT, request(), clock.now)
    (answer,) = host.to_client
    assert isinstance(answer, Error) and answer.code is ErrorCode.UNKNOWN_MODEL


def test_serving_here_hands_the_request_to_the_executor_with_the_stream_so_far(clock: FakeClock) -> None:
    table, host = make(clock, alive=["b"])
    table.take(CLIENT, request(stream=True), clock.now)
    node, first = host.last_try()
    table.on_chunk(node, Chunk(first.id, 0, "half ", node), clock.now)
    host.alive, host.serves_here = [], True
    table.node_gone(node, "peer-dead", clock.now)
    (served,) = host.served_here
    assert served.prefix == "half " and served.id == "r1" and len(table) == 0


def test_try_ids_stay_within_the_wire_limit(clock: FakeClock) -> None:
    long_id = "x" * 128
    table, host = make(clock)
    table.take(CLIENT, request(long_id), clock.now)
    ids = []
    for _ in range(3):  # every refusal sends a new try, each under an id of its own
        node, sent = host.last_try()
        ids.append(sent.id)
        table.on_reject(node, Reject(sent.id, node, 0), clock.now)
        clock.now += 0.1  # past any backoff
        table.tick(clock.now)
    assert ids[0] == long_id
    assert all(len(i) <= 128 for i in ids) and len(set(ids)) == 3


def test_stopping_hands_every_request_back_as_unavailable(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, request("r1"), clock.now)
    node, sent = host.last_try()
    table.hand_back("entry node stopped", clock.now)
    (answer,) = host.to_client
    assert isinstance(answer, Error) and answer.code is ErrorCode.UNAVAILABLE
    assert host.cancels_to(node)[0].id == sent.id


def test_a_request_waits_a_moment_for_an_unreachable_model_to_come_back(clock: FakeClock) -> None:
    table, host = make(clock, alive=[])
    host.servers = lambda model: ["b"]  # type: ignore[method-assign]
    host.eligible = lambda request, excluded: ([n for n in host.alive if n not in excluded], True)  # type: ignore[method-assign]
    table.take(CLIENT, request(), clock.now)
    clock.now += 1.0
    table.tick(clock.now)
    assert host.to_client == [], "a node out of reach for a second must not fail the request yet"
    host.alive = ["b"]
    table.node_back(clock.now)
    node, _ = host.last_try()
    assert node == "b" and host.to_client == []


def test_an_unreachable_model_is_unavailable_after_the_wait(clock: FakeClock) -> None:
    table, host = make(clock, alive=[])
    host.servers = lambda model: ["b"]  # type: ignore[method-assign]
    host.eligible = lambda request, excluded: ([], True)  # type: ignore[method-assign]
    table.take(CLIENT, request(), clock.now)
    for _ in range(50):
        clock.now += 0.1
        table.tick(clock.now)
    (answer,) = host.to_client
    assert isinstance(answer, Error) and answer.code is ErrorCode.UNAVAILABLE


def test_big_answers_are_relayed_without_being_packed_again(clock: FakeClock) -> None:
    table, host = make(clock)
    big = Request("r1", MODEL, Task.COMPLETE, "p" * 5000, deadline_ms=60_000)
    table.take(CLIENT, big, clock.now, frame=encode(big))
    node, sent = host.last_try()
    assert sent.input == big.input and sent.hops == 1 and sent.id == "r1"
    answer = Reply(sent.id, [[0.25] * 64] * 8, node, "", 3, {"model": MODEL})
    table.on_reply(node, answer, clock.now, encode(answer))
    (relayed,) = host.to_client
    assert isinstance(relayed, Reply) and relayed.id == "r1" and relayed.output == answer.output
    assert relayed.route and relayed.node == node and relayed.queue == 3
