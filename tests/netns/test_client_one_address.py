"""One address is enough: a client on a host of its own, given one node of three, keeps every request when that node
is killed (it learned the others from it), and its new requests go to the others at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.hosts import Lan
from bench.procs import NodeProc

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
PORT = 7000
MODEL = "sleep:100"


@pytest.fixture
def three_node_lan(make_lan: Callable[[int], Lan], tmp_path: Path, keyed: Path) -> Iterator[tuple[Lan, list[NodeProc]]]:
    """Host 0 is the client's; hosts 1..3 run nodes (mDNS on, the test mesh key), stopped by PID afterwards."""
    lan = make_lan(4)
    nodes: list[NodeProc] = []

    def start(index: int) -> NodeProc:
        host, name = lan.hosts[index], f"h{index}"

        def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
            log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
            return lan.spawn(host, cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), text=False)

        node = NodeProc(name, ["--model", f"{MODEL}:cap=4", "--grace", "5"], host=host.ip, port=PORT, spawn=spawn)
        node.log_path = tmp_path / f"{name}.log"
        node.start(wait=0)
        return node

    try:
        nodes.extend(start(i) for i in (1, 2, 3))
        yield lan, nodes
    finally:
        for node in nodes:
            node.stop(timeout=10)


def test_killing_the_one_node_a_client_was_given_loses_no_request(
    three_node_lan: tuple[Lan, list[NodeProc]], tmp_path: Path
) -> None:
    lan, (h1, h2, h3) = three_node_lan
    client_host = lan.hosts[0]
    converge = [sys.executable, "-m", "bench.loadgen", "converge", "--timeout", "20"]
    done = lan.exec(client_host, [*converge, "--nodes", ",".join(n.address for n in (h1, h2, h3))], timeout=60)
    views = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert views and views[-1].get("converged"), f"no convergence: {done.stdout}\n{done.stderr[-2000:]}"

    count, samples = 300, tmp_path / "samples.json"
    argv = [sys.executable, "-m", "bench.loadgen", "load", "--nodes", h1.address, "--model", MODEL]  # ONE address
    argv += ["--count", str(count), "--in-flight", "16", "--timeout", "10", "--samples", str(samples)]
    proc = lan.spawn(client_host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    assert proc.stdout is not None
    summary: dict[str, Any] | None = None
    killed_at = 0.0
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "progress" and not killed_at and event["done"] >= count // 3:
            h1.kill()  # kill -9, with 16 requests in flight through it
            killed_at = time.monotonic()  # monotonic time is shared by every namespace, so it lines up with loadgen's
        elif event["event"] == "summary":
            summary = event
    proc.wait(60)
    assert summary is not None, f"the load generator died: {proc.stderr.read() if proc.stderr else ''}"
    assert killed_at, "the load finished before the node was killed"

    assert summary["failed"] == 0, summary["failures"]
    assert summary["ok"] == count
    rows = json.loads(samples.read_text())
    t0 = rows["t0"]
    after = [(start, end, node) for start, end, _, node in rows["rows"] if t0 + start > killed_at]
    assert len(after) >= count // 2, "most of the load was sent after the kill"
    assert {node for _, _, node in after} <= {"h2", "h3"}, "requests sent after the kill were served by the others"
    # At once: a request sent after the kill waits only for the model and its queue, never for a timeout
    # (the client's deadline is 10 s; without the other nodes it would have failed at it).
    slowest = max(end - start for start, end, _ in after)
    assert slowest < 2.0, f"a request sent after the kill took {slowest:.2f}s"
