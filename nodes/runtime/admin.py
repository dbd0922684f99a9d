"""Operators' commands to a running node (`Admin` messages, authenticated by the mesh key like all traffic) and
the model files it shares (`Fetch`): what it has, load, switch, unload, pull.

Everything here runs on worker threads of the mesh loop (a load may take minutes), never on the loop itself.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protocol import Admin, Data, Error, ErrorCode, Fetch, Reply, is_name, is_version

from ..models.backends.base import Backend
from ..models.cache import cache_ready, cache_root, content_digest
from ..models.catalog import SHORT, Catalog, ModelEntry, ModelState, PullProgress, model_version
from ..models.loader import load_backend
from ..models.specs import ModelSpec, parse_model_arg
from ..models.transfer import ChunkServer, Puller, PullError, RateLimit

if TYPE_CHECKING:
    from mesh import MemberIdentity, MeshKey, MeshNode, Plaintext

    from .config import NodeConfig
    from .executor import Executor


class AdminHost(Protocol):
    """What the admin needs of its node (`runtime.node.Node` is one): its id, configuration, executor and mesh."""

    node_id: str
    config: NodeConfig
    executor: Executor | None
    mesh: MeshNode | None

    def check_memory(self, specs: list[ModelSpec]) -> list[ModelSpec]: ...

    def with_node_defaults(self, spec: ModelSpec) -> ModelSpec: ...

    def mesh_security(self) -> MeshKey | MemberIdentity | Plaintext: ...


log = logging.getLogger("lanmesh.admin")


def version_of(backend: Backend, spec_text: str) -> tuple[str, str, Path | None]:
    """(version, kind, folder) of a loaded backend: the hash of its files and kind (`catalog.model_version`, what a
    manifest is checked against), or of its spec when it has none."""
    files = backend.files()
    if files is None:
        kind = type(backend).__name__.removesuffix("Backend").lower()
        return hashlib.sha256(spec_text.encode()).hexdigest(), kind, None
    kind, folder = files
    return model_version(content_digest(folder), kind), kind, folder


def info_of(backend: Backend) -> dict[str, Any]:
    described = backend.describe()
    out = {"backend": described.get("engine", type(backend).__name__)}
    if "precision" in described:
        out["precision"] = described["precision"]
    return out


def pulled_copy(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The newest copy of `name` this node pulled from peers earlier (what it serves when its own source is gone):
    a folder named exactly `name-V8` (never a glob: a name is matched, not interpreted)."""
    root = cache_root(cache_dir) / "pulled"
    if not is_name(name) or not root.is_dir():
        return None
    copies = [p for p in root.iterdir() if p.name.startswith(f"{name}-") and is_version(p.name[len(name) + 1 :])
              and len(p.name) == len(name) + 1 + SHORT and p.is_dir() and cache_ready(p)]  # fmt: skip
    return max(copies, key=lambda p: p.stat().st_mtime) if copies else None


def spec_for_folder(name: str, kind: str, folder: Path) -> ModelSpec:
    """The spec that serves a model folder pulled from a peer, by the kind its manifest names."""
    engine = ",engine=transformers" if kind == "transformers" else ""
    task = ",task=embed" if kind == "onnx-embed" else ""
    return parse_model_arg(f"name={name},path={folder}{task}{engine}")


class NodeAdmin:
    """Carries out `Admin` and `Fetch` messages for one node."""

    def __init__(self, node: AdminHost, transfer_rate: float | None) -> None:
        self.node = node
        self.catalog = Catalog()
        self.chunks = ChunkServer(self.catalog, node.node_id, RateLimit(transfer_rate))
        self._lock = threading.Lock()  # one model change at a time on this node
        self.stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------ bookkeeping of what is served

    def register(self, backend: Backend, spec_text: str, current: bool = True) -> ModelEntry:
        """A backend loaded at start-up: READY at once."""
        version, kind, folder = version_of(backend, spec_text)
        entry = ModelEntry(backend.name, "", kind, spec_text, None, current=current)
        self.catalog.add(entry)
        self.catalog.ready(entry, version, kind, folder, info_of(backend))
        return entry

    # ------------------------------------------------------------ the messages

    def handle(self, msg: Admin | Fetch) -> Reply | Error | Data:
        node_id = self.node.node_id
        if isinstance(msg, Fetch):
            self.stats["fetches_served"] += 1
            return self.chunks.serve(msg)
        action = getattr(self, f"_{msg.action}", None)
        if action is None:
            return Error(msg.id, ErrorCode.BAD_REQUEST, f"unknown admin action {msg.action!r}", node_id)
        try:
            output = action(msg.args)
        except (ValueError, OSError, PullError, ImportError, MemoryError) as exc:
            return Error(msg.id, ErrorCode.BAD_REQUEST, f"{msg.action}: {exc}", node_id)
        except Exception as exc:  # noqa: BLE001 - an operator always gets an answer, and the log the traceback
            log.exception("admin %s failed", msg.action)
            return Error(msg.id, ErrorCode.INTERNAL, f"{msg.action}: {type(exc).__name__}: {exc}", node_id)
        return Reply(msg.id, output, node_id)

    def _models(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"node": self.node.node_id, **self.catalog.rows()}

    def _load(self, args: dict[str, Any]) -> dict[str, Any]:
        spec_text = _arg(args, "spec")
        spec = parse_model_arg(spec_text)
        if args.get("name"):
            spec = replace(spec, name=_arg(args, "name"))
        executor = self.node.executor
        assert executor is not None
        with self._lock:
            started = time.monotonic()
            # One that would not fit is refused, not OOM-killed halfway through; a chat cache may shrink to fit.
            (fitted,) = self.node.check_memory([self.node.with_node_defaults(spec)])
            entry = ModelEntry(spec.name, "", spec.kind, spec_text, None, current=False)  # LOADING
            self.catalog.add(entry)
            try:
                backend = load_backend(fitted)
                version, kind, folder = version_of(backend, spec_text)
                if self.catalog.find(spec.name, version) is not None:
                    backend.close()
                    raise ValueError(f"{spec.name}@{version[:SHORT]} is loaded here already")
            except BaseException:
                entry.move(ModelState.FAILED)
                self.catalog.remove(entry)
                raise
            serving = spec.name in executor.lanes
            current = bool(args.get("current", not serving))
            entry.current = current
            self.catalog.ready(entry, version, kind, folder, info_of(backend))
            executor.add(backend, entry.version, current=current)
            self._mark_current(spec.name)
        log.info("loaded %s@%s (%s) in %.1fs", spec.name, entry.short, entry.kind, time.monotonic() - started)
        return {"name": spec.name, "version": entry.short, "current": current, "seconds": time.monotonic() - started}

    def handle_load(self, spec: str, name: str = "") -> dict[str, Any]:
        """Load a model beside what serves (the node's own use: a model pulled at start-up)."""
        return self._load({"spec": spec, **({"name": name} if name else {})})

    def handle_unload(self, name: str) -> dict[str, Any]:
        """Unload a model (the node's own use: a pipeline stage the automatic split moved elsewhere)."""
        return self._unload({"name": name})

    def _switch(self, args: dict[str, Any]) -> dict[str, Any]:
        name, version = _arg(args, "name"), _arg(args, "version")
        executor = self.node.executor
        assert executor is not None
        with self._lock:
            executor.switch(name, version)
            self._mark_current(name)
        log.info("requests for %s now go to version %s", name, version[:SHORT])
        return {"name": name, "version": version[:SHORT]}

    def _unload(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _arg(args, "name")
        executor = self.node.executor
        assert executor is not None
        version = args.get("version") or (executor.lanes[name].version if name in executor.lanes else "")
        if not version:
            raise ValueError(f"{name} is not served here")
        entry = self.catalog.find(name, version)
        started = time.monotonic()
        if entry is not None:
            entry.move(ModelState.DRAINING)
        handed_back = executor.retire(name, version, grace=float(args.get("grace", self.node.config.grace)))
        if entry is not None:
            entry.move(ModelState.UNLOADED)
            self.catalog.remove(entry)
        self._mark_current(name)
        log.info("unloaded %s@%s (%d requests handed back)", name, str(version)[:SHORT], handed_back)
        return {"name": name, "version": str(version)[:SHORT], "handed_back": handed_back,
                "seconds": time.monotonic() - started}  # fmt: skip

    def _pull(self, args: dict[str, Any]) -> dict[str, Any]:
        name = _arg(args, "name")
        path = self.pull(name, str(args.get("version") or ""))
        out: dict[str, Any] = {"name": name, "path": str(path), "version": path.name[len(name) + 1 :]}
        if args.get("serve"):
            out.update(self._load({"spec": f"name={name},path={path}"}))
        return out

    # ------------------------------------------------------------ pulling

    def pull(self, name: str, version: str = "") -> Path:
        """Fetch `name` (at `version`, or the one most peers serve) from the peers that have it; returns its folder."""
        mesh = self.node.mesh
        assert mesh is not None
        holders = mesh.holders(name)
        if version:
            holders = [h for h in holders if h[2].startswith(version[:SHORT])]
        if not holders:
            raise PullError(f"no live peer serves {name}{'@' + version[:SHORT] if version else ''}")
        if not version:
            version = collections.Counter(h[2] for h in holders).most_common(1)[0][0]
            holders = [h for h in holders if h[2] == version]
        progress = PullProgress(name, version)
        self.catalog.pull_started(progress)
        puller = Puller(name, version, [(n, a) for n, a, _ in holders], self.node.mesh_security(), progress,
                        cache_dir=self.node.config.cache_dir or None)  # fmt: skip
        log.info("pulling %s@%s from %s", name, version[:SHORT], ", ".join(n for n, _, _ in holders))
        path = puller.run()
        log.info("pulled %s@%s (%d bytes) in %.1fs%s", name, version[:SHORT], progress.total,
                 time.monotonic() - progress.started,
                 f"; {puller.corrupt_chunks} chunks fetched again" if puller.corrupt_chunks else "")  # fmt: skip
        return path

    def _mark_current(self, name: str) -> None:
        executor = self.node.executor
        assert executor is not None
        lane = executor.lanes.get(name)
        for entry in self.catalog.entries(name):
            entry.current = lane is not None and entry.version == lane.version


def _arg(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"needs {key}=... (a non-empty string)")
    return value
