"""Several node processes on loopback joined by static seeds: routing, forwarding and failover, nothing lost."""

from __future__ import annotations

import collections
from concurrent.futures import Future

import zmq

from bench.procs import Cluster, NodeProc
from mesh import Client, Result, client_security
from protocol import Chunk, Reply, Request, Task, decode, encode
from tests.conftest import LOOPBACK

SLEEP = "sleep:150:cap=2"


def _mesh(cluster: Cluster, n: int, model: str = SLEEP, extra: list[str] | None = None) -> list[NodeProc]:
    first = cluster.add("n0", [*LOOPBACK, "--model", model, *(extra or [])])
    nodes = [first]
    for i in range(1, n):
        nodes.append(cluster.add(f"n{i}", [*LOOPBACK, "--model", model, "--peer", first.address, *(extra or [])]))
    cluster.wait_converged(timeout=10)
    return nodes


def _run_load(
    client: Client, model: str, count: int, in_flight: int, during: object = None
) -> list[Result | BaseException]:
    """Keep `in_flight` requests going until `count` are done; call `during()` once, a third of the way in."""
    results: list[Result | BaseException] = []
    pending: collections.deque[Future[Result]] = collections.deque()
    sent = 0
    while len(results) < count:
        while sent < count and len(pending) < in_flight:
            pending.append(client.submit(model, "complete", f"req {sent}"))
            sent += 1
        f = pending.popleft()
        try:
            results.append(f.result(timeout=30))
        except Exception as exc:  # noqa: BLE001 - the test counts every failure, whatever its type
            results.append(exc)
        if during is not None and len(results) == count // 3:
            during()  # type: ignore[operator]
            during = None
    return results


def _failures(results: list[Result | BaseException]) -> list[BaseException]:
    return [r for r in results if isinstance(r, BaseException)]


def test_requests_entering_any_node_are_spread_over_the_mesh(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 4)
    for entry in (nodes[0], nodes[3]):
        with Client(entry.address) as client:
            results = _run_load(client, "sleep:150", count=40, in_flight=16)
        assert not _failures(results)
        served_by = collections.Counter(r.node for r in results if isinstance(r, Result))
        assert len(served_by) >= 3, f"load stayed on a few nodes: {served_by}"
        assert all(r.route for r in results if isinstance(r, Result)), "every reply says why it went where it did"


def test_a_node_added_later_is_routable_within_seconds_and_takes_work(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 2)
    late = cluster.add("late", [*LOOPBACK, "--model", SLEEP, "--peer", nodes[1].address])
    took = cluster.wait_converged(timeout=5)
    assert took < 3.0
    with Client(nodes[0].address) as client:
        results = _run_load(client, "sleep:150", count=30, in_flight=12)
    assert not _failures(results)
    assert any(isinstance(r, Result) and r.node == late.name for r in results)


def test_kill_9_of_a_serving_node_loses_no_request(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 4)
    victim = nodes[2]
    with Client(nodes[0].address, timeout=30) as client:
        results = _run_load(client, "sleep:150", count=120, in_flight=32, during=victim.kill)
    assert not _failures(results), _failures(results)[:3]
    late = [r for r in results[60:] if isinstance(r, Result)]
    assert all(r.node != victim.name for r in late), "a dead node kept getting work"
    retried = [r for r in results if isinstance(r, Result) and "retry-after" in r.route]
    assert retried, "requests in flight on the dead node should have been re-sent"


def test_a_hung_node_sigstop_loses_no_request(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 4)
    victim = nodes[3]
    try:
        with Client(nodes[1].address, timeout=30) as client:
            results = _run_load(client, "sleep:150", count=120, in_flight=32, during=victim.pause)
        assert not _failures(results), _failures(results)[:3]
        states = {r["node"]: r["state"] for r in nodes[1].status()}
        assert states[victim.name] in ("suspect", "dead")
    finally:
        victim.resume()


def test_graceful_leave_under_load_loses_nothing(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 3)
    leaver = nodes[2]

    def leave() -> None:
        leaver.signal(15)

    with Client(nodes[0].address, timeout=30) as client:
        results = _run_load(client, "sleep:150", count=90, in_flight=24, during=leave)
    assert not _failures(results), _failures(results)[:3]
    assert leaver.proc is not None and leaver.proc.wait(15) == 0


def test_stream_continues_from_another_node_when_the_serving_node_dies(cluster: Cluster) -> None:
    entry = cluster.add("entry", [*LOOPBACK, "--model", "echo"])
    cluster.add("s1", [*LOOPBACK, "--model", "sleep:3000", "--peer", entry.address])
    cluster.add("s2", [*LOOPBACK, "--model", "sleep:3000", "--peer", entry.address])
    cluster.wait_converged(timeout=10)
    words = " ".join(f"word{i}" for i in range(30))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    client_security().configure_client(sock)  # the test mesh key (see tests/conftest.py)
    sock.connect(f"tcp://{entry.address}")
    chunks: list[Chunk] = []
    try:
        sock.send(encode(Request("stream-1", "sleep:3000", Task.COMPLETE, words, stream=True, deadline_ms=30_000)))
        final = None
        while final is None:
            assert sock.poll(10_000), "stream stalled"
            msg = decode(sock.recv())
            if isinstance(msg, Chunk):
                chunks.append(msg)
                if len(chunks) == 3:
                    victim = next(n for n in cluster.nodes if n.name == msg.node)
                    victim.kill()
            else:
                final = msg
    finally:
        sock.close(0)
    assert isinstance(final, Reply)
    assert [c.seq for c in chunks] == list(range(len(chunks))), "the client sees one gap-free stream"
    assert "".join(c.data for c in chunks) == words
    assert len({c.node for c in chunks}) == 2, "the second half came from the other node"
    assert "retry-after" in final.route


def test_labels_send_work_only_to_matching_nodes(cluster: Cluster) -> None:
    plain = cluster.add("plain", [*LOOPBACK, "--model", SLEEP])
    cluster.add("gpu", [*LOOPBACK, "--model", SLEEP, "--label", "gpu=true", "--peer", plain.address])
    cluster.wait_converged(timeout=10)
    with Client(plain.address) as client:
        futures = [client.submit("sleep:150", "complete", "x", require={"gpu": "true"}) for _ in range(8)]
        nodes = {f.result(timeout=20).node for f in futures}
    assert nodes == {"gpu"}


def test_client_with_several_nodes_survives_its_entry_node_dying(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 3)
    with Client([nodes[0].address, nodes[1].address], timeout=30) as client:
        results = _run_load(client, "sleep:150", count=90, in_flight=24, during=nodes[0].kill)
    assert not _failures(results), _failures(results)[:3]


def test_status_lists_every_node_with_models_labels_and_state(cluster: Cluster) -> None:
    nodes = _mesh(cluster, 3, extra=["--label", "room=lab"])
    rows = nodes[0].status()
    assert [r["node"] for r in rows][0] == "n0"
    by_node = {r["node"]: r for r in rows}
    assert set(by_node) == {"n0", "n1", "n2"}
    for name in ("n1", "n2"):
        assert by_node[name]["state"] == "alive"
        assert by_node[name]["labels"]["room"] == "lab"
        assert "sleep:150" in by_node[name]["models"]
        assert by_node[name]["last_heard_s"] < 1.0
