"""An entry serving a model no node holds whole: a chain of stage holders composed from gossip, answers from the
first stage, and a chain that loses a node replaced, the new one given the exact tokens already streamed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from mesh import EntryTable, RoutingPolicy, StageHolder, compose_chain, holders_of
from protocol import Cancel, Chunk, Error, ErrorCode, Reply, Request, Task, decode, encode

CLIENT = b"client-1"
MODEL = "big"
HOLDERS = [  # two copies of a 2-stage split of a 30-layer model
    ("a", "big[0-18]", 30, "v1"),
    ("b", "big[0-18]", 30, "v1"),
    ("c", "big[19-29]", 30, "v1"),
    ("d", "big[19-29]", 30, "v1"),
]


def pick_first(stage: str, nodes: list[str]) -> tuple[str, str]:
    return nodes[0], f"only:{nodes[0]}"


# ---------------------------------------------------------------- composing a chain (pure)


def test_a_chain_covers_every_layer_with_distinct_nodes_of_one_build() -> None:
    chain, why = compose_chain(holders_of(MODEL, HOLDERS), pick_first) or ([], [])
    assert chain == [("a", "big[0-18]"), ("c", "big[19-29]")] and why == ["only:a", "only:c"]


def test_no_chain_when_a_range_has_no_holder_or_builds_do_not_match() -> None:
    assert compose_chain(holders_of(MODEL, HOLDERS[:2]), pick_first) is None
    mixed = [("a", "big[0-18]", 30, "v1"), ("c", "big[19-29]", 30, "v2")]
    assert compose_chain(holders_of(MODEL, mixed), pick_first) is None
    assert holders_of("big@v2", mixed) == [StageHolder("c", "big[19-29]", 19, 29, 30, "v2")]


def test_a_dead_end_tries_another_holder_and_another_layout() -> None:
    served = [
        ("a", "big[0-9]", 30, "v1"),  # a 3-stage layout whose middle only `a` holds...
        ("a", "big[10-19]", 30, "v1"),
        ("b", "big[0-14]", 30, "v1"),  # ...and a 2-stage one
        ("c", "big[15-29]", 30, "v1"),
        ("c", "big[20-29]", 30, "v1"),
    ]
    chain, _ = compose_chain(holders_of(MODEL, served), pick_first) or ([], [])
    assert chain == [("b", "big[0-14]"), ("c", "big[15-29]")]


def test_whole_models_and_other_models_are_not_stages() -> None:
    served = [("a", "big", 0, "v1"), ("b", "bigger[0-3]", 8, "v1"), ("c", "big@v1", 0, "v1")]
    assert holders_of(MODEL, served) == []


# ---------------------------------------------------------------- the entry table with chains


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0


@dataclass
class Host:
    """A node whose mesh holds `big` only as stages; what the entry table sends is recorded."""

    clock: FakeClock
    node_id: str = "entry"
    served: list[tuple[str, str, int, str]] = field(default_factory=lambda: list(HOLDERS))
    whole: list[str] = field(default_factory=list)
    to_peers: list[tuple[str, Request | Cancel]] = field(default_factory=list)
    to_client: list[Reply | Chunk | Error] = field(default_factory=list)
    tracked: list[Request] = field(default_factory=list)
    cancelled_here: list[str] = field(default_factory=list)

    def eligible(self, request: Request, excluded: set[str]) -> tuple[list[str], bool]:
        return [n for n in self.whole if n not in excluded], bool(self.whole) or bool(self.served)

    def servers(self, model: str) -> list[str]:
        return list(self.whole)

    def pipeline(self, request: Request, excluded: set[str], now: float) -> tuple[list[tuple[str, str]], str] | None:
        live = [s for s in self.served if s[0] not in excluded]
        found = compose_chain(holders_of(request.model, live), pick_first)
        return None if found is None else (found[0], "pipeline:" + ">".join(found[1]))

    def serve_here(self, *args: object) -> bool:
        raise AssertionError("nothing is served whole here")

    def serve_tracked(self, request: Request, deadline: float, started: float) -> bool:
        self.tracked.append(request)
        return True

    def cancel_here(self, request_id: str, reason: str) -> None:
        self.cancelled_here.append(request_id)

    def send_peer(self, node: str, frame: bytes) -> bool:
        message = decode(frame)
        assert isinstance(message, Request | Cancel)
        self.to_peers.append((node, message))
        return True

    def send_client(self, client: bytes, frame: bytes) -> None:
        message = decode(frame)
        assert isinstance(message, Reply | Chunk | Error)
        self.to_client.append(message)

    def finished(self, model: str, outcome: str, seconds: float) -> None:
        pass

    def first_chunk(self, model: str, seconds: float) -> None:
        pass

    def requests(self) -> list[tuple[str, Request]]:
        return [(n, m) for n, m in self.to_peers if isinstance(m, Request)]

    def cancels(self) -> list[tuple[str, str]]:
        return [(n, m.id) for n, m in self.to_peers if isinstance(m, Cancel)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **host_args: object) -> tuple[EntryTable, Host]:
    host = Host(clock, **host_args)  # type: ignore[arg-type]
    policy = RoutingPolicy("entry", lambda m: (0, 1), rng=random.Random(1))
    return EntryTable(host, policy, max_tries=4), host


def ask(stream: bool = True) -> Request:
    return Request("r1", MODEL, Task.CHAT, [{"role": "user", "content": "hi"}], deadline_ms=60_000, stream=stream)


def piece(try_id: str, seq: int, text: str, tokens: list[int]) -> Chunk:
    return Chunk(try_id, seq, {"text": text, "tokens": tokens}, "a")


def test_a_model_held_only_as_stages_goes_to_the_first_stage_with_its_chain(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, ask(), clock.now)
    ((node, sent),) = host.requests()
    assert node == "a" and sent.model == "big[0-18]" and sent.hops == 1
    assert sent.stages == (("a", "big[0-18]"), ("c", "big[19-29]")) and sent.prefix_ids == ()


def test_the_caller_sees_the_text_of_a_pipelines_pieces_and_the_entry_keeps_their_tokens(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, ask(), clock.now)
    ((_, sent),) = host.requests()
    table.on_chunk("a", piece(sent.id, 0, "Hel", [10, 11]), clock.now)
    table.on_chunk("a", piece(sent.id, 1, "lo", [12]), clock.now)
    assert [(c.seq, c.data) for c in host.to_client if isinstance(c, Chunk)] == [(0, "Hel"), (1, "lo")]
    pending = table.get("r1")
    assert pending is not None and pending.ids == [10, 11, 12]


def test_losing_a_stage_mid_stream_moves_the_stream_to_a_new_chain_with_its_exact_tokens(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, ask(), clock.now)
    ((_, first_try),) = host.requests()
    table.on_chunk("a", piece(first_try.id, 0, "Hel", [10, 11]), clock.now)
    host.served = [s for s in host.served if s[0] != "c"]  # the detector says c is dead: it is no longer eligible
    table.node_gone("c", "peer-dead", clock.now)
    assert sorted(host.cancels()) == [("a", first_try.id), ("c", first_try.id)]  # freed everywhere
    node, second = host.requests()[-1]
    assert node == "a" and second.stages == (("a", "big[0-18]"), ("d", "big[19-29]"))
    assert second.prefix == "Hel" and second.prefix_ids == (10, 11) and second.id != first_try.id
    table.on_chunk("a", piece(second.id, 0, "lo", [12]), clock.now)
    table.on_chunk("a", piece(first_try.id, 1, "late", [99]), clock.now)  # the old chain's late piece: dropped
    table.on_reply("a", Reply(second.id, {"role": "assistant", "content": "Hello"}, "a"), clock.now)
    chunks = [(c.seq, c.data) for c in host.to_client if isinstance(c, Chunk)]
    assert chunks == [(0, "Hel"), (1, "lo")]
    assert isinstance(host.to_client[-1], Reply) and host.to_client[-1].id == "r1"
    assert "retry-after:peer-dead:pipeline:" in host.to_client[-1].route


def test_text_streamed_without_token_ids_is_replayed_as_text(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, ask(), clock.now)
    ((_, sent),) = host.requests()
    table.on_chunk("a", Chunk(sent.id, 0, "Hel", "a"), clock.now)  # a piece with no ids (an older first stage)
    table.node_gone("c", "peer-dead", clock.now)
    _, again = host.requests()[-1]
    assert again.prefix == "Hel" and again.prefix_ids == ()


def test_a_chain_whose_first_stage_is_the_entry_is_served_here_and_still_tracked(clock: FakeClock) -> None:
    served = [("entry", "big[0-18]", 30, "v1"), ("c", "big[19-29]", 30, "v1")]
    table, host = make(clock, served=served)
    table.take(CLIENT, ask(), clock.now)
    (sent,) = host.tracked
    assert sent.stages[0] == ("entry", "big[0-18]") and table.get("r1") is not None
    table.on_chunk("entry", piece(sent.id, 0, "Hi", [5]), clock.now)
    table.cancel(CLIENT, "r1", "stream closed", clock.now)
    assert host.cancelled_here == [sent.id] and host.cancels() == [("c", sent.id)]


def test_a_stage_that_fails_the_sequence_backs_off_then_a_new_chain_is_composed(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, ask(), clock.now)
    ((_, sent),) = host.requests()
    table.on_error("a", Error(sent.id, ErrorCode.UNAVAILABLE, "stage node c cannot be reached", "a"), clock.now)
    assert host.cancels() == [("c", sent.id)] and len(host.requests()) == 1  # waits for the detector's word
    host.served = [s for s in host.served if s[0] != "c"]
    clock.now += 0.1
    table.tick(clock.now)
    _, again = host.requests()[-1]
    assert again.stages == (("a", "big[0-18]"), ("d", "big[19-29]"))


def test_a_passed_deadline_frees_the_sequence_on_every_stage(clock: FakeClock) -> None:
    table, host = make(clock)
    table.take(CLIENT, ask(), clock.now)
    ((_, sent),) = host.requests()
    clock.now += 61
    table.tick(clock.now)
    assert sorted(host.cancels()) == [("a", sent.id), ("c", sent.id)]
    assert isinstance(host.to_client[-1], Error) and host.to_client[-1].code is ErrorCode.DEADLINE_EXCEEDED


def test_a_node_holding_the_model_whole_is_preferred_to_a_chain(clock: FakeClock) -> None:
    table, host = make(clock, whole=["w"])
    table.take(CLIENT, ask(), clock.now)
    ((node, sent),) = host.requests()
    assert node == "w" and sent.model == MODEL and sent.stages == ()


def test_a_model_with_no_holder_of_some_range_is_unavailable_not_unknown(clock: FakeClock) -> None:
    table, host = make(clock, served=HOLDERS[:2])
    table.take(CLIENT, ask(stream=False), clock.now)
    for _ in range(200):
        clock.now += 0.05
        table.tick(clock.now)
    assert isinstance(host.to_client[-1], Error) and host.to_client[-1].code is ErrorCode.UNAVAILABLE
    assert encode(host.to_client[-1])
