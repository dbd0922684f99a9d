"""The mesh loop's poller: epoll on ZeroMQ's notification descriptors, asking only the sockets that may have news."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from mesh import SocketPoller


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any], SocketPoller]]:
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    server.bind("inproc://poller-test")
    client.connect("inproc://poller-test")
    poller = SocketPoller()
    poller.register(client)
    yield server, client, poller
    poller.close()
    ctx.destroy(linger=0)


def answer(server: zmq.Socket[Any], client: zmq.Socket[Any]) -> None:
    client.send(b"ping")
    ident, _ = server.recv_multipart()
    server.send_multipart([ident, b"pong"])


def test_a_socket_with_a_message_is_reported_and_one_without_is_waited_on(pair: Any) -> None:
    server, client, poller = pair
    t0 = time.monotonic()
    assert poller.poll(0) == [] or client.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0
    answer(server, client)
    assert [s for s, _ in poller.poll(1000)] == [client]
    assert client.recv() == b"pong"
    t0 = time.monotonic()
    poller.poll(0)  # last turn's readable socket is asked once more (a drain may have left some)
    assert poller.poll(150) == []
    assert time.monotonic() - t0 >= 0.14


def test_a_message_whose_notification_a_send_swallowed_is_found_once_the_socket_is_touched(pair: Any) -> None:
    server, client, poller = pair
    poller.poll(0)  # what registration left to ask
    answer(server, client)
    time.sleep(0.05)
    client.getsockopt(zmq.EVENTS)  # what a send does too: it takes in the notification of the pong
    assert poller.poll(100) == []  # epoll alone would never hear of it
    poller.touch(client)
    assert [s for s, _ in poller.poll(100)] == [client]


def test_a_turn_costs_the_same_with_four_hundred_sockets_registered() -> None:
    ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
    poller = SocketPoller()
    socks = []
    try:
        for i in range(400):
            s = ctx.socket(zmq.DEALER)
            s.connect(f"inproc://nobody-{i}")
            poller.register(s)
            socks.append(s)
        poller.poll(0)
        t0 = time.perf_counter()
        for _ in range(1000):
            poller.poll(0)
        per_call = (time.perf_counter() - t0) / 1000
        assert per_call < 50e-6, f"{per_call * 1e6:.0f} us a call"  # zmq.Poller: ~450 us at 400 sockets
    finally:
        poller.close()
        ctx.destroy(linger=0)
