"""Callers who misbehave cannot lock others out: one address holds at most its share of connections, and each
address is a client of its own to the mesh, so its caps and abandoned requests are its own.

Loopback has a whole /8: connections from 127.0.0.2 or 127.0.0.3 are other addresses to the gateway, as other
hosts would be (tests/netns/test_hostile_lan.py does the same across real hosts).
"""

from __future__ import annotations

import select
import socket
import threading

import httpx
import pytest
from gateway_nodes import GatewayNode, scrape, start_gateway_node, value, wait_until

from bench.procs import Cluster
from nodes.api.guard import MAX_CONNECTIONS_PER_IP

HELLO = [{"role": "user", "content": "hello"}]
SLOW_CONNECTIONS = 600


def _from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def _slow_connections(port: int, count: int) -> list[socket.socket]:
    """`count` connections from 127.0.0.1 that begin a request and never finish its headers."""
    out = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        out.append(sock)
    return out


def test_one_address_holding_600_slow_connections_cannot_stop_another(echo_node: GatewayNode) -> None:
    port = int(echo_node.url.rsplit(":", 1)[1])
    slow = _slow_connections(port, SLOW_CONNECTIONS)
    try:
        refused = 0
        pending = list(slow)
        while pending:
            readable, _, _ = select.select(pending, [], [], 1.0)
            if not readable:
                break  # the rest are held, waiting for headers that never come
            for sock in readable:
                # Past its share, the address is refused with a 429 (no request was read; the connection closes).
                answer = sock.recv(4096)
                assert answer.startswith(b"HTTP/1.1 429") and b"too_many_connections" in answer, answer
                refused += 1
                pending.remove(sock)
        assert refused == SLOW_CONNECTIONS - MAX_CONNECTIONS_PER_IP
        assert set(pending) == set(slow[:MAX_CONNECTIONS_PER_IP])  # the first are the ones held
        with _from("127.0.0.2") as other:
            for _ in range(20):
                r = other.post(f"{echo_node.url}/v1/chat/completions", json={"model": "echo", "messages": HELLO})
                assert r.status_code == 200, r.text
        metrics = scrape(echo_node, source="127.0.0.3")  # 127.0.0.1 holds its share: ask from elsewhere
        assert value(metrics, "lanmesh_http_connections") <= MAX_CONNECTIONS_PER_IP + 1
        assert value(metrics, "lanmesh_http_connections_dropped_total", reason="per_ip_limit") >= refused
    finally:
        for sock in slow:
            sock.close()


def _abandoned_request(port: int, model: str) -> socket.socket:
    """A complete chat request whose caller will hang up before the answer."""
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}'.encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_each_address_is_its_own_client_to_the_mesh_and_a_caller_who_leaves_is_cancelled(cluster: Cluster) -> None:
    model = "sleep:1500:cap=8"
    node = start_gateway_node(cluster, "callers", [model], ["--max-inflight-per-client", "2"])
    port = int(node.url.rsplit(":", 1)[1])
    name = "sleep:1500"

    def running() -> int:
        return int(node.proc.status()[0]["models"][name][0])

    first = [_abandoned_request(port, name) for _ in range(2)]
    try:
        wait_until(lambda: running() == 2, what="both requests running")
        with _from("127.0.0.1") as same:  # the same address: the mesh's cap of 2 for this caller is reached
            r = same.post(f"{node.url}/v1/chat/completions", json={"model": name, "messages": HELLO})
            assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded", r.text
        results: list[int] = []
        with _from("127.0.0.2") as other:  # another address is another client: it is served
            thread = threading.Thread(
                target=lambda: results.append(
                    other.post(f"{node.url}/v1/chat/completions", json={"model": name, "messages": HELLO}).status_code
                )
            )
            thread.start()
            before = value(scrape(node), "lanmesh_http_requests_total", status="499")
            for sock in first:
                sock.close()  # hang up: the gateway cancels these two requests
            wait_until(
                lambda: value(scrape(node), "lanmesh_http_requests_total", status="499") >= before + 2,
                what="the abandoned requests counted as the caller gone (499)",
            )
            thread.join(30)
        assert results == [200]
    finally:
        for sock in first:
            sock.close()


def test_a_mesh_client_per_caller_costs_the_node_no_threads_of_its_own(cluster: Cluster) -> None:
    """Caller clients share one ZeroMQ context: 40 callers add sockets, not 80 I/O and reaper threads."""
    import psutil

    node = start_gateway_node(cluster, "many-callers", ["echo"])
    assert node.proc.proc is not None
    process = psutil.Process(node.proc.proc.pid)
    with _from("127.0.0.200") as first:
        assert first.post(f"{node.url}/v1/chat/completions", json={"model": "echo", "messages": HELLO}).is_success
    before = process.num_threads()
    for i in range(40):
        with _from(f"127.0.1.{i + 1}") as caller:
            r = caller.post(f"{node.url}/v1/chat/completions", json={"model": "echo", "messages": HELLO})
            assert r.status_code == 200, r.text
    assert process.num_threads() - before < 8, f"{before} threads before 40 callers, {process.num_threads()} after"


@pytest.mark.parametrize("path", ["/v1/models", "/health"])
def test_a_normal_client_is_not_limited_by_keep_alive_reuse(echo_node: GatewayNode, path: str) -> None:
    # One client making many sequential requests on one keep-alive connection never meets the caps.
    with _from("127.0.0.3") as client:
        assert all(client.get(f"{echo_node.url}{path}").status_code == 200 for _ in range(200))


def test_a_caller_who_hangs_up_stops_its_work_on_the_node(cluster: Cluster) -> None:
    node = start_gateway_node(cluster, "hang-up", ["sleep:20000:cap=4"])
    port = int(node.url.rsplit(":", 1)[1])

    def running() -> int:
        return int(node.proc.status()[0]["models"]["sleep:20000"][0])

    callers = [_abandoned_request(port, "sleep:20000") for _ in range(2)]
    wait_until(lambda: running() == 2, what="both requests running")
    for sock in callers:
        sock.close()
    # The gateway cancels the request, and the mesh's Cancel stops it where it runs: not 20 s later.
    wait_until(lambda: running() == 0, timeout=3, what="the abandoned work stopped on the node")
