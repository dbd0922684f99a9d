"""How much memory a node may still fill: its cgroup's limit (systemd's MemoryMax=, a container's) and
--max-memory. Models that would not fit are refused at start with a clear error, instead of an OOM kill."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("lanmesh.node")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# Read the limit from this folder as if it were the process's own cgroup: for tests, and for containers that
# mount their cgroup somewhere else.
CGROUP_ROOT_ENV = "LANMESH_CGROUP_ROOT"
_UNLIMITED = 1 << 60  # cgroup v1 says "no limit" with a number near 2**63 (rounded to pages)


@dataclass(frozen=True)
class MemoryLimit:
    """One limit the node lives under, and how much of it is already taken."""

    limit: int  # bytes
    used: int  # bytes already held under it: the cgroup's working set, or this process's resident memory
    source: str  # "cgroup" or "--max-memory"
    file: Path | None = None  # the cgroup file that sets it

    @property
    def free(self) -> int:
        return max(0, self.limit - self.used)


class ModelTooBig(MemoryError):
    """A model would not fit in the memory left under one of the node's limits: `model`, and the bytes `free` for it
    there (after the models loaded before it)."""

    def __init__(self, message: str, model: str = "", free: int = 0) -> None:
        super().__init__(message)
        self.model, self.free = model, free


def cgroup_memory_limits(
    proc_cgroup: str | None = None, root: Path = CGROUP_ROOT, env: Mapping[str, str] | None = None
) -> list[MemoryLimit]:
    """Every memory limit of this process's cgroup and its ancestors (a slice's limit binds its services too).

    cgroup v2: `memory.max` ("max" = none) and `memory.current`; v1 (only where the memory controller sits on a
    v1 hierarchy): `memory.limit_in_bytes` and `memory.usage_in_bytes`. Usage counts what the kernel must keep,
    not page cache it can drop (inactive files), as the OOM killer sees it. `proc_cgroup` is the text of
    /proc/self/cgroup (read when None).
    """
    env = os.environ if env is None else env
    if env.get(CGROUP_ROOT_ENV):
        return [lim for lim in [_level_limit(Path(env[CGROUP_ROOT_ENV]))] if lim is not None]
    if proc_cgroup is None:
        try:
            proc_cgroup = PROC_SELF_CGROUP.read_text()
        except OSError:
            return []  # not Linux, or no /proc: no cgroup to respect
    mount, path = _memory_cgroup(proc_cgroup, root)
    if mount is None:
        return []
    limits = []
    # From the process's own cgroup up to the mount's root. A level that is not there is skipped: in a container
    # without a cgroup namespace /proc/self/cgroup names the host's path while the mount holds only its own part.
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    for depth in range(len(parts), -1, -1):
        level = _level_limit(mount.joinpath(*parts[:depth]))
        if level is not None:
            limits.append(level)
    return limits


def _memory_cgroup(proc_cgroup: str, root: Path) -> tuple[Path | None, str]:
    """Where the memory controller of this process's cgroup is mounted, and the cgroup's path under it."""
    unified = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "memory" in controllers.split(","):
            return root / "memory", path  # a v1 memory hierarchy (also in hybrid set-ups): it holds the limit
    return (root, unified) if unified is not None else (None, "")


def _level_limit(folder: Path) -> MemoryLimit | None:
    """The limit set on one cgroup folder (v2 or v1 files), or None when it sets none."""
    for limit_file, usage_file, inactive_key in (
        ("memory.max", "memory.current", "inactive_file"),
        ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
    ):
        raw = _read(folder / limit_file)
        if raw is None:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= _UNLIMITED:
            return None
        usage = int(_read(folder / usage_file) or 0)
        inactive = _stat_value(folder / "memory.stat", inactive_key)
        return MemoryLimit(int(raw), max(0, usage - inactive), "cgroup", folder / limit_file)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat_value(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def node_memory_limits(max_memory: int | None, env: Mapping[str, str] | None = None) -> list[MemoryLimit]:
    """The limits a node must respect: its cgroup's, and --max-memory (against what this process holds)."""
    limits = cgroup_memory_limits(env=env)
    if max_memory is not None:
        rss = psutil.Process().memory_info().rss
        limits.append(MemoryLimit(max_memory, rss, "--max-memory"))
    return limits


def check_models_fit(
    needs: Sequence[tuple[str, int]],
    limits: Sequence[MemoryLimit],
    shrink: Callable[[int, int], int | None] | None = None,
) -> list[int]:
    """What each model may take (bytes, in load order), or `ModelTooBig` naming the first model that would not fit
    under one of `limits`, what it needs, the limit and where it comes from. `needs` are (model name, estimated
    bytes); `shrink(index, free)`, when given, may offer a smaller need for a model that does not fit as it is (a chat
    model's key/value cache left to the node), or None."""
    taken = 0
    granted: list[int] = []
    for index, (name, need) in enumerate(needs):
        free = min((lim.free for lim in limits), default=None)
        if shrink is not None and free is not None and taken + need > free:
            smaller = shrink(index, free - taken)
            if smaller is not None:
                need = smaller
        for lim in limits:
            if taken + need <= lim.free:
                continue
            if lim.source == "cgroup":
                where = f"the {_size(lim.limit)} cgroup memory limit"
                origin = f"set in {lim.file}: systemd's MemoryMax= or a container's limit; {_size(lim.used)} in use"
            else:
                where = f"--max-memory {_size(lim.limit)}"
                origin = f"this process already holds {_size(lim.used)}"
            if index:
                origin += f"; {_size(taken)} go to {', '.join(n for n, _ in needs[:index])}, loaded before it"
            raise ModelTooBig(
                f"model {name} needs about {_size(need)}, but only {_size(max(0, lim.free - taken))} of {where} is "
                f"free ({origin}). Serve fewer or smaller models (or a lower --precision), or raise the limit",
                name,
                max(0, min(lim.free for lim in limits) - taken),
            )
        taken += need
        granted.append(need)
    return granted


def describe_limits(limits: Sequence[MemoryLimit]) -> str:
    """One line for the log: the tightest limit and what is free under it."""
    lim = min(limits, key=lambda lim: lim.free)
    where = f"the cgroup memory limit ({lim.file})" if lim.source == "cgroup" else "--max-memory"
    return f"{_size(lim.free)} of {_size(lim.limit)} free under {where}"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
