"""Shared fixtures: node processes on loopback, stopped by PID after each test; the test mesh key."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import Cluster
from mesh import INSECURE_ENV, KEY_ENV, MeshKey

# Nodes in loopback tests never touch a real network: bound to 127.0.0.1, no mDNS; no HTTP gateway
# unless a test asks for one (a later --http-port wins).
LOOPBACK = ["--bind", "127.0.0.1", "--no-mdns", "--http-port", "0"]


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C works in the run and in what it starts, however the run was launched. A shell without job control
    starts `cmd &` with SIGINT ignored; Python then installs no KeyboardInterrupt handler, and every child
    inherits the ignore, so the Ctrl-C tests would see a client or `lanmesh chat` shrug off SIGINT."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _plaintext_unless_keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests speak plaintext unless they ask for the mesh key (`keyed`, which `cluster` uses): a key file on
    the developer's machine must not leak into them, and scripted stand-in nodes speak plaintext."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv(INSECURE_ENV, "1")


@pytest.fixture(scope="session")
def mesh_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mesh key for the whole test session, written as `lanmesh keygen` would (mode 0600)."""
    return MeshKey.generate().write(tmp_path_factory.mktemp("mesh-key") / "mesh.key")


@pytest.fixture
def keyed(mesh_key_file: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nodes started and clients made in this test use the session's mesh key: CURVE on every connection."""
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    monkeypatch.setenv(KEY_ENV, str(mesh_key_file))
    return mesh_key_file


@pytest.fixture
def cluster(tmp_path: Path, keyed: Path) -> Iterator[Cluster]:
    with Cluster(log_dir=tmp_path) as c:
        yield c
        for node in c.nodes:
            if node.alive():
                continue
            # Surface a crashed node's log in the failure report.
            print(f"--- log of {node.name} ---\n{node.log_tail()}")


@pytest.fixture
def memory_hierarchy(tmp_path: Path) -> Iterator[tuple[Path, str, bool]]:
    """This process's cgroup v1 memory hierarchy: (where it is mounted, this process's cgroup in it, whether it is
    the usual /sys/fs/cgroup/memory). Inside a network namespace made by `ip netns exec` /sys holds no cgroup file
    system: then the hierarchy is mounted on a temporary folder for the test (as root)."""
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    memory = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    if not memory:
        pytest.skip("needs a cgroup v1 memory hierarchy; on v2 it would take a delegated subtree")
    usual = Path("/sys/fs/cgroup/memory")
    if (usual / "cgroup.procs").exists():
        yield usual, memory[0], True
        return
    mount = tmp_path / "memory-cgroup"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "cgroup", "-o", "memory", "cgroup", str(mount)], capture_output=True,
                             text=True, timeout=10, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount the memory cgroup hierarchy: {mounted.stderr.strip()}")
    try:
        yield mount, memory[0], False
    finally:
        subprocess.run(["umount", str(mount)], timeout=10, check=True)
