"""The model cache: converted and built models, published whole or not at all, keyed by what they came from.

Backends and the registry both use it; it imports neither (no torch, no onnxruntime).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_MARKER = "lanmesh-cache.json"  # written last inside a cache entry; its presence means the entry is whole
_PRIVATE = ("lanmesh-cache.json",)  # our own bookkeeping inside an entry: not part of the model's content
_STALE_PARTIAL_S = 3600.0  # a half-written cache entry this old belongs to a crashed run
_DIGESTS_FILE = "digests.json"  # content hashes of source files, so a warm start does not re-read them
_digest_lock = threading.Lock()


def cache_root(override: str | Path | None = None) -> Path:
    """Where converted models live: `override`, else $LANMESH_CACHE_DIR, else ~/.cache/lanmesh; plus /models."""
    base = override or os.environ.get("LANMESH_CACHE_DIR") or Path.home() / ".cache" / "lanmesh"
    return Path(base).expanduser() / "models"


def content_digest(source: Path, override: str | Path | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names, sizes and bytes), as hex.

    Hashing a 100 MB model takes a noticeable fraction of a second, so digests are remembered per
    (path, size, mtime) in the cache root; a changed file is hashed again.
    """
    source = source.resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_file():
        return _file_digest(source, override)
    files = [f for f in source.rglob("*") if f.is_file() and not f.name.startswith(_PRIVATE)]
    return folder_digest(
        [(f.relative_to(source).as_posix(), f.stat().st_size, _file_digest(f, override)) for f in files]
    )


def folder_digest(files: list[tuple[str, int, str]]) -> str:
    """The content hash of a folder from its files' (relative posix path, size, sha256 hex): what a model's
    version is, and what a manifest received from a peer must hash to."""
    total = hashlib.sha256()
    for path, size, sha in sorted(files):
        total.update(f"{path}\0{size}\0".encode())
        total.update(bytes.fromhex(sha))
    return total.hexdigest()


def _file_digest(path: Path, override: str | Path | None) -> str:
    st = path.stat()
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    memo_file = cache_root(override) / _DIGESTS_FILE
    with _digest_lock:
        memo = _read_memo(memo_file)
        if key in memo:
            return str(memo[key])
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    digest = h.hexdigest()
    with _digest_lock:
        memo = _read_memo(memo_file)
        memo[key] = digest
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_file.with_name(f"{_DIGESTS_FILE}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_file)
        except OSError as exc:  # a read-only cache still serves; it only hashes again next time
            log.debug("cannot remember the digest of %s: %s", path, exc)
    return digest


def _read_memo(memo_file: Path) -> dict[str, Any]:
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def cache_entry(name: str, source: Path, version: str, override: str | Path | None = None) -> Path:
    """The cache folder for `source` converted by a given converter `version` (which names the settings too).

    Keyed by the source's content: replacing the file makes a new entry instead of serving stale weights,
    and the same bytes anywhere on disk share one entry.
    """
    key = f"{content_digest(source, override)}\0{version}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root(override) / f"{name}-{digest}"


def cache_ready(entry: Path) -> bool:
    return (entry / CACHE_MARKER).is_file()


def cache_facts(entry: Path) -> dict[str, Any]:
    """What the builder recorded in an entry's marker ({} when unreadable)."""
    try:
        facts = json.loads((entry / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def publish_cache(entry: Path, build: Callable[[Path], dict[str, Any]]) -> bool:
    """Build a cache entry in a temporary folder, then rename it into place.

    `build(tmp)` writes the files and returns facts to record in the marker. A crash leaves at most a
    `.partial-*` folder (removed by a later run), never a half entry. Returns False when another process
    published the same entry first (its copy is kept).
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(entry)
    tmp = entry.parent / f"{entry.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        facts = build(tmp)
        marker = {"created": time.time(), **facts}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2, default=str))
        try:
            os.rename(tmp, entry)
        except OSError:
            if cache_ready(entry):
                return False
            raise
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def discard_cache(entry: Path, reason: str) -> None:
    """Remove a cache entry that failed to load, so the next start rebuilds it."""
    log.warning("discarding model cache %s: %s", entry, reason)
    shutil.rmtree(entry, ignore_errors=True)


def _remove_stale_partials(entry: Path) -> None:
    now = time.time()
    for partial in entry.parent.glob(f"{entry.name}.partial-*"):
        try:
            old = now - partial.stat().st_mtime > _STALE_PARTIAL_S
        except FileNotFoundError:
            continue
        if old:
            log.info("removing half-written cache %s left by a crashed run", partial)
            shutil.rmtree(partial, ignore_errors=True)
