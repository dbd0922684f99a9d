"""A node run by systemd: what it says on the notify socket over its life (ready once it serves, watchdog pings
only while its mesh loop turns, stopping on SIGTERM), and models that would not fit its memory limit (the cgroup's
or --max-memory) refused at start with a clear error. Node processes on loopback, stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import ROOT, NodeProc, free_port_pair, ping
from mesh import MeshNode, MeshSettings, Plaintext
from nodes.runtime.memory_budget import CGROUP_ROOT_ENV
from nodes.runtime.systemd import ServiceNotifier
from protocol import ModelLoad
from tests.conftest import LOOPBACK
from tests.notify_socket import NotifySocket

MiB = 2**20


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.mark.timeout(90)
def test_systemd_hears_ready_once_the_node_serves_then_watchdog_pings_then_stopping_on_sigterm(
    tmp_path: Path, notify: NotifySocket
) -> None:
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"}  # WatchdogSec=1s: a ping every 0.5 s
    node = NodeProc("svc", [*LOOPBACK, "--model", "echo", "--stall-timeout", "0"], insecure=True, env=env,
                    log_dir=tmp_path)  # fmt: skip
    node.start(wait=0)
    try:
        ready = notify.wait_for("READY=1", timeout=60)
        assert ping(node.address, timeout=2.0, security=Plaintext()) is not None, "READY=1 came before it served"
        assert "loading model echo (1/1)" in [n.fields.get("STATUS") for n in notify.received]
        assert ready.fields["STATUS"] == f"serving echo on 127.0.0.1:{node.port}"
        pings = [n for n in notify.collect(2.6) if n.fields.get("WATCHDOG") == "1"]
        assert len(pings) >= 4, pings
        gaps = [b.at - a.at for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < 1.0, f"systemd would have killed it: {gaps}"  # WatchdogSec=1s
        assert 0.35 < sum(gaps) / len(gaps) < 0.7, gaps  # every half of it
        node.signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1", timeout=10)
        assert stopping.fields["STATUS"] == "leaving the mesh"
        assert node.proc is not None and node.proc.wait(30) == 0
        # NotifyAccess=main: systemd listens to the main process only, and it said everything itself.
        assert {n.pid for n in notify.received} == {node.pid}
    finally:
        node.stop()


@pytest.mark.timeout(60)
def test_watchdog_pings_stop_while_the_mesh_loop_is_stuck_and_come_back_when_it_turns(notify: NotifySocket) -> None:
    """A real mesh loop blocked in a handler (the executor's load view) stops the pings, so systemd would restart
    the node; the in-process watchdog is off here so nothing else acts."""
    from nodes.models.backends.synthetic import EchoBackend
    from nodes.runtime.executor import Executor

    stuck, blocked, release = threading.Event(), threading.Event(), threading.Event()

    class Blocking(Executor):
        def models(self) -> dict[str, ModelLoad]:
            if stuck.is_set():
                blocked.set()
                release.wait(30)
            return super().models()

    executor = Blocking([EchoBackend()])
    executor.start()
    node = MeshNode(executor, MeshSettings("stuck", bind="127.0.0.1", port=0, mdns=False, stall_timeout=0))
    node.start()
    notifier = ServiceNotifier(notify.address, watchdog_s=0.4)  # a ping every 0.2 s while the loop turns
    try:
        notifier.watch_loop(lambda: node.last_turn)
        assert len([n for n in notify.collect(1.0) if "WATCHDOG" in n.fields]) >= 3
        stuck.set()
        assert blocked.wait(5), "the loop never reached the blocking handler"
        stalled_at = time.monotonic()
        late = [n.at - stalled_at for n in notify.collect(1.5) if "WATCHDOG" in n.fields]
        # At most the ping of the check interval in which the loop still turned (0.2 s, plus scheduling), then none.
        assert len(late) <= 1 and all(t < 0.5 for t in late), f"pings went on from a stuck loop: {late}"
        release.set()
        notify.wait_for("WATCHDOG=1", timeout=2)
    finally:
        release.set()
        notifier.close()
        node.stop()
        executor.stop(1.0)


def _big_model(folder: Path, parameters: int) -> Path:
    """An HF model folder whose safetensors header claims `parameters` fp32 weights (the data is not there: the
    node must refuse it from the header alone, before loading anything)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [parameters], "data_offsets": [0, 4 * parameters]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


def _start_node(
    argv: list[str], env: dict[str, str], cgroup_procs: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `lanmesh node` to its end (it is expected to refuse to start); stopped by PID if it does not.
    `cgroup_procs`: the cgroup.procs file of a cgroup to run it in."""
    cmd = [sys.executable, "-m", "nodes.cli", "node", "--name", "m", "--port", str(free_port_pair()), "--insecure",
           *LOOPBACK, *argv]  # fmt: skip
    if cgroup_procs is not None:  # the shell moves itself into the cgroup, then becomes the node
        cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup_procs), *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the node did not refuse to start:\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.timeout(90)
def test_a_model_bigger_than_the_cgroup_memory_limit_is_refused_at_start_saying_what_and_where(
    tmp_path: Path, notify: NotifySocket
) -> None:
    cgroup = tmp_path / "cgroup"  # stands for /sys/fs/cgroup/system.slice/lanmesh.service
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{256 * MiB}\n")
    (cgroup / "memory.current").write_text(f"{64 * MiB}\n")
    model = _big_model(tmp_path / "big", 300_000_000)  # 1.2 GB as fp32, plus headroom
    done = _start_node(
        ["--model", f"name=big,path={model},engine=transformers"],
        {CGROUP_ROOT_ENV: str(cgroup), "NOTIFY_SOCKET": notify.address},
    )
    assert done.returncode == 1, done.stderr
    message = (
        "lanmesh node: cannot start: model big needs about 1.3 GiB, but only 192 MiB of the 256 MiB cgroup memory "
        f"limit is free (set in {cgroup / 'memory.max'}: systemd's MemoryMax= or a container's limit; 64 MiB in use)"
    )
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    status = [n.fields["STATUS"] for n in notify.collect(0.2) if "STATUS" in n.fields]
    assert status[-1].startswith("cannot start: model big needs about 1.3 GiB"), status


@pytest.mark.timeout(90)
def test_max_memory_alone_refuses_a_model_that_would_take_the_process_past_it(tmp_path: Path) -> None:
    no_limit = tmp_path / "cgroup"  # a cgroup without a memory limit, whatever this machine's is
    no_limit.mkdir()
    model = _big_model(tmp_path / "big", 300_000_000)
    done = _start_node(
        ["--model", f"name=big,path={model},engine=transformers", "--max-memory", "1G"],
        {CGROUP_ROOT_ENV: str(no_limit)},
    )
    assert done.returncode == 1, done.stderr
    assert "lanmesh node: cannot start: model big needs about 1.3 GiB, but only " in done.stderr
    assert "of --max-memory 1.0 GiB is free (this process already holds " in done.stderr


@pytest.mark.timeout(90)
def test_the_node_reads_the_memory_limit_of_the_cgroup_it_really_runs_in(
    tmp_path: Path, memory_hierarchy: tuple[Path, str, bool]
) -> None:
    """Real kernel files: a child of this process's memory cgroup with a 200 MiB limit, the node moved into it."""
    mount, own, usual = memory_hierarchy
    child = mount / own.lstrip("/") / f"lanmesh-test-{os.getpid()}"
    try:
        child.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup under {child.parent}: {exc.strerror}")
    try:
        (child / "memory.limit_in_bytes").write_text(str(200 * MiB))
        model = _big_model(tmp_path / "big", 300_000_000)
        # Where /sys/fs/cgroup is not this hierarchy the node cannot find its cgroup from /proc/self/cgroup: say it.
        env = {} if usual else {CGROUP_ROOT_ENV: str(child)}
        done = _start_node(["--model", f"name=big,path={model},engine=transformers"], env, child / "cgroup.procs")
        assert done.returncode == 1, done.stderr
        assert "model big needs about 1.3 GiB, but only " in done.stderr
        assert f"of the 200 MiB cgroup memory limit is free (set in {child / 'memory.limit_in_bytes'}:" in done.stderr
    finally:
        child.rmdir()  # the node has exited: the cgroup is empty
