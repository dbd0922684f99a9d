"""Models travel the mesh: a node serves the files of the models it has (`ChunkServer`), and fetches a model it
lacks from the peers that have it (`Puller`), never from the internet.

The puller asks for the manifest, checks it hashes to the version it wants, then fetches 1 MiB chunks from several
peers at once (a few in flight per peer), checks each against the manifest before writing it, and gives a dead or
lying sender's chunks to the others. What it has fetched survives an interruption (the next pull of that version
goes on from there). The folder is published into the model cache whole, or not at all. Senders cap their rate
(`--transfer-rate`) so serving goes on while they send.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from protocol import MAX_CHUNK_BYTES, Data, DecodeError, Error, ErrorCode, Fetch, decode, encode, name_problem

from .cache import CACHE_MARKER, cache_ready, cache_root
from .catalog import SHORT, Catalog, ManifestError, PullProgress, PullState, check_manifest, open_shared, safe_path

log = logging.getLogger("lanmesh.transfer")

_WINDOW = 4  # chunks in flight per sender
_SILENT_S = 10.0  # a sender that answers nothing for this long is dropped and its chunks go to the others
_MAX_CORRUPT = 3  # chunks that fail their hash before a sender is dropped as broken or lying
_DONE_FILE = "lanmesh-pull.json"  # inside a partial pull: which chunks are written and checked


class PullError(RuntimeError):
    """The model could not be fetched; the message says why (no peer has it, every sender failed, ...)."""


# ---------------------------------------------------------------- serving


class RateLimit:
    """A token bucket in bytes per second shared by every transfer this node serves (None: no cap)."""

    BURST = 1024 * 1024  # bytes that may go at once: one chunk

    def __init__(self, bytes_per_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = bytes_per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(self.BURST)
        self._at = clock()

    def wait_time(self, n: int) -> float:
        """Take `n` bytes' worth; the seconds the caller must wait before sending them."""
        if not self.rate:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.BURST), self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            return max(0.0, -self._tokens / self.rate)


class ChunkServer:
    """Answers `Fetch`es for the models in the catalog. Runs on a worker thread (it reads files and waits out the
    rate cap), never on the mesh loop."""

    def __init__(self, catalog: Catalog, node_id: str, limit: RateLimit) -> None:
        self.catalog = catalog
        self.node_id = node_id
        self.limit = limit
        self.sent_bytes = 0

    def serve(self, msg: Fetch) -> Data | Error:
        entry = self.catalog.find(msg.name, msg.version)
        if entry is None or entry.folder is None:
            return Error(msg.id, ErrorCode.UNKNOWN_MODEL, f"this node has no files of {msg.name}@{msg.version[:SHORT]}",
                         self.node_id)  # fmt: skip
        try:
            if not msg.path:
                return Data(msg.id, self.node_id, 0, json.dumps(entry.manifest()).encode())
            # A chunk needs no hashing here: the puller checks it against the manifest it trusts.
            found = entry.files().get(msg.path)
        except ManifestError as exc:  # e.g. a link in the folder leads outside it: nothing of it is shared
            log.warning("not sharing %s: %s", msg.name, exc)
            return Error(msg.id, ErrorCode.UNAVAILABLE, f"{msg.name} is not shared by this node: {exc}", self.node_id)
        if found is None:
            return Error(msg.id, ErrorCode.BAD_REQUEST, f"{msg.path!r} is not a file of {msg.name}", self.node_id)
        size, real = found
        if msg.offset > size:
            return Error(msg.id, ErrorCode.BAD_REQUEST, f"offset {msg.offset} is past the end of {msg.path}",
                         self.node_id)  # fmt: skip
        length = min(msg.length or MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, size - msg.offset)
        try:
            fd = open_shared(real)
        except OSError as exc:  # gone, or swapped for a link since it was listed
            return Error(msg.id, ErrorCode.UNAVAILABLE, f"cannot read {msg.path} of {msg.name}: {exc.strerror}",
                         self.node_id)  # fmt: skip
        try:
            data = os.pread(fd, length, msg.offset)
        finally:
            os.close(fd)
        pause = self.limit.wait_time(len(data))
        if pause > 0:
            time.sleep(pause)
        self.sent_bytes += len(data)
        return Data(msg.id, self.node_id, msg.offset, data)


# ---------------------------------------------------------------- pulling


@dataclass
class Source:
    """A peer that has the model, and how this pull is going with it."""

    node: str
    address: str  # host:port of its ROUTER
    sock: zmq.Socket[Any] | None = None
    monitor: zmq.Socket[Any] | None = None  # its connection's events: a closed connection drops it at once
    outstanding: int = 0
    last_heard: float = 0.0
    corrupt: int = 0
    failed: str = ""  # why it was dropped
    bad: set[tuple[int, int]] | None = None  # chunks it sent that failed their hash: asked of others only
    introduced: bool = False  # member identities: this node's certificate went first


class Puller:
    """Fetches one model version into the cache from `sources`; `run()` returns the published folder."""

    def __init__(
        self,
        name: str,
        version: str,
        sources: Sequence[tuple[str, str]],
        security: Any,
        progress: PullProgress,
        cache_dir: str | Path | None = None,
        silent_after: float = _SILENT_S,
        window: int = _WINDOW,
    ) -> None:
        problem = name_problem(name, "model name")
        if problem is not None:  # it becomes a folder name in the cache: checked again where it does
            raise PullError(problem)
        if not sources:
            raise PullError(f"no peer has {name}@{version[:SHORT]}")
        self.name, self.version = name, version
        self.sources = [Source(node, address) for node, address in sources]
        self.security = security
        self.progress = progress
        self.progress.sources = [s.node for s in self.sources]
        self.root = cache_root(cache_dir) / "pulled"
        self.silent_after = silent_after
        self.window = window
        self.corrupt_chunks = 0
        self._ids = itertools.count(1)

    @property
    def final(self) -> Path:
        return self.root / f"{self.name}-{self.version[:SHORT]}"

    def run(self) -> Path:
        ctx = zmq.Context()
        try:
            for source in self.sources:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IMMEDIATE, 1)
                sock.setsockopt(zmq.MAXMSGSIZE, MAX_CHUNK_BYTES + 65536)
                sock.setsockopt(zmq.HEARTBEAT_IVL, 500)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
                self.security.configure_client(sock, f"tcp://{source.address}")  # a member identity: the node's key
                source.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                sock.connect(f"tcp://{source.address}")
                source.sock = sock
                source.bad = set()
            manifest = self._manifest()
            self.version = manifest["version"]
            if cache_ready(self.final):
                self.progress.finish(PullState.DONE)
                return self.final
            return self._fetch(manifest)
        except Exception as exc:  # a full disk, a lost cache folder...: the pull's row says so, the caller hears it
            if self.progress.state is PullState.PULLING:
                self.progress.finish(PullState.FAILED, str(exc) or type(exc).__name__)
            raise
        finally:
            ctx.destroy(0)

    # ------------------------------------------------------------ the manifest

    def _manifest(self) -> dict[str, Any]:
        problems = []
        for source in self._alive():
            reply = self._ask(source, Fetch(self._id(), self.name, self.version), timeout=self.silent_after)
            if isinstance(reply, Data):
                try:
                    manifest = check_manifest(reply.data, self.name, self.version)
                except ManifestError as exc:
                    source.failed = str(exc)
                    problems.append(f"{source.node}: {exc}")
                    log.warning(
                        "pull of %s: %s sent a manifest that does not check out: %s", self.name, source.node, exc
                    )
                    continue
                self.progress.total = sum(f["size"] for f in manifest["files"])
                return manifest
            source.failed = reply
            problems.append(f"{source.node}: {reply}")
        raise PullError(f"no peer gave a manifest of {self.name}@{self.version[:SHORT]}: {'; '.join(problems)}")

    def _introduce(self, source: Source) -> None:
        """With member identities: this node's certificate, once, before the first Fetch to `source`."""
        frame = getattr(self.security, "certificate_frame", None)
        if frame is None or source.introduced or source.sock is None:
            return
        try:
            source.sock.send(frame(), zmq.NOBLOCK)
            source.introduced = True
        except zmq.Again:
            pass  # not connected yet: the next send tries again

    def _ask(self, source: Source, msg: Fetch, timeout: float) -> Data | str:
        assert source.sock is not None
        if not source.introduced and getattr(self.security, "certificate_frame", None) is not None:
            if not source.sock.poll(int(timeout * 1000), zmq.POLLOUT):
                return "not reachable"
            self._introduce(source)
        try:
            source.sock.send(encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            if not source.sock.poll(int(timeout * 1000), zmq.POLLOUT):
                return "not reachable"
            source.sock.send(encode(msg))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not source.sock.poll(int(left * 1000)):
                break
            try:
                reply = decode(source.sock.recv())
            except DecodeError as exc:
                return f"sent an undecodable answer ({exc})"
            if getattr(reply, "id", None) != msg.id:
                continue
            if isinstance(reply, Data):
                return reply
            return f"{getattr(reply, 'message', type(reply).__name__)}"
        return f"no answer within {timeout:g}s"

    # ------------------------------------------------------------ the chunks

    def _fetch(self, manifest: dict[str, Any]) -> Path:
        partial = self.root / f"{self.final.name}.partial-pull"
        partial.mkdir(parents=True, exist_ok=True)
        done = self._resume(partial, manifest)
        chunk = manifest["chunk"]
        todo: collections.deque[tuple[int, int]] = collections.deque()
        for i, f in enumerate(manifest["files"]):
            target = partial / safe_path(f["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("ab") as fh:
                fh.truncate(f["size"])
            for c in range(len(f["chunks"])):
                if (i, c) in done:
                    self.progress.done += min(chunk, f["size"] - c * chunk)
                else:
                    todo.append((i, c))
        inflight: dict[str, tuple[Source, int, int, float]] = {}  # request id -> (source, file, chunk, sent at)
        poller = zmq.Poller()
        monitors: dict[zmq.Socket[Any], Source] = {}
        for source in self._alive():
            assert source.sock is not None and source.monitor is not None
            poller.register(source.sock, zmq.POLLIN)
            poller.register(source.monitor, zmq.POLLIN)
            monitors[source.monitor] = source
            source.last_heard = time.monotonic()
        last_saved = time.monotonic()
        while todo or inflight:
            for source in self._alive():
                while source.outstanding < self.window:
                    picked = self._next_for(source, todo)
                    if picked is None:
                        break
                    i, c = picked
                    f = manifest["files"][i]
                    rid = self._id()
                    msg = Fetch(rid, self.name, self.version, f["path"], c * chunk, min(chunk, f["size"] - c * chunk))
                    assert source.sock is not None
                    self._introduce(source)
                    try:
                        source.sock.send(encode(msg), zmq.NOBLOCK)
                    except zmq.Again:
                        todo.appendleft((i, c))
                        break
                    inflight[rid] = (source, i, c, time.monotonic())
                    source.outstanding += 1
            if not self._alive():
                raise PullError(f"every peer failed while sending {self.name}: " + "; ".join(
                    f"{s.node}: {s.failed}" for s in self.sources))  # fmt: skip
            if todo and not inflight and all(self._next_for(s, todo, peek=True) is None for s in self._alive()):
                i, c = todo[0]
                raise PullError(f"chunk {c} of {manifest['files'][i]['path']}: no peer left has a good copy")
            for sock, _ in poller.poll(200):
                if sock in monitors:
                    source = monitors[sock]
                    while sock.poll(0):
                        sock.recv_multipart()
                    self._drop(source, "its connection closed", inflight, todo)
                else:
                    self._receive(sock, inflight, todo, manifest, partial, done)
            now = time.monotonic()
            for source in self._alive():
                if source.outstanding and now - source.last_heard > self.silent_after:
                    self._drop(source, f"silent for {now - source.last_heard:.0f}s", inflight, todo)
            if now - last_saved > 1.0:
                self._save(partial, done)
                last_saved = now
        self._save(partial, done)
        return self._publish(partial, manifest)

    def _receive(
        self,
        sock: zmq.Socket[Any],
        inflight: dict[str, tuple[Source, int, int, float]],
        todo: collections.deque[tuple[int, int]],
        manifest: dict[str, Any],
        partial: Path,
        done: set[tuple[int, int]],
    ) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode(frame)
            except ValueError:
                continue
            entry = inflight.pop(getattr(reply, "id", ""), None)
            if entry is None:
                continue  # an answer to a request given to someone else meanwhile
            source, i, c, _sent = entry
            source.outstanding -= 1
            source.last_heard = time.monotonic()
            f = manifest["files"][i]
            if not isinstance(reply, Data):
                self._drop(source, getattr(reply, "message", "refused"), inflight, todo)
                todo.append((i, c))
                continue
            if hashlib.sha256(reply.data).hexdigest() != f["chunks"][c]:
                self.corrupt_chunks += 1
                self.progress.corrupt += 1
                source.corrupt += 1
                if source.bad is not None:
                    source.bad.add((i, c))
                log.warning("pull of %s: chunk %d of %s from %s failed its hash; fetching it again", self.name, c,
                            f["path"], source.node)  # fmt: skip
                todo.append((i, c))
                if source.corrupt >= _MAX_CORRUPT:
                    self._drop(source, f"{source.corrupt} chunks failed their hash", inflight, todo)
                continue
            fd = os.open(partial / safe_path(f["path"]), os.O_WRONLY)
            try:
                os.pwrite(fd, reply.data, c * manifest["chunk"])
            finally:
                os.close(fd)
            done.add((i, c))
            self.progress.done += len(reply.data)

    def _drop(
        self,
        source: Source,
        why: str,
        inflight: dict[str, tuple[Source, int, int, float]],
        todo: collections.deque[tuple[int, int]],
    ) -> None:
        if source.failed:
            return
        source.failed = why
        self.progress.dropped[source.node] = why
        log.warning("pull of %s: dropping %s as a source (%s); the others take its chunks", self.name, source.node, why)
        for rid, (s, i, c, _sent) in list(inflight.items()):
            if s is source:
                del inflight[rid]
                todo.appendleft((i, c))
        source.outstanding = 0

    @staticmethod
    def _next_for(
        source: Source, todo: collections.deque[tuple[int, int]], peek: bool = False
    ) -> tuple[int, int] | None:
        """The first chunk to fetch that this source did not already send corrupted."""
        for k, chunk in enumerate(todo):
            if not source.bad or chunk not in source.bad:
                if not peek:
                    del todo[k]
                return chunk
        return None

    def _alive(self) -> list[Source]:
        return [s for s in self.sources if not s.failed]

    def _id(self) -> str:
        return f"pull-{os.getpid()}-{next(self._ids)}"

    # ------------------------------------------------------------ resume and publish

    def _resume(self, partial: Path, manifest: dict[str, Any]) -> set[tuple[int, int]]:
        try:
            saved = json.loads((partial / _DONE_FILE).read_text())
        except (OSError, ValueError):
            return set()
        if saved.get("version") != manifest["version"]:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            return set()
        return {(int(i), int(c)) for i, c in saved.get("done", [])}

    def _save(self, partial: Path, done: set[tuple[int, int]]) -> None:
        tmp = partial / f"{_DONE_FILE}.tmp"
        tmp.write_text(json.dumps({"version": self.version, "done": sorted(done)}))
        os.replace(tmp, partial / _DONE_FILE)

    def _publish(self, partial: Path, manifest: dict[str, Any]) -> Path:
        for f in manifest["files"]:  # every chunk was checked; the whole file too, before anyone loads it
            h = hashlib.sha256()
            with (partial / safe_path(f["path"])).open("rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != f["sha256"]:
                shutil.rmtree(partial, ignore_errors=True)
                raise PullError(f"{f['path']} of {self.name} does not match its hash after the transfer")
        (partial / _DONE_FILE).unlink(missing_ok=True)
        # What loads it comes from what the version covers; the sender's `info` is only recorded, under its own key.
        marker = {"created": time.time(), "source": "pulled", "name": self.name, "version": self.version,
                  "kind": manifest["kind"], "from": [s.node for s in self.sources if not s.failed],
                  "info": manifest.get("info", {})}  # fmt: skip
        (partial / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(partial, self.final)
        except OSError:
            if not cache_ready(self.final):
                raise
            shutil.rmtree(partial, ignore_errors=True)  # another pull of the same version published first
        self.progress.finish(PullState.DONE)
        return self.final
