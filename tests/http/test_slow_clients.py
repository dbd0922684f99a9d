"""Limits below the app, on a gateway run in this process: slow headers and bodies are cut off, and /health says
'not ready' when the node behind the gateway does not answer."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from gateway_nodes import free_port

from nodes.api import guard as http_guard
from nodes.api.gateway import Gateway, GatewaySettings
from nodes.api.metrics import NodeMetrics


@pytest.fixture
def lonely_gateway(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gateway]:
    """A gateway whose node is not there (nothing listens on its ROUTER port), with short read deadlines."""
    monkeypatch.setattr(http_guard, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(http_guard, "BODY_TIMEOUT_S", 0.5)
    settings = GatewaySettings("lonely", "127.0.0.1", free_port(), f"127.0.0.1:{free_port()}", grace=1.0)
    gw = Gateway(settings, NodeMetrics("lonely"))
    gw.start()
    yield gw
    gw.stop(2.0)


def test_a_client_that_sends_no_complete_headers_is_disconnected(lonely_gateway: Gateway) -> None:
    address = ("127.0.0.1", lonely_gateway.port)
    with socket.create_connection(address, timeout=5) as idle, socket.create_connection(address, timeout=5) as trickler:
        t0 = time.monotonic()
        trickler.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert idle.recv(100) == b"" and trickler.recv(100) == b""  # closed by the server, nothing sent
        assert time.monotonic() - t0 < 3.0


def test_a_body_that_does_not_arrive_in_time_gets_408(lonely_gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", lonely_gateway.port), timeout=5) as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b'Content-Length: 100\r\n\r\n{"model":')
        answer = sock.recv(1000)
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower()


def test_health_is_not_ready_while_the_node_does_not_answer(lonely_gateway: Gateway) -> None:
    r = httpx.get(f"{lonely_gateway.url}/health", timeout=10)
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable" and r.json()["ready"] is False
