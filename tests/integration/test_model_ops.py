"""Models on a running mesh: listed with their versions and files, fetched from peers (through a sender's death and
a corrupted chunk), loaded, switched, drained and rolled out without a failed request. Node processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from bench.procs import ROOT, Cluster, NodeProc
from mesh import Client, MeshKey, ModelNotFound
from nodes.cli.model_commands import AdminError, admin_call, mesh_models, rollout
from tests.conftest import LOOPBACK

pytestmark = pytest.mark.timeout(240)


def _need_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "tokenizers", "numpy") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'lanmesh[models]')")


@pytest.fixture
def emb_model(tmp_path: Path) -> Path:
    _need_onnx()
    from bench.model_files import make_lookup_embedder

    return make_lookup_embedder(tmp_path / "emb-src", megabytes=12.0)


def _eventually(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def _models_of(node: NodeProc, key: Path) -> dict[str, Any]:
    return admin_call(node.address, "models", {}, MeshKey.load(key), 5.0)


def lanmesh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nodes.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip


def test_lanmesh_models_lists_every_nodes_models_with_version_backend_and_files(
    cluster: Cluster, keyed: Path, emb_model: Path
) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "echo", "--model", f"name=emb,path={emb_model}"])
    cluster.add("b", [*LOOPBACK, "--model", "name=chat,kind=sleep,ms=5", "--peer", a.address])
    cluster.wait_converged(timeout=15)
    out = lanmesh("models", "--node", a.address, "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in json.loads(out.stdout)}
    assert set(rows) == {"a", "b"}
    emb = next(m for m in rows["a"]["models"] if m["name"] == "emb")
    assert len(emb["version"]) == 8 and emb["state"] == "ready" and emb["kind"] == "onnx-embed"
    assert {f["path"] for f in emb["files"]} >= {"model.onnx", "tokenizer.json"}
    assert emb["bytes"] > 12_000_000
    assert [m["name"] for m in rows["b"]["models"]] == ["chat"]
    table = lanmesh("models", "--node", a.address)
    assert table.returncode == 0 and "emb" in table.stdout and emb["version"] in table.stdout


def test_a_node_lacking_a_models_files_fetches_them_from_a_peer_and_serves_them(
    cluster: Cluster, keyed: Path, emb_model: Path, tmp_path: Path
) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", f"name=emb,path={emb_model}"])
    b = cluster.add(
        "b",
        [*LOOPBACK, "--model", f"name=emb,path={tmp_path}/not-here/model.onnx", "--peer", a.address],  # nothing else
        env={"LANMESH_CACHE_DIR": str(tmp_path / "b-cache")},
    )
    b_emb = _eventually(
        lambda: next((m for m in _models_of(b, keyed)["models"] if m["name"] == "emb" and m["state"] == "ready"), None),
        what="b serving emb",
    )
    a_emb = next(m for m in _models_of(a, keyed)["models"] if m["name"] == "emb")
    assert b_emb["version"] == a_emb["version"], "the copy must be byte for byte the peer's"
    pulls = _models_of(b, keyed)["pulls"]
    assert pulls and pulls[0]["state"] == "done" and pulls[0]["from"] == ["a"] and pulls[0]["progress"] == 1.0
    with Client(b.address, timeout=10) as client:
        vec = client.embed("emb@" + b_emb["version"], "w1 w2")[0]  # pinned: the version b pulled
    assert len(vec) == 64
    # It stays: restarted, b serves its pulled copy at once, without asking anyone.
    b.stop()
    again = cluster.add("b2", [*LOOPBACK, "--model", f"name=emb,path={tmp_path}/not-here/model.onnx"],
                        env={"LANMESH_CACHE_DIR": str(tmp_path / "b-cache")})  # fmt: skip
    assert any(m["name"] == "emb" for m in _models_of(again, keyed)["models"])


def test_a_pull_completes_when_one_sender_dies_and_another_lies(
    cluster: Cluster, keyed: Path, emb_model: Path, tmp_path: Path
) -> None:
    """Three holders: a dies mid-transfer, c's disk has rotted (every chunk it sends fails its hash), d is sound.
    The pull finishes with the original bytes, c's chunks fetched again from d and c dropped as a source."""
    slow = ["--transfer-rate", "8"]  # 1 MB/s per sender: the 12 MB model takes seconds, time to kill one
    copy = tmp_path / "emb-copy"
    copy.mkdir()
    for f in emb_model.parent.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    a = cluster.add("a", [*LOOPBACK, *slow, "--model", f"name=emb,path={emb_model}"])
    c = cluster.add("c", [*LOOPBACK, *slow, "--model", f"name=emb,path={copy / 'model.onnx'}", "--peer", a.address])
    d = cluster.add("d", [*LOOPBACK, *slow, "--model", f"name=emb,path={emb_model}", "--peer", a.address])
    cluster.wait_converged(timeout=15)
    key = MeshKey.load(keyed)
    # c hashes its files on the first fetch (its manifest); afterwards its disk silently flips a bit in every chunk.
    from protocol import Fetch, decode, encode

    version = next(m["version"] for m in _models_of(c, keyed)["models"] if m["name"] == "emb")
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    key.configure_client(sock)
    sock.connect(f"tcp://{c.address}")
    sock.send(encode(Fetch("m1", "emb", version)))
    assert sock.poll(10_000) and decode(sock.recv()).id == "m1"
    sock.close(0)
    raw = bytearray((copy / "model.onnx").read_bytes())
    for at in range(100, len(raw), 1024 * 1024):
        raw[at] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(raw))
    b = cluster.add("b", [*LOOPBACK, "--model", "echo", "--peer", a.address],
                    env={"LANMESH_CACHE_DIR": str(tmp_path / "b-cache")})  # fmt: skip
    cluster.wait_converged(timeout=15)
    result: dict[str, Any] = {}

    def pull() -> None:
        try:
            result["out"] = admin_call(b.address, "pull", {"name": "emb", "version": version}, key, 120)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    puller = threading.Thread(target=pull)
    puller.start()

    def a_third_done() -> bool:
        pulls = _models_of(b, keyed)["pulls"]
        return bool(pulls) and pulls[0]["progress"] >= 0.3

    _eventually(a_third_done, what="the pull to get a third of the way")
    a.kill()  # one sender dies mid-transfer
    puller.join(120)
    log = b.log_tail(200)
    assert "error" not in result, f"{result.get('error')}\n{log}"
    pulled = Path(result["out"]["path"])
    assert (pulled / "model.onnx").read_bytes() == emb_model.read_bytes(), "the copy must be the original, intact"
    assert "failed its hash" in log and "dropping c as a source" in log and "dropping a as a source" in log, log
    done = _models_of(b, keyed)["pulls"][0]
    assert done["state"] == "done" and done["progress"] == 1.0
    assert d.alive()


def test_unload_lets_running_requests_finish_and_routes_new_ones_elsewhere(cluster: Cluster, keyed: Path) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "name=slow,kind=sleep,ms=1500,cap=2"])
    cluster.add("b", [*LOOPBACK, "--model", "name=slow,kind=sleep,ms=1500,cap=2", "--peer", a.address])
    cluster.wait_converged(timeout=15)
    key = MeshKey.load(keyed)
    with Client(a.address, timeout=30) as client:
        running = [client.submit("slow", "complete", f"r{i}", require=None) for i in range(2)]
        _eventually(lambda: a.status()[0]["models"].get("slow", [0])[0] >= 1, what="work running on a")
        drained: dict[str, Any] = {}
        unload = threading.Thread(target=lambda: drained.update(admin_call(a.address, "unload", {"name": "slow"},
                                                                           key, 60)))  # fmt: skip
        unload.start()
        _eventually(lambda: "slow" not in a.status()[0]["models"], what="a to stop offering slow")
        later = [client.submit("slow", "complete", f"n{i}") for i in range(3)]
        results = [f.result(timeout=30) for f in running + later]
        unload.join(30)
    assert all(r.output for r in results)
    assert {r.node for r in results[2:]} == {"b"}, "nothing new may go to a model being unloaded"
    assert drained["handed_back"] == 0


def test_a_rollout_under_load_fails_no_request_and_leaves_every_node_on_the_new_version(
    cluster: Cluster, keyed: Path
) -> None:
    old_spec, new_spec = "name=chat,kind=sleep,ms=20,cap=4", "name=chat,kind=sleep,ms=15,cap=4"
    first = cluster.add("n1", [*LOOPBACK, "--model", old_spec])
    for name in ("n2", "n3"):
        cluster.add(name, [*LOOPBACK, "--model", old_spec, "--peer", first.address])
    cluster.wait_converged(timeout=15)
    key = MeshKey.load(keyed)
    stop = threading.Event()
    outcomes: list[Future[Any]] = []

    with Client([n.address for n in cluster.nodes], timeout=30) as client:

        def load() -> None:
            while not stop.is_set():
                batch = [client.submit("chat", "complete", "x") for _ in range(8)]
                outcomes.extend(batch)
                for f in batch:
                    f.exception(timeout=30)

        loader = threading.Thread(target=load)
        loader.start()
        _eventually(lambda: len(outcomes) >= 40, what="the load to be under way")
        steps = rollout(first.address, "chat", new_spec, key, 60, say=lambda _line: None)
        stop.set()
        loader.join(60)
    failures = [f.exception() for f in outcomes if f.exception() is not None]
    assert not failures, f"{len(failures)} of {len(outcomes)} failed: {failures[:3]}"
    assert len(steps) == 3 and len({s["new"] for s in steps}) == 1
    new = steps[0]["new"]
    for row in mesh_models(first.address, key):
        assert [(m["name"], m["version"]) for m in row["models"]] == [("chat", new)], row


def test_a_request_pinned_to_a_version_nobody_serves_says_so(cluster: Cluster, keyed: Path) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "name=chat,kind=sleep,ms=5"])
    version = _models_of(a, keyed)["models"][0]["version"]
    with Client(a.address, timeout=10) as client:
        assert client.request(f"chat@{version}", "complete", "x").output == "x"
        with pytest.raises(ModelNotFound):
            client.request("chat@00000000", "complete", "x")


def test_status_shows_each_loaded_version_once_and_pins_reach_a_version_loaded_beside(
    cluster: Cluster, keyed: Path
) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "name=chat,kind=sleep,ms=5,cap=2"])
    key = MeshKey.load(keyed)
    old = _models_of(a, keyed)["models"][0]["version"]
    tasks = ["chat", "complete", "embed", "infer"]  # what a synthetic model serves
    assert a.status()[0]["models"] == {"chat": [0, 0, 2, old, tasks]}, "the current version appears once"
    beside = admin_call(a.address, "load", {"spec": "name=chat,kind=sleep,ms=6,cap=2", "current": False}, key, 30)
    new = beside["version"]
    shown = _eventually(lambda: a.status()[0]["models"] if len(a.status()[0]["models"]) == 2 else None,
                        what="the second version in the status")  # fmt: skip
    assert shown == {"chat": [0, 0, 2, old, tasks], f"chat@{new}": [0, 0, 2, new, tasks]}
    with Client(a.address, timeout=10) as client:
        assert client.request(f"chat@{new}", "complete", "x").output == "x"  # the version that is not current
        assert client.request(f"chat@{old}", "complete", "x").output == "x"  # the current one, by its pin


def test_a_model_loaded_on_a_running_node_that_would_not_fit_is_refused_and_the_node_serves_on(
    cluster: Cluster, keyed: Path, tmp_path: Path
) -> None:
    _need_onnx()
    from bench.model_files import make_lookup_embedder

    big = make_lookup_embedder(tmp_path / "big", megabytes=64.0)
    a = cluster.add("a", [*LOOPBACK, "--model", "echo", "--max-memory", "110M"])  # a node of ~60 MB: ~50 MB free
    with pytest.raises(AdminError, match=r"model big needs about .* --max-memory"):
        admin_call(a.address, "load", {"spec": f"name=big,path={big}"}, MeshKey.load(keyed), 30)
    assert [m["name"] for m in _models_of(a, keyed)["models"]] == ["echo"]
    with Client(a.address, timeout=10) as client:
        assert client.request("echo", "complete", "still here").output == "still here"
