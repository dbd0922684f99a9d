"""One node on loopback, driven through the client library and a raw DEALER (real ZeroMQ, real process)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from concurrent.futures import Future

import msgpack
import pytest
import zmq

from bench.procs import Cluster
from mesh import AsyncClient, BadRequest, Client, DeadlineExceeded, ModelNotFound, Overloaded, client_security
from protocol import VERSION, Error, ErrorCode, Reject, Reply, Request, Task, decode, encode
from tests.conftest import LOOPBACK


def _dealer(address: str) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    client_security().configure_client(sock)  # the test mesh key (see tests/conftest.py)
    sock.connect(f"tcp://{address}")
    return sock


def _recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> object:
    assert sock.poll(int(timeout * 1000)), "the node did not answer"
    return decode(sock.recv())


def _stats(node: object) -> dict[str, int]:
    return node.status()[0]["stats"]  # type: ignore[attr-defined, no-any-return]


def test_echo_request_is_served_and_names_the_node(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "echo"])
    with Client(node.address) as client:
        result = client.request("echo", "complete", "hello mesh")
        chat = client.chat("echo", [{"role": "user", "content": "hi there"}])
    assert result.output == "hello mesh"
    assert result.node == "solo"
    assert result.route == "local"
    assert chat.text == "hi there"


def test_a_stream_of_any_task_with_raw_params_from_both_clients(cluster: Cluster) -> None:
    """`Client.stream` / `AsyncClient.stream`: what the gateway uses for tools and guidance (params as they are)."""
    node = cluster.add("solo", [*LOOPBACK, "--model", "echo"])
    params = {"max_tokens": 8, "guidance": None, "custom": [1, 2]}
    with Client(node.address) as client:
        assert list(client.stream("echo", "complete", "one two three", params=params)) == ["one ", "two ", "three"]

    async def streamed() -> list[str]:
        async with AsyncClient(node.address) as aclient:
            stream = await aclient.stream("echo", "chat", [{"role": "user", "content": "a b"}], params=params)
            return [piece async for piece in stream]

    assert asyncio.run(streamed()) == ["a ", "b"]
    with Client(node.address) as client, pytest.raises(ValueError):
        client.stream("echo", "not-a-task", "x")


def test_many_requests_in_flight_on_one_client(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "sleep:20:cap=8"])
    with Client(node.address) as client:
        futures = [client.submit("sleep:20", "complete", f"job {i}") for i in range(64)]
        outputs = sorted(f.result(timeout=30).output for f in futures)
    assert outputs == sorted(f"job {i}" for i in range(64))


def test_bad_input_gets_clear_errors_and_the_node_keeps_serving(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "echo"])
    sock = _dealer(node.address)
    try:
        # Garbage that cannot be answered: dropped and counted.
        sock.send(b"\x00\x01\x02 not a frame")
        sock.send(b"")
        sock.send(bytes([VERSION]) + b"\xc1\xc1\xc1")
        # Answerable mistakes: each gets a BAD_REQUEST naming the request.
        bad = {
            "wrong-type": [1, "wrong-type", "echo", "complete", 42],
            "no-task": [1, "no-task", "echo", "paint", "x"],
            "neg-deadline": [1, "neg-deadline", "echo", "complete", "x", {}, -1],
            "absurd-deadline": [1, "absurd-deadline", "echo", "complete", "x", {}, 10**13],
        }
        for body in bad.values():
            sock.send(bytes([VERSION]) + msgpack.packb(body))
        answers = {}
        for _ in bad:
            msg = _recv(sock)
            assert isinstance(msg, Error)
            answers[msg.id] = msg
        assert set(answers) == set(bad)
        assert all(a.code is ErrorCode.BAD_REQUEST for a in answers.values())
        assert "deadline_ms must be between" in answers["neg-deadline"].message
        # An unknown model is a different, specific error.
        sock.send(encode(Request("unknown", "no-such-model", Task.COMPLETE, "x")))
        msg = _recv(sock)
        assert isinstance(msg, Error) and msg.code is ErrorCode.UNKNOWN_MODEL
        assert "no-such-model" in msg.message
        # And valid work still flows.
        sock.send(encode(Request("good", "echo", Task.COMPLETE, "still here")))
        msg = _recv(sock)
        assert isinstance(msg, Reply) and msg.output == "still here"
    finally:
        sock.close(0)
    assert _stats(node)["bad_frames"] >= 7
    with Client(node.address) as client:
        with pytest.raises(ModelNotFound):
            client.request("no-such-model", "complete", "x")
        with pytest.raises(BadRequest):
            client.request("echo", "chat", "not a message list")


def test_oversized_frame_is_dropped_without_harming_the_node(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "echo"])
    sock = _dealer(node.address)
    try:
        sock.send(encode(Request("huge", "echo", Task.COMPLETE, "x" * (9 * 1024 * 1024))))
        assert not sock.poll(500), "an oversized frame must not be answered"
    finally:
        sock.close(0)
    with Client(node.address) as client:
        assert client.request("echo", "complete", "fine").output == "fine"


def test_full_queue_answers_overloaded_and_leaks_no_slot(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "sleep:200:cap=1", "--max-queue", "2"])
    with Client(node.address, timeout=20) as client:
        futures: list[Future[object]] = [client.submit("sleep:200", "complete", f"{i}") for i in range(10)]
        served, overloaded = 0, 0
        for f in futures:
            try:
                f.result(timeout=20)
                served += 1
            except Overloaded:
                overloaded += 1
        assert overloaded > 0, "a full queue must refuse, not grow"
        assert served >= 3  # one running + two queued at least
        assert served + overloaded == 10
        # Every slot came back: the node is idle and serves again.
        load = node.status()[0]["models"]["sleep:200"]
        assert load[:2] == [0, 0]
        assert client.request("sleep:200", "complete", "after").output == "after"


def test_expired_deadline_is_dropped_not_run(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "sleep:400:cap=1"])
    with Client(node.address, timeout=10) as client:
        first = client.submit("sleep:400", "complete", "slow")
        deadline = time.monotonic() + 5
        while node.status()[0]["models"]["sleep:400"][0] != 1:  # until the first one occupies the only slot
            assert time.monotonic() < deadline, "the first request never started"
        with pytest.raises(DeadlineExceeded):
            client.request("sleep:400", "complete", "late", timeout=0.15)
        assert first.result(timeout=10).output == "slow"
    # The late request expired in the queue: the model ran exactly one request.
    assert node.status()[0]["executor"]["sleep:400"]["batched_requests"] == 1


def test_raw_deadline_error_reply_from_node(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "sleep:300:cap=1"])
    sock = _dealer(node.address)
    try:
        sock.send(encode(Request("a", "sleep:300", Task.COMPLETE, "x", deadline_ms=5000)))
        sock.send(encode(Request("b", "sleep:300", Task.COMPLETE, "x", deadline_ms=100)))
        got = {}
        for _ in range(2):
            msg = _recv(sock)
            got[msg.id] = msg  # type: ignore[attr-defined]
        assert isinstance(got["a"], Reply)
        assert isinstance(got["b"], Error) and got["b"].code is ErrorCode.DEADLINE_EXCEEDED
    finally:
        sock.close(0)


def test_sigterm_finishes_in_flight_work_then_exits_zero(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "sleep:600:cap=2", "--grace", "10"])
    with Client(node.address, timeout=15) as client:
        futures = [client.submit("sleep:600", "complete", f"w{i}") for i in range(2)]
        end = time.monotonic() + 10
        while node.status()[0]["models"]["sleep:600"][0] < 2 and time.monotonic() < end:
            time.sleep(0.01)  # until both are running: SIGTERM must find them in flight
        node.signal(signal.SIGTERM)
        assert sorted(f.result(timeout=15).output for f in futures) == ["w0", "w1"]
    assert node.proc is not None and node.proc.wait(15) == 0


def test_forwarded_request_to_a_full_node_is_rejected_with_its_queue_length(cluster: Cluster) -> None:
    node = cluster.add("solo", [*LOOPBACK, "--model", "sleep:300:cap=1", "--max-queue", "1"])
    sock = _dealer(node.address)
    try:
        ids = [uuid.uuid4().hex for _ in range(3)]
        # hops=1: as if another node forwarded them. The first takes the only slot...
        sock.send(encode(Request(ids[0], "sleep:300", Task.COMPLETE, "x", hops=1)))
        end = time.monotonic() + 5
        while node.status()[0]["models"]["sleep:300"][0] != 1 and time.monotonic() < end:
            time.sleep(0.01)
        # ...the second fills the queue, the third finds it full.
        for rid in ids[1:]:
            sock.send(encode(Request(rid, "sleep:300", Task.COMPLETE, "x", hops=1)))
        kinds = [type(_recv(sock)) for _ in ids]
        assert Reject in kinds
        assert kinds.count(Reply) == 2
    finally:
        sock.close(0)
