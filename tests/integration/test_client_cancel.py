"""A call that ends without an answer is cancelled on the node running it: on the wire (scripted nodes record every
`Cancel` they get, and never answer one), and with real nodes (the serving node's in-flight count drops to 0)."""

from __future__ import annotations

import asyncio
import gc
import io
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from scripted_node import ScriptedNode, SpawnedNode, free_port, node_status, wait_until

from bench.procs import Cluster, NodeProc
from mesh import AsyncClient, Client, DeadlineExceeded, InternalError, MeshUnavailable
from nodes.cli.console import ChatSession
from tests.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def node() -> Iterator[ScriptedNode]:
    with ScriptedNode("T") as n:
        yield n


def held(node: ScriptedNode, count: int = 1) -> None:
    wait_until(lambda: len(node.router.ids) >= count, 5, f"{count} request(s) to reach the node")


def cancelled(node: ScriptedNode, count: int = 1) -> list[tuple[str, str]]:
    wait_until(lambda: len(node.router.cancels) >= count, 2, f"{count} Cancel(s) to reach the node")
    return node.router.cancels


# ----------------------------------------------------------------- the threaded client


def test_a_cancelled_future_cancels_its_request_on_the_node(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        future = client.submit("never", "infer", 1)
        held(node)
        assert future.cancel()
        assert cancelled(node) == [(node.router.ids[0], "cancelled")]
        assert client.request("echo", "infer", 2).output == 2  # nothing waits for an answer to the Cancel


def test_a_stream_closed_early_is_cancelled_on_its_node_and_stops_there(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        stream = client.complete("stream:40:50", "count", stream=True)
        assert [next(stream), next(stream)] == ["w0 ", "w1 "]
        stream.close()
        assert cancelled(node) == [(node.router.ids[0], "stream closed")]
        assert list(stream) == []


def test_a_stream_dropped_unread_is_cancelled_when_it_is_collected(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        stream = client.complete("stream:40:50", "count", stream=True)
        assert next(stream) == "w0 "
        del stream
        gc.collect()
        assert cancelled(node) == [(node.router.ids[0], "stream closed")]


def test_ctrl_c_in_a_blocked_request_cancels_it_on_its_node(node: ScriptedNode) -> None:
    assert threading.current_thread() is threading.main_thread(), "SIGINT reaches only the main thread"
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)

        def press_ctrl_c() -> None:
            held(node)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

        presser = threading.Thread(target=press_ctrl_c)
        presser.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                client.request("never", "infer", 1, timeout=10)
        finally:
            presser.join(10)
        assert cancelled(node) == [(node.router.ids[0], "interrupted")]
        assert client.request("echo", "infer", 2).output == 2  # the interrupted caller left the sockets readable


def test_a_passed_deadline_cancels_the_request_on_its_node(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)
        with pytest.raises(DeadlineExceeded):
            client.request("never", "infer", 1, timeout=0.3)
        assert cancelled(node) == [(node.router.ids[0], "deadline")]


def test_close_cancels_every_request_in_flight_and_waits_for_no_answer(node: ScriptedNode) -> None:
    client = Client(node.endpoint, timeout=20)
    futures = [client.submit("never", "infer", i) for i in range(3)]
    held(node, 3)
    started = time.monotonic()
    client.close()
    took = time.monotonic() - started
    assert sorted(cancelled(node, 3)) == sorted((rid, "client closed") for rid in node.router.ids)
    assert all(isinstance(f.exception(timeout=1), MeshUnavailable) for f in futures)
    assert took < 1.0, f"close() took {took:.2f}s"


def test_a_try_abandoned_at_the_try_timeout_is_cancelled_on_its_node() -> None:
    with (
        ScriptedNode("H", mode="hold") as hung,
        ScriptedNode("S") as serving,
        Client([hung.endpoint, serving.endpoint], timeout=20, try_timeout=0.3, learn=False) as client,
    ):
        wait_until(lambda: len(client.connected) == 2, 5, "both nodes connected")
        results = [client.request("echo", "infer", i) for i in range(4)]
        assert [r.output for r in results] == list(range(4)) and {r.node for r in results} == {"S"}
        assert hung.router.ids, "round-robin sent some requests to the hung node first"
        assert cancelled(hung, len(hung.router.ids)) == [(rid, "try timeout") for rid in hung.router.ids]
        assert serving.router.cancels == []


def test_work_re_sent_off_a_hung_node_is_cancelled_there_when_it_wakes() -> None:
    later = free_port()
    with SpawnedNode("A", mode="hold") as a, Client([a.endpoint, f"127.0.0.1:{later}"], timeout=20) as client:
        futures = [client.submit("echo", "infer", i) for i in range(4)]
        wait_until(lambda: node_status(a.endpoint)["held"] == 4, 10, "all 4 requests held by node A")
        with SpawnedNode("B", port=later):
            wait_until(lambda: len(client.connected) == 2, 10, "the client to connect to node B")
            a.pause()  # SIGSTOP: caught by heartbeats, its requests go to B
            assert [f.result(timeout=10).node for f in futures] == ["B"] * 4
            a.resume()
            wait_until(lambda: len(node_status(a.endpoint)["cancels"]) == 4, 10, "the Cancels owed to A")
        assert {reason for _, reason in node_status(a.endpoint)["cancels"]} == {"node lost"}


def test_ctrl_c_in_lanmesh_chat_cancels_the_answer_on_its_node(node: ScriptedNode) -> None:
    class CtrlCAfterOnePiece(io.StringIO):
        def write(self, text: str) -> int:
            if text.startswith("w1"):
                raise KeyboardInterrupt
            return super().write(text)

    out = CtrlCAfterOnePiece()
    with Client(node.endpoint, timeout=20) as client:
        session = ChatSession(client, "stream:40:50", {}, out, io.StringIO(), False, [])
        assert session.turn("count")  # what was shown is kept
        assert cancelled(node) == [(node.router.ids[0], "stream closed")]
    assert "w0 " in out.getvalue() and "[interrupted]" in out.getvalue()


# ----------------------------------------------------------------- the asyncio client


def test_async_cancelling_the_awaiting_task_or_the_future_cancels_the_request_on_its_node(node: ScriptedNode) -> None:
    async def scenario() -> None:
        async with AsyncClient(node.endpoint, timeout=20) as client:
            task = asyncio.ensure_future(client.request("never", "infer", 1))
            while len(node.router.ids) < 1:
                await asyncio.sleep(0.01)
            task.cancel()
            future = client.submit("never", "infer", 2)
            while len(node.router.ids) < 2:
                await asyncio.sleep(0.01)
            future.cancel()
            stream = await client.complete("stream:40:50", "count", stream=True)
            assert await stream.__anext__() == "w0 "
            await stream.aclose()
            while len(node.router.cancels) < 3:
                await asyncio.sleep(0.01)
            assert (await client.request("echo", "infer", 3)).output == 3

    asyncio.run(asyncio.wait_for(scenario(), 20))
    ids = node.router.ids
    assert node.router.cancels == [(ids[0], "cancelled"), (ids[1], "cancelled"), (ids[2], "stream closed")]


def test_async_close_cancels_every_request_in_flight(node: ScriptedNode) -> None:
    async def scenario() -> list[BaseException | Any]:
        client = AsyncClient(node.endpoint, timeout=20)
        futures = [client.submit("never", "infer", i) for i in range(3)]
        while len(node.router.ids) < 3:
            await asyncio.sleep(0.01)
        await client.close()
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert all(isinstance(o, MeshUnavailable) for o in outcomes)
    assert sorted(cancelled(node, 3)) == sorted((rid, "client closed") for rid in node.router.ids)


def test_async_client_refuses_new_calls_once_its_reader_died(node: ScriptedNode) -> None:
    async def scenario() -> None:
        client = AsyncClient(node.endpoint, timeout=20)
        try:
            await client.ping(timeout=5)
            pending = client.submit("slow:100", "infer", 1)

            def broken(endpoint: str, frame: bytes, now: float) -> None:
                raise RuntimeError("a bug in the reader")

            client._table.receive = broken  # type: ignore[method-assign]
            with pytest.raises(InternalError, match="reader crashed"):
                await pending
            with pytest.raises(MeshUnavailable, match="client closed: its reader stopped"):
                client.submit("echo", "infer", 2)
            with pytest.raises(MeshUnavailable, match="client closed"):
                await client.chat("say", [{"role": "user", "content": "hi"}], stream=True)
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


# ----------------------------------------------------------------- with real nodes


def serving_load(nodes: list[NodeProc]) -> int:
    """Requests in flight or queued on the nodes, by their own status rows."""
    return sum(sum(v[0] + v[1] for v in n.status()[0]["models"].values()) for n in nodes)


def bad_frames(nodes: list[NodeProc]) -> int:
    return sum(int(n.status()[0].get("stats", {}).get("bad_frames", 0)) for n in nodes)


@pytest.mark.parametrize("how", ["future.cancel()", "Stream.close()"])
def test_a_cancel_frees_the_serving_node_within_half_a_second(cluster: Cluster, how: str) -> None:
    """Depends on the node side of Cancel (the entry cancels the request and its try on the serving peer, the
    executor drops or stops it): on nodes that do not act on Cancel yet this xfails, saying so."""
    a = cluster.add("a", [*LOOPBACK, "--model", "sleep:5000:cap=2"])
    b = cluster.add("b", [*LOOPBACK, "--model", "sleep:5000:cap=2", "--peer", a.address])
    cluster.wait_converged(10)
    nodes = [a, b]
    frames_before = bad_frames(nodes)
    with Client(a.address, timeout=30) as client:
        if how == "future.cancel()":
            future = client.submit("sleep:5000", "complete", "x")
            wait_until(lambda: serving_load(nodes) > 0, 5, "the request to run on a node")
            assert future.cancel()
        else:
            stream = client.complete("sleep:5000", "x", stream=True)
            wait_until(lambda: serving_load(nodes) > 0, 5, "the stream to run on a node")
            stream.close()
        cancelled_at = time.monotonic()
        while serving_load(nodes) and time.monotonic() < cancelled_at + 2:
            time.sleep(0.02)
        took = time.monotonic() - cancelled_at
    if took > 0.5 and bad_frames(nodes) > frames_before:
        pytest.xfail("these nodes drop a Cancel as a bad frame: the node side of Cancel has not landed")
    assert took <= 0.5, f"the serving node still ran the cancelled request {took:.2f}s after {how}"
