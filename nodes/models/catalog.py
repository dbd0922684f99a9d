"""What models this node has: each loaded model's name, version (the content hash of its files), where those files
are and their manifest; and the model pulls under way. What `lanmesh models` shows, and what peers may fetch.

A manifest lists a model's files with their sizes and sha256, and the sha256 of each chunk of them, and the kind
that loads them; its version is the hash of both (`model_version`: the kind chooses the engine, so it is covered
too), so whoever receives one can check it against the version it asked for, and every chunk and file against the
manifest, before a byte is used. A folder is shared only if every file in it is really inside it: a link leading
out of it would let a peer read whatever it points to.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from .cache import CACHE_MARKER, folder_digest

CHUNK_BYTES = 1024 * 1024  # a transfer moves files in pieces this big, each hashed on its own
SHORT = 8  # hex digits of a version shown and gossiped ("name@1a2b3c4d")
MANIFEST_FORMAT = 1
SHARED_KINDS = frozenset({"onnx-chat", "onnx-embed", "transformers", "gguf"})  # kinds whose files travel
_INFO_KEYS, _INFO_LEN = 16, 256  # a manifest's `info` (what the sender runs it with): a few short facts, no more


class ModelState(StrEnum):
    """A model's life on this node. Every change goes through `ModelEntry.move`, checked against `_MODEL_MOVES`."""

    LOADING = "loading"  # its backend is being built and loaded (no version yet: it is the hash of what loads)
    READY = "ready"  # serving (the current version of its name, or pinned beside it)
    DRAINING = "draining"  # unloading: no new requests; those running finish or are handed back
    UNLOADED = "unloaded"  # gone from the executor and the catalog
    FAILED = "failed"  # did not load (the operator's command says why); gone from the catalog


class PullState(StrEnum):
    """A pull's life: PULLING, then DONE or FAILED once (`PullProgress.finish`)."""

    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"


_MODEL_MOVES: dict[ModelState, frozenset[ModelState]] = {
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED}),
    ModelState.READY: frozenset({ModelState.DRAINING}),
    ModelState.DRAINING: frozenset({ModelState.UNLOADED}),
    ModelState.UNLOADED: frozenset(),
    ModelState.FAILED: frozenset(),
}


class IllegalMove(RuntimeError):
    """A model or a pull was asked for a change its state table does not allow: a bug, never an operator's input."""


class ManifestError(ValueError):
    """A manifest that cannot be trusted: it does not hash to its version, or names a path outside its folder."""


@dataclass
class ModelEntry:
    """One model this node serves (or is loading, or draining)."""

    name: str
    version: str  # full hex content hash ("" while loading)
    kind: str  # onnx-chat, onnx-embed, transformers, gguf, echo, sleep
    spec: str  # what it was loaded from, as given
    folder: Path | None  # its files (None: a synthetic model, nothing to share)
    state: ModelState = ModelState.LOADING
    current: bool = True  # what requests for `name` (unpinned) go to
    info: dict[str, Any] = field(default_factory=dict)  # backend, precision, ...
    _manifest: dict[str, Any] | None = None
    _files: dict[str, tuple[int, Path]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def short(self) -> str:
        return self.version[:SHORT]

    def move(self, to: ModelState) -> None:
        if to not in _MODEL_MOVES[self.state]:
            raise IllegalMove(f"model {self.name}@{self.short or '?'}: {self.state} -> {to}")
        self.state = to

    def manifest(self) -> dict[str, Any]:
        """This model's manifest, made on first use (it hashes every file once; other askers wait for it)."""
        with self._lock:
            if self._manifest is None:
                if self.folder is None:
                    raise ManifestError(f"{self.name} is a synthetic model: it has no files to share")
                self._manifest = make_manifest(self.name, self.kind, self.folder, self.info)
            return self._manifest

    def files(self) -> dict[str, tuple[int, Path]]:
        """(size, the real file) by path in the folder: what a chunk request is checked against and read from (no
        hashing). ManifestError when the folder cannot be shared (a link in it leads outside it)."""
        with self._lock:
            if self._files is None:
                listed = _files(self.folder, shared=True) if self.folder is not None else []
                self._files = {p: (s, real) for p, s, real in listed}
            return self._files

    def row(self) -> dict[str, Any]:
        files = []
        if self.folder is not None and self.folder.is_dir():
            files = [{"path": p, "size": s} for p, s, _ in _files(self.folder, shared=False)]
        return {
            "name": self.name,
            "version": self.short,
            "kind": self.kind,
            "state": str(self.state),
            "current": self.current,
            "files": files,
            "bytes": sum(f["size"] for f in files),
            **self.info,
        }


@dataclass
class PullProgress:
    """A pull under way (or finished): how far it is, from whom."""

    name: str
    version: str
    total: int = 0
    done: int = 0
    sources: list[str] = field(default_factory=list)
    state: PullState = PullState.PULLING
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    corrupt: int = 0  # chunks that failed their hash and were fetched again
    dropped: dict[str, str] = field(default_factory=dict)  # sender -> why it was given up
    ended: float | None = None

    def finish(self, state: PullState, error: str = "") -> None:
        if self.state is not PullState.PULLING or state is PullState.PULLING:
            raise IllegalMove(f"pull of {self.name}: {self.state} -> {state}")
        self.state, self.error, self.ended = state, error, time.monotonic()
        if state is PullState.DONE:
            self.done = self.total

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version[:SHORT],
            "state": str(self.state),
            "bytes": self.total,
            "done": self.done,
            "progress": round(self.done / self.total, 4) if self.total else 0.0,
            "from": list(self.sources),
            "seconds": round((self.ended or time.monotonic()) - self.started, 2),
            "corrupt_chunks": self.corrupt,
            "dropped": dict(self.dropped),
            **({"error": self.error} if self.error else {}),
        }


class Catalog:
    """The node's models and pulls; safe to use from the mesh loop, admin threads and transfer threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], ModelEntry] = {}  # (name, full version)
        self._pulls: dict[tuple[str, str], PullProgress] = {}

    def add(self, entry: ModelEntry) -> None:
        with self._lock:
            self._entries[(entry.name, entry.version)] = entry

    def remove(self, entry: ModelEntry) -> None:
        with self._lock:
            self._entries.pop((entry.name, entry.version), None)

    def ready(self, entry: ModelEntry, version: str, kind: str, folder: Path | None, info: dict[str, Any]) -> None:
        """A LOADING entry loaded: it is READY under its version (the content hash of what loaded)."""
        with self._lock:
            self._entries.pop((entry.name, entry.version), None)
            entry.version, entry.kind, entry.folder, entry.info = version, kind, folder, info
            entry.move(ModelState.READY)
            self._entries[(entry.name, entry.version)] = entry

    def entries(self, name: str | None = None) -> list[ModelEntry]:
        with self._lock:
            return [e for e in self._entries.values() if name is None or e.name == name]

    def find(self, name: str, version: str) -> ModelEntry | None:
        """The entry for `name` at `version` (full or short hex)."""
        with self._lock:
            for (n, v), entry in self._entries.items():
                if n == name and v.startswith(version) and len(version) >= SHORT:
                    return entry
        return None

    def pull_started(self, progress: PullProgress) -> None:
        with self._lock:
            self._pulls[(progress.name, progress.version)] = progress

    def rows(self) -> dict[str, Any]:
        with self._lock:
            entries, pulls = list(self._entries.values()), list(self._pulls.values())
        return {"models": [e.row() for e in entries], "pulls": [p.row() for p in pulls]}


# ---------------------------------------------------------------- manifests


def _files(folder: Path, shared: bool) -> list[tuple[str, int, Path]]:
    """(relative posix path, size, the real file) of every file in a model folder, as `cache.content_digest` lists
    them. `shared`: the folder is about to be read by peers, so a link whose target lies outside it is refused
    (ManifestError) rather than followed."""
    root = folder.resolve()
    out = []
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name == CACHE_MARKER:
            continue
        rel, real = f.relative_to(folder).as_posix(), f.resolve()
        if shared and not real.is_relative_to(root):
            raise ManifestError(
                f"{rel} in {folder} links to {real}, outside the model's folder: the folder is not shared with peers "
                "(copy the files in, e.g. cp -rL, to share it)"
            )
        out.append((rel, real.stat().st_size, real))
    return out


def model_version(files_digest: str, kind: str) -> str:
    """A model's version: the hash of its files' digest (`cache.folder_digest`) together with the kind that loads
    them, since the kind chooses the engine a pulled copy runs on."""
    return hashlib.sha256(f"lanmesh-model\0{kind}\0{files_digest}".encode()).hexdigest()


def open_shared(real: Path) -> int:
    """A file descriptor for reading a shared file, never through a link (one swapped in since it was listed)."""
    return os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))


def make_manifest(name: str, kind: str, folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a model folder: every file's size, sha256 and chunk hashes; its version covers their digest
    and the kind. ManifestError when the folder cannot be shared."""
    files: list[dict[str, Any]] = []
    for rel, size, path in _files(folder, shared=True):
        whole, chunks = hashlib.sha256(), []
        with os.fdopen(open_shared(path), "rb") as f:
            while block := f.read(CHUNK_BYTES):
                whole.update(block)
                chunks.append(hashlib.sha256(block).hexdigest())
        files.append({"path": rel, "size": size, "sha256": whole.hexdigest(), "chunks": chunks})
    version = model_version(folder_digest([(f["path"], f["size"], f["sha256"]) for f in files]), kind)
    return {"format": MANIFEST_FORMAT, "name": name, "kind": kind, "version": version, "chunk": CHUNK_BYTES,
            "files": files, "info": info}  # fmt: skip


def check_manifest(raw: bytes, name: str, version: str) -> dict[str, Any]:
    """A manifest received from a peer, checked: it parses, names the model asked for and a kind whose files travel,
    every path stays inside the model's folder and none is also another's folder, every file has the chunks its size
    needs, and files and kind hash to the version asked for (full hex, or its first 8). Anything else is a
    ManifestError: the puller drops that peer and goes on with the others."""
    try:
        return _check_manifest(raw, name, version)
    except ManifestError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise ManifestError(f"the manifest of {name} is malformed: {type(exc).__name__}: {exc}") from None


def _check_manifest(raw: bytes, name: str, version: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"the manifest of {name} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"the manifest of {name} has an unknown format")
    if manifest.get("name") != name:
        raise ManifestError(f"the manifest of {name} names another model ({str(manifest.get('name'))[:64]!r})")
    kind, info = manifest.get("kind"), manifest.get("info", {})
    if kind not in SHARED_KINDS:
        raise ManifestError(f"the manifest of {name} names kind {str(kind)[:64]!r}; expected one of "
                            f"{', '.join(sorted(SHARED_KINDS))}")  # fmt: skip
    if not _plain_info(info):
        raise ManifestError(f"the manifest of {name} has a malformed info (a few short facts expected)")
    chunk = manifest.get("chunk")
    files = manifest.get("files")
    if not isinstance(chunk, int) or not 0 < chunk <= 4 * 1024 * 1024 or not isinstance(files, list) or not files:
        raise ManifestError(f"the manifest of {name} lists no files or has a bad chunk size")
    seen = set()
    for f in files:
        if not isinstance(f, dict):
            raise ManifestError(f"the manifest of {name} has a malformed file entry")
        path, size, sha, chunks = f.get("path"), f.get("size"), f.get("sha256"), f.get("chunks")
        safe_path(path)
        if not isinstance(size, int) or size < 0 or not _hex64(sha) or not isinstance(chunks, list):
            raise ManifestError(f"the manifest of {name} has a malformed entry for {path!r}")
        if len(chunks) != -(-size // chunk):
            raise ManifestError(f"the manifest of {name}: {path!r} has {len(chunks)} chunk hashes for {size} bytes")
        if not all(_hex64(c) for c in chunks) or path in seen:
            raise ManifestError(f"the manifest of {name} has bad chunk hashes or a repeated path {path!r}")
        seen.add(path)
    folders = {str(parent) for p in seen for parent in PurePosixPath(p).parents}
    if seen & folders:  # "a" and "a/b": one cannot be written beside the other
        raise ManifestError(f"the manifest of {name} lists {sorted(seen & folders)[0]!r} as a file and as a folder")
    digest = model_version(folder_digest([(f["path"], f["size"], f["sha256"]) for f in files]), kind)
    if not digest.startswith(version) or len(version) < SHORT:
        raise ManifestError(
            f"the manifest of {name} hashes to {digest[:SHORT]}, not the version asked for ({version[:SHORT]}): refused"
        )
    manifest["version"] = digest
    return manifest


def safe_path(path: Any) -> PurePosixPath:
    """A manifest path that stays inside the model's folder (relative, no `..`, no drive), or ManifestError."""
    if not isinstance(path, str) or not path or "\0" in path or "\\" in path:
        raise ManifestError(f"refused a manifest path {path!r}: not a plain relative path")
    p = PurePosixPath(path)
    if not p.parts or p.is_absolute() or any(part in ("..", "") for part in p.parts) or ":" in p.parts[0]:
        raise ManifestError(f"refused a manifest path {path!r}: it points outside the model's folder")
    if p.as_posix() != path:  # "a//b", "./a", "a/": two spellings of one file could overwrite each other
        raise ManifestError(f"refused a manifest path {path!r}: not in its plain form ({p.as_posix()!r})")
    if p.name == CACHE_MARKER:
        raise ManifestError(f"refused a manifest path {path!r}: that name is the cache's own")
    return p


def _plain_info(info: Any) -> bool:
    """Whether a manifest's `info` is what a sender puts there: a few short, flat facts (it is not hashed, and only
    shown; it never chooses anything)."""
    if not isinstance(info, dict) or len(info) > _INFO_KEYS:
        return False
    for key, value in info.items():
        if not isinstance(key, str) or len(key) > 64:
            return False
        if isinstance(value, str) and len(value) > _INFO_LEN or not isinstance(value, str | int | float | bool):
            return False
    return True


def _hex64(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
