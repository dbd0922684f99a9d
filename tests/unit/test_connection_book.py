"""Who gets in when the gateway is busy: per-address caps below the global one, and waiting connections (no request
in progress) closed first, from the address holding the most, so no one host can lock the others out."""

from __future__ import annotations

from nodes.api.guard import ConnectionBook


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close_quietly(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return self.name


def _fill(book: ConnectionBook, ip: str, count: int) -> list[Conn]:
    conns = [Conn(f"{ip}#{i}") for i in range(count)]
    for conn in conns:
        assert book.admit(conn, ip) is None
    return conns


def test_an_address_at_its_cap_is_refused_and_others_are_not() -> None:
    book = ConnectionBook(max_total=100, max_per_ip=4)
    mine = _fill(book, "10.0.0.1", 4)
    assert book.admit(Conn("one too many"), "10.0.0.1") == "per_ip_limit"
    assert not any(c.closed for c in mine)  # it keeps what it holds (until the header deadline)
    assert book.admit(Conn("someone else"), "10.0.0.2") is None
    book.remove(mine[0])
    assert book.admit(Conn("room again"), "10.0.0.1") is None


def test_when_full_the_address_holding_the_most_gives_up_a_waiting_connection() -> None:
    book = ConnectionBook(max_total=10, max_per_ip=6)
    small = _fill(book, "10.0.0.1", 2)
    big = _fill(book, "10.0.0.9", 6)
    busy = _fill(book, "10.0.0.3", 2)
    for conn in busy:
        book.busy(conn)
    assert len(book) == 10
    assert book.admit(Conn("newcomer"), "10.0.0.7") is None
    assert [c.closed for c in big] == [True] + [False] * 5 and not any(c.closed for c in small + busy)
    assert len(book) == 10


def test_a_busy_connection_is_never_closed_to_make_room_and_a_full_busy_gateway_refuses() -> None:
    book = ConnectionBook(max_total=4, max_per_ip=4)
    conns = _fill(book, "10.0.0.1", 4)
    for conn in conns:
        book.busy(conn)
    assert book.admit(Conn("late"), "10.0.0.2") == "full"
    assert not any(c.closed for c in conns)
    book.waiting(conns[2])  # its response ended: it waits for the next request on the keep-alive connection
    assert book.admit(Conn("later"), "10.0.0.2") is None
    assert [c.closed for c in conns] == [False, False, True, False]


def test_closed_connections_free_their_place() -> None:
    book = ConnectionBook(max_total=2, max_per_ip=2)
    a, b = _fill(book, "10.0.0.1", 2)
    book.busy(a)
    book.busy(b)
    book.remove(a)
    book.remove(a)  # twice is harmless (shed, then lost)
    assert book.admit(Conn("c"), "10.0.0.1") is None and len(book) == 2
