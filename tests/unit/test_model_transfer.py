"""Model transfer between members: manifests that cannot be trusted are refused, chunks are checked, a pull resumes
where it stopped, and a sender's rate cap holds. Real ZeroMQ sockets on 127.0.0.1 stand in for the peers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mesh import Plaintext
from nodes.models.cache import CACHE_MARKER, folder_digest
from nodes.models.catalog import (
    CHUNK_BYTES,
    Catalog,
    ManifestError,
    ModelEntry,
    PullProgress,
    check_manifest,
    make_manifest,
    safe_path,
)
from nodes.models.transfer import ChunkServer, Puller, PullError, RateLimit
from protocol import Data, Error, ErrorCode, Fetch, decode, encode

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A model folder: a 3.5-chunk weights file in a subfolder and a small config."""
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "w.bin").write_bytes(os.urandom(CHUNK_BYTES * 3 + CHUNK_BYTES // 2))
    (folder / "config.json").write_text('{"layers": 2}')
    return folder


GARBAGE = object()  # a Peer answer: a frame that is no message at all


def _entry(folder: Path) -> ModelEntry:
    m = make_manifest("m", "onnx-embed", folder, {})
    return ModelEntry("m", m["version"], "onnx-embed", str(folder), folder, state="ready")


class Peer:
    """A ROUTER on 127.0.0.1 answering Fetches with `answer` (a real ChunkServer, or a liar); counts what it got."""

    def __init__(self, answer: Callable[[Fetch], Any]) -> None:
        self.answer = answer
        self.fetches: list[Fetch] = []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            msg = decode(frame)
            assert isinstance(msg, Fetch)
            self.fetches.append(msg)
            reply = self.answer(msg)
            if reply is GARBAGE:
                self.sock.send_multipart([ident, b"\x01\xc1 not msgpack"])
            elif reply is not None:
                self.sock.send_multipart([ident, encode(reply)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def _server(folder: Path, node: str) -> ChunkServer:
    catalog = Catalog()
    catalog.add(_entry(folder))
    return ChunkServer(catalog, node, RateLimit(None))


def _pull(version: str, sources: list[tuple[str, str]], cache: Path, **kw: Any) -> tuple[Path, Puller]:
    puller = Puller("m", version, sources, Plaintext(), PullProgress("m", version), cache_dir=cache, **kw)
    return puller.run(), puller


# ---------------------------------------------------------------- manifests


def test_a_manifest_checks_out_against_its_own_version(model: Path) -> None:
    m = make_manifest("m", "onnx-embed", model, {"precision": "fp32"})
    assert [f["path"] for f in m["files"]] == ["config.json", "weights/w.bin"]
    assert len(m["files"][1]["chunks"]) == 4  # 3.5 chunks
    checked = check_manifest(json.dumps(m).encode(), "m", m["version"][:8])
    assert checked["version"] == m["version"]


def test_a_manifest_that_does_not_hash_to_the_version_asked_for_is_refused(model: Path) -> None:
    m = make_manifest("m", "onnx-embed", model, {})
    m["files"][1]["sha256"] = hashlib.sha256(b"something else").hexdigest()  # a swapped file, same size
    with pytest.raises(ManifestError, match="not the version asked for"):
        check_manifest(json.dumps(m).encode(), "m", m["version"])


_BAD_PATHS = ["../evil", "/etc/passwd", "a/../../b", "C:/x", "", ".", "a/.", "a//b", "./a", "x\\..\\y", CACHE_MARKER]


@pytest.mark.parametrize("path", _BAD_PATHS)
def test_a_manifest_path_outside_the_models_folder_is_refused(path: str) -> None:
    with pytest.raises(ManifestError, match="refused a manifest path"):
        safe_path(path)


def test_a_manifest_whose_hash_matches_but_names_a_path_outside_the_cache_is_refused(model: Path) -> None:
    m = make_manifest("m", "onnx-embed", model, {})
    m["files"][0]["path"] = "../../.bashrc"  # a liar can make the hash match any paths it likes
    m["version"] = folder_digest([(f["path"], f["size"], f["sha256"]) for f in m["files"]])
    with pytest.raises(ManifestError, match="outside the model's folder"):
        check_manifest(json.dumps(m).encode(), "m", m["version"])


def test_the_kind_that_loads_a_model_is_covered_by_its_version(model: Path) -> None:
    """The kind chooses the engine a pulled copy runs on: a peer cannot keep the files and change the kind."""
    m = make_manifest("m", "onnx-embed", model, {})
    m["kind"] = "transformers"
    with pytest.raises(ManifestError, match="not the version asked for"):
        check_manifest(json.dumps(m).encode(), "m", m["version"])


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"name": "other"}, "names another model"),
        ({"kind": "echo"}, "names kind 'echo'"),
        ({"info": {"x": "y" * 10_000}}, "malformed info"),
        ({"info": ["not", "a", "map"]}, "malformed info"),
        ({"files": [{"path": "a", "size": 0, "sha256": "0" * 64, "chunks": []},
                    {"path": "a/b", "size": 0, "sha256": "0" * 64, "chunks": []}]}, "as a file and as a folder"),
        ({"files": [{"path": ".", "size": 0, "sha256": "0" * 64, "chunks": []}]}, "refused a manifest path '.'"),
        ({"files": [{"path": "a", "size": "12", "sha256": "0" * 64, "chunks": []}]}, "malformed entry"),
        ({"chunk": 1024, "files": [{"path": "a", "size": 10**30, "sha256": "0" * 64, "chunks": []}]}, "chunk hashes"),
    ],
)  # fmt: skip
def test_a_manifest_a_peer_lied_in_is_refused_with_a_reason(
    model: Path, change: dict[str, Any], complaint: str
) -> None:
    m = make_manifest("m", "onnx-embed", model, {}) | change
    with pytest.raises(ManifestError, match=re.escape(complaint)):
        check_manifest(json.dumps(m).encode(), "m", m["version"])


def test_a_manifest_with_the_wrong_number_of_chunk_hashes_is_refused(model: Path) -> None:
    m = make_manifest("m", "onnx-embed", model, {})
    m["files"][1]["chunks"].pop()
    with pytest.raises(ManifestError, match="chunk hashes"):
        check_manifest(json.dumps(m).encode(), "m", m["version"])


# ---------------------------------------------------------------- pulls over real sockets


def test_a_pull_from_two_peers_arrives_intact_and_published_whole(
    model: Path, tmp_path: Path, peers: list[Peer]
) -> None:
    version = _entry(model).version
    for node in ("p1", "p2"):
        peers.append(Peer(_server(model, node).serve))
    out, _ = _pull(version, [("p1", peers[0].address), ("p2", peers[1].address)], tmp_path / "cache")
    assert (out / "weights" / "w.bin").read_bytes() == (model / "weights" / "w.bin").read_bytes()
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
    marker = json.loads((out / CACHE_MARKER).read_text())
    assert marker["version"] == version and marker["source"] == "pulled"
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "no partial folder left behind"
    both = [f for p in peers for f in p.fetches if f.path]
    assert {f.path for f in peers[0].fetches if f.path} and {f.path for f in peers[1].fetches if f.path}, both


def test_chunks_a_lying_peer_corrupts_are_fetched_again_from_an_honest_one(
    model: Path, tmp_path: Path, peers: list[Peer]
) -> None:
    version = _entry(model).version
    honest = _server(model, "honest")

    def liar(msg: Fetch) -> Any:
        reply = honest.serve(msg)
        if isinstance(reply, Data) and msg.path:  # the manifest is true, the bytes are not
            return Data(reply.id, "liar", reply.offset, bytes(b ^ 0x01 for b in reply.data[:16]) + reply.data[16:])
        return reply

    peers.append(Peer(liar))
    peers.append(Peer(honest.serve))
    out, puller = _pull(version, [("liar", peers[0].address), ("honest", peers[1].address)], tmp_path / "cache")
    assert (out / "weights" / "w.bin").read_bytes() == (model / "weights" / "w.bin").read_bytes()
    assert puller.corrupt_chunks >= 1
    assert "liar" not in json.loads((out / CACHE_MARKER).read_text())["from"]


def test_a_peer_sending_a_manifest_with_a_path_outside_the_cache_writes_nothing(
    model: Path, tmp_path: Path, peers: list[Peer]
) -> None:
    m = make_manifest("m", "onnx-embed", model, {})
    m["files"][0]["path"] = "../../../evil"
    forged = folder_digest([(f["path"], f["size"], f["sha256"]) for f in m["files"]])
    m["version"] = forged
    peers.append(Peer(lambda msg: Data(msg.id, "liar", 0, json.dumps(m).encode())))
    with pytest.raises(PullError, match="outside the model's folder"):
        _pull(forged, [("liar", peers[0].address)], tmp_path / "a" / "b" / "cache")
    assert not list(tmp_path.rglob("evil"))


@pytest.mark.parametrize("lie", ["dot path", "garbage frame", "another kind", "file and folder"])
def test_a_lying_peer_is_dropped_and_the_pull_goes_on_from_an_honest_one(
    model: Path, tmp_path: Path, peers: list[Peer], lie: str
) -> None:
    version = _entry(model).version
    honest = _server(model, "honest")

    def liar(msg: Fetch) -> Any:
        if msg.path:
            return honest.serve(msg)
        m = make_manifest("m", "onnx-embed", model, {})
        if lie == "dot path":
            m["files"][0]["path"] = "."
        elif lie == "garbage frame":
            return GARBAGE
        elif lie == "another kind":
            m["kind"] = "transformers"
        else:
            m["files"].append(dict(m["files"][1], path="weights/w.bin/x"))
        return Data(msg.id, "liar", 0, json.dumps(m).encode())

    peers.append(Peer(liar))
    peers.append(Peer(honest.serve))
    progress = PullProgress("m", version)
    puller = Puller("m", version, [("liar", peers[0].address), ("honest", peers[1].address)], Plaintext(), progress,
                    cache_dir=tmp_path / "cache")  # fmt: skip
    out = puller.run()
    assert (out / "weights" / "w.bin").read_bytes() == (model / "weights" / "w.bin").read_bytes()
    assert "liar" in progress.dropped or any(s.node == "liar" and s.failed for s in puller.sources)
    marker = json.loads((out / CACHE_MARKER).read_text())
    assert marker["kind"] == "onnx-embed" and marker["from"] == ["honest"], marker


def test_what_a_sender_says_about_a_model_never_decides_how_it_loads(
    model: Path, tmp_path: Path, peers: list[Peer]
) -> None:
    """`info` is not covered by the version: it is recorded under its own key, never over the marker's kind."""
    version = _entry(model).version
    honest = _server(model, "p1")

    def tells_tales(msg: Fetch) -> Any:
        reply = honest.serve(msg)
        if msg.path or not isinstance(reply, Data):
            return reply
        m = json.loads(reply.data) | {"info": {"kind": "transformers", "version": "0" * 64, "backend": "x"}}
        return Data(reply.id, "p1", 0, json.dumps(m).encode())

    peers.append(Peer(tells_tales))
    out, _ = _pull(version, [("p1", peers[0].address)], tmp_path / "cache")
    marker = json.loads((out / CACHE_MARKER).read_text())
    assert marker["kind"] == "onnx-embed" and marker["version"] == version, marker
    assert marker["info"]["kind"] == "transformers"  # shown as what the sender said, nothing more


def test_a_link_in_a_served_folder_never_lets_a_peer_read_outside_it(model: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    secret.write_text("the mesh's secret key")
    (model / "tokenizer.json").symlink_to(secret)
    entry = ModelEntry("m", "0" * 64, "onnx-embed", str(model), model, state="ready")
    catalog = Catalog()
    catalog.add(entry)
    server = ChunkServer(catalog, "p1", RateLimit(None))
    manifest = server.serve(Fetch("1", "m", "0" * 64))
    chunk = server.serve(Fetch("2", "m", "0" * 64, "tokenizer.json", 0, 100))
    for reply in (manifest, chunk):
        assert isinstance(reply, Error) and "not shared" in reply.message and "outside" in reply.message, reply
        assert b"secret" not in encode(reply).replace(b"secret.key", b"")
    # A link that stays inside the folder is just another name for a file there.
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(model / "config.json")
    inside = ModelEntry("m", "1" * 64, "onnx-embed", str(model), model, state="ready")
    assert "tokenizer.json" in {f["path"] for f in inside.manifest()["files"]}


def test_a_pull_says_which_peer_refused_and_why(model: Path, tmp_path: Path, peers: list[Peer]) -> None:
    version = _entry(model).version
    peers.append(Peer(lambda msg: Error(msg.id, ErrorCode.UNKNOWN_MODEL, "this node has no files of m", "p1")))
    with pytest.raises(PullError, match="p1: this node has no files of m"):
        _pull(version, [("p1", peers[0].address)], tmp_path / "cache")


def test_an_interrupted_pull_goes_on_from_the_chunks_it_already_has(
    model: Path, tmp_path: Path, peers: list[Peer]
) -> None:
    version = _entry(model).version
    honest = _server(model, "p1")
    served = 0

    def dies_after_two(msg: Fetch) -> Any:
        nonlocal served
        if msg.path:
            served += 1
            if served > 2:
                return None  # silence: the sender hung
        return honest.serve(msg)

    peers.append(Peer(dies_after_two))
    with pytest.raises(PullError):
        _pull(version, [("p1", peers[0].address)], tmp_path / "cache", silent_after=1.0, window=1)
    peers.append(Peer(honest.serve))
    out, _ = _pull(version, [("p2", peers[1].address)], tmp_path / "cache")
    assert (out / "weights" / "w.bin").read_bytes() == (model / "weights" / "w.bin").read_bytes()
    again = [f for f in peers[1].fetches if f.path]
    assert len(again) == 5 - 2, f"the second pull fetched {len(again)} of 5 chunks; 2 were already there"


def test_a_request_for_a_file_outside_the_model_is_refused_by_the_sender(model: Path) -> None:
    server = _server(model, "p1")
    version = _entry(model).version
    reply = server.serve(Fetch("1", "m", version, "../../etc/passwd", 0, 100))
    assert isinstance(reply, Error) and "not a file of m" in reply.message


# ---------------------------------------------------------------- the sender's rate cap


def test_the_rate_cap_spaces_chunks_at_the_configured_rate() -> None:
    now = [0.0]
    limit = RateLimit(1_000_000, clock=lambda: now[0])
    waited = 0.0
    for _ in range(10):
        pause = limit.wait_time(1_000_000)
        waited += pause
        now[0] += pause
    # The first megabyte goes at once (the burst); the other nine take a second each.
    assert waited == pytest.approx(9.0, abs=0.05)
    assert RateLimit(None).wait_time(10**9) == 0.0
