"""A client given one node's address learns the rest of the mesh from it (real node processes on loopback): when
that node is killed, its requests finish elsewhere and new ones go to the others at once."""

from __future__ import annotations

import asyncio

import pytest
from scripted_node import wait_until

from bench.procs import Cluster, NodeProc
from mesh import AsyncClient, Client
from tests.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(90)

MODEL = "sleep:300"


def three_nodes(cluster: Cluster) -> list[NodeProc]:
    a = cluster.add("a", [*LOOPBACK, "--model", f"{MODEL}:cap=8"])
    others = [cluster.add(name, [*LOOPBACK, "--model", f"{MODEL}:cap=8", "--peer", a.address]) for name in "bc"]
    cluster.wait_converged(15)
    return [a, *others]


def endpoint(node: NodeProc) -> str:
    return f"tcp://{node.address}"


def test_a_client_given_one_address_loses_nothing_when_that_node_is_killed(cluster: Cluster) -> None:
    a, b, c = three_nodes(cluster)
    with Client(a.address, timeout=30) as client:
        wait_until(lambda: len(client.connected) == 3, 10, "the client to learn b and c from a and connect")
        assert set(client.learned) == {endpoint(b), endpoint(c)} and client.endpoints == (endpoint(a),)
        futures = [client.submit(MODEL, "complete", f"request {i}") for i in range(24)]
        wait_until(lambda: sum(v[0] for v in a.status()[0]["models"].values()) > 0, 5, "work in flight at a")
        a.kill()
        results = [f.result(timeout=20) for f in futures]
        assert [r.output for r in results] == [f"request {i}" for i in range(24)]
        assert {r.node for r in results} <= {"b", "c"}, "a died before it could answer any of them"
        wait_until(lambda: endpoint(a) not in client.connected, 2, "the client to see a's connection close")
        after = [client.request(MODEL, "complete", f"after {i}", timeout=5) for i in range(4)]
    assert all(r.node in ("b", "c") and r.tries == 1 for r in after), "new requests went straight to b and c"


def test_an_async_client_given_one_address_loses_nothing_when_that_node_is_killed(cluster: Cluster) -> None:
    a, b, c = three_nodes(cluster)

    async def scenario() -> None:
        async with AsyncClient(a.address, timeout=30) as client:
            await client.ping(timeout=5)
            while len(client.connected) < 3:
                await asyncio.sleep(0.01)
            assert set(client.learned) == {endpoint(b), endpoint(c)}
            futures = [client.submit(MODEL, "complete", f"request {i}") for i in range(16)]
            await asyncio.sleep(0)
            a.kill()
            results = await asyncio.gather(*futures)
            assert [r.output for r in results] == [f"request {i}" for i in range(16)]
            while endpoint(a) in client.connected:
                await asyncio.sleep(0.01)
            after = await client.request(MODEL, "complete", "after", timeout=5)
            assert after.node in ("b", "c") and after.tries == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_client_that_does_not_learn_holds_only_the_given_node(cluster: Cluster) -> None:
    a, _, _ = three_nodes(cluster)
    with Client(a.address, timeout=10, learn=False) as client:
        assert client.request(MODEL, "complete", "x").output == "x"
        assert client.connected == (endpoint(a),) and client.learned == ()
