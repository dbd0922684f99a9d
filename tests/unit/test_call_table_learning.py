"""A client given one address learns the rest of the mesh from it: it connects to the live nodes a node reports,
keeps them as stand-ins for the given node, and drops learned ones the mesh reports gone. Driven without sockets."""

from __future__ import annotations

from typing import Any

import pytest
from fake_wire import A, B, answer, make_table, start

from mesh import CallTable, NodeDirectory
from protocol import Pong, Reply

C, D = "tcp://10.0.0.3:7700", "tcp://10.0.0.4:7700"


def row(endpoint: str, state: str, name: str = "") -> dict[str, Any]:
    return {"node": name or endpoint[-12:], "address": endpoint.removeprefix("tcp://"), "state": state, "models": {}}


def one_address_table(**directory: Any) -> tuple[CallTable, Any]:
    return make_table(endpoints=(A,), directory=NodeDirectory((A,), **directory))


def tell(table: CallTable, wire: Any, rows: list[dict[str, Any]], now: float) -> None:
    """Answer the status ping the table sent last with `rows`."""
    ep, ping = wire.status_pings()[-1]
    answer(table, ep, Pong(ping.id, "n", rows), now)


def test_the_first_connection_is_asked_for_the_mesh_and_its_alive_nodes_are_connected_to() -> None:
    table, wire = one_address_table()
    table.node_up(A, 0.0)
    assert [ep for ep, _ in wire.status_pings()] == [A]
    tell(table, wire, [row(A, "self"), row(B, "alive"), row(C, "suspect"), row(D, "dead")], 0.01)
    assert wire.opened == [B] and table.learned == (B,)


def test_requests_stay_on_the_given_node_while_it_is_connected() -> None:
    table, wire = one_address_table()
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive")], 0.0)
    table.node_up(B, 0.1)
    for _ in range(4):
        start(table, now=0.2)
    assert [ep for ep, _ in wire.sent if ep != A] == []


def test_when_the_given_node_drops_its_requests_and_new_ones_go_to_a_learned_node_at_once() -> None:
    table, wire = one_address_table()
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive"), row(C, "alive")], 0.0)
    table.node_up(B, 0.1)
    table.node_up(C, 0.1)
    outs = [start(table, now=0.2) for _ in range(3)]
    table.node_down(A, 0.5)
    resent = [(ep, req) for ep, req in wire.sent[-4:] if hasattr(req, "model")]
    assert len(resent) == 3 and {ep for ep, _ in resent} == {B, C}, "re-sent at the moment A dropped"
    later = start(table, now=0.5)
    ep, req = wire.last()
    assert ep in (B, C)
    for r_ep, r in [*resent, (ep, req)]:
        answer(table, r_ep, Reply(r.id, "ok", r_ep[-12:]), 0.6)  # a node name: no slashes
    assert all(o.value is not None for o in [*outs, later])


def test_the_given_node_takes_new_requests_again_when_it_is_back() -> None:
    table, wire = one_address_table()
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive")], 0.0)
    table.node_up(B, 0.1)
    table.node_down(A, 1.0)
    table.node_up(A, 2.0)
    start(table, now=2.1)
    assert wire.last()[0] == A


def test_the_mesh_is_asked_every_few_seconds_and_at_once_after_a_node_drops() -> None:
    table, wire = one_address_table(refresh_s=5.0)
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive")], 0.0)
    table.node_up(B, 0.0)
    assert table.next_wake() == 5.0
    table.expire(5.0)
    assert len(wire.status_pings()) == 2
    tell(table, wire, [row(A, "self"), row(B, "alive")], 5.0)
    table.node_down(A, 6.0)
    assert [ep for ep, _ in wire.status_pings()] == [A, A, B]


def test_an_unanswered_status_ping_is_asked_again_a_second_after_it_timed_out() -> None:
    table, wire = one_address_table(retry_s=1.0)
    table.node_up(A, 0.0)
    table.expire(2.0)  # the status ping's own deadline
    assert table.next_wake() == 3.0
    table.expire(3.0)
    assert len(wire.status_pings()) == 2


def test_with_no_node_connected_nothing_is_asked_and_nothing_wakes() -> None:
    table, wire = one_address_table()
    assert table.next_wake() is None
    table.expire(100.0)
    assert not wire.sent


def test_a_learned_node_the_mesh_reports_gone_for_a_while_is_dropped_but_given_ones_never() -> None:
    table, wire = one_address_table(forget_after_s=10.0)
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive"), row(C, "alive")], 0.0)
    table.node_up(C, 0.0)
    for t in (5.0, 10.0, 15.0):  # B dead and never connected; C dead by the mesh's view but connected to us
        table.expire(t)
        tell(table, wire, [row(A, "dead"), row(B, "dead"), row(C, "dead")], t)
    assert wire.closed == [B] and table.learned == (C,)
    table.node_down(C, 16.0)
    table.expire(20.0)
    tell(table, wire, [row(A, "self")], 20.0)  # C is no longer even listed
    assert wire.closed == [B, C] and table.learned == ()
    assert table.endpoints == (A,)


def test_a_learned_node_seen_alive_again_is_kept() -> None:
    table, wire = one_address_table(forget_after_s=10.0)
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive")], 0.0)
    for t, state in ((5.0, "dead"), (10.0, "alive"), (15.0, "dead"), (20.0, "suspect")):
        table.expire(t)
        tell(table, wire, [row(A, "self"), row(B, state)], t)
    assert wire.closed == [] and table.learned == (B,)


def test_a_node_that_advertises_another_address_than_the_given_one_is_not_connected_to_twice() -> None:
    given = "tcp://localhost:7700"
    table, wire = make_table(endpoints=(given,), directory=NodeDirectory((given,)))
    table.node_up(given, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive")], 0.0)  # the node at localhost calls itself A
    table.node_up(B, 0.1)
    table.node_down(given, 1.0)  # asks B at once
    assert wire.status_pings()[-1][0] == B
    tell(table, wire, [row(B, "self"), row(A, "alive")], 1.0)  # B's view lists that node by its address
    assert wire.opened == [B]


@pytest.mark.parametrize(
    "junk",
    [None, [{"state": "alive"}], [{"address": 7, "state": "alive"}], [{"address": "", "state": "alive"}],
     [{"address": "no-port", "state": "alive"}], [{"address": "h:99999", "state": "alive"}],
     [{"address": "10.0.0.9:7700", "state": ["alive"]}]],
)  # fmt: skip
def test_malformed_status_rows_are_skipped(junk: Any) -> None:
    table, wire = one_address_table()
    table.node_up(A, 0.0)
    ep, ping = wire.status_pings()[-1]
    answer(table, ep, Pong(ping.id, "n", junk), 0.0)
    assert wire.opened == [] and table.pending == 0


def test_at_most_max_learned_nodes_are_connected_to() -> None:
    table, wire = one_address_table(max_learned=2)
    table.node_up(A, 0.0)
    tell(table, wire, [row(A, "self"), row(B, "alive"), row(C, "alive"), row(D, "alive")], 0.0)
    assert wire.opened == [B, C]


def test_a_client_that_does_not_learn_never_asks() -> None:
    table, wire = make_table(A, endpoints=(A,))
    table.expire(100.0)
    assert not wire.sent and table.next_wake() is None
