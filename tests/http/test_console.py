"""The operator's commands end to end: `lanmesh chat` fed from stdin, `lanmesh doctor` against a running node,
and the node's refusals and fallbacks around its HTTP options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from gateway_nodes import GatewayNode, free_port, start_gateway_node, wait_until

from bench.procs import ROOT, Cluster
from mesh import Client
from nodes.cli.console import ChatSession
from tests.conftest import LOOPBACK

# mDNS must never reach a real network: only where this process sees nothing but loopback (a test namespace).
ONLY_LOOPBACK = set(psutil.net_if_addrs()) <= {"lo"}


def lanmesh(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "nodes.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_chat_streams_each_answer_and_stops_at_exit(echo_node: GatewayNode) -> None:
    out = lanmesh(
        "chat", "--node", echo_node.proc.address, "--model", "sleep:200",
        stdin="one two three\n\n  second   question  \n/exit\nnever sent\n",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["one two three", "second   question"]


def test_chat_keeps_the_conversation_as_history(echo_node: GatewayNode) -> None:
    with Client(echo_node.proc.address, timeout=10) as client:
        out = open(os.devnull, "w")  # noqa: SIM115 - closed below
        system = [{"role": "system", "content": "be brief"}]
        session = ChatSession(client, "echo", {}, out, out, False, list(system))
        assert session.turn("first") and session.turn("second")
        out.close()
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in session.history[1:]] == ["first", "first", "second", "second"]


def test_chat_reports_errors_and_goes_on(echo_node: GatewayNode) -> None:
    out = lanmesh("chat", "--node", echo_node.proc.address, "--model", "no-such-model", stdin="hello\nagain\n")
    assert out.returncode == 1
    assert out.stderr.count("ModelNotFound") == 2 and "Traceback" not in out.stderr


def test_ctrl_c_stops_the_answer_not_the_chat(echo_node: GatewayNode) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodes.cli", "chat", "--node", echo_node.proc.address, "--model", "sleep:2000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(" ".join(f"w{i}" for i in range(16)) + "\n")
        proc.stdin.flush()
        assert proc.stdout.read(3) == "w0 "  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/exit\n")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rest.rstrip().endswith("[interrupted]") and "w15" not in rest


def test_doctor_explains_the_node_without_mdns(echo_node: GatewayNode) -> None:
    t0 = time.monotonic()
    out = lanmesh("doctor", "--node", echo_node.proc.address, "--no-mdns")
    assert out.returncode == 0, out.stderr
    sections = ("== Interfaces on this machine", f"== Node at {echo_node.proc.address}", "== Peers this node knows")
    assert all(section in out.stdout for section in sections)
    assert "http-echo answers in" in out.stdout and "echo, sleep:200, sleep:2000" in out.stdout
    assert "lo " in out.stdout and "loopback" in out.stdout
    assert time.monotonic() - t0 < 15


def test_doctor_says_when_the_node_is_not_there() -> None:
    out = lanmesh("doctor", "--node", f"127.0.0.1:{free_port()}", "--no-mdns")
    assert out.returncode == 1
    assert "not reachable" in out.stdout and "Traceback" not in out.stderr


@pytest.mark.skipif(not ONLY_LOOPBACK, reason="mDNS only inside a loopback-only network namespace (sandbox, CI)")
def test_doctor_names_why_announced_nodes_are_not_peers(cluster: Cluster) -> None:
    from zeroconf import ServiceInfo, Zeroconf

    from mesh import discovery

    node = cluster.add("seen", [a for a in LOOPBACK if a != "--no-mdns"] + ["--http-port", "0", "--model", "echo"])
    mine = next(a for a in discovery.browse(2.0) if a.addr.node == "seen")
    closed = free_port()
    zc = Zeroconf(interfaces=["127.0.0.1"])
    ghosts = {
        "ghost-closed": (mine.fingerprint, "1"),
        "ghost-foreign": ("0123abcd", "1"),
        "ghost-old": (mine.fingerprint, "99"),
    }
    infos = []
    try:
        for name, (fingerprint, version) in ghosts.items():
            txt = {"node": name, "port": str(closed), "pub_port": str(closed), "version": version}
            txt["fingerprint"] = fingerprint
            info = ServiceInfo(
                discovery.SERVICE_TYPE,
                f"{name}.{discovery.SERVICE_TYPE}",
                addresses=[bytes([127, 0, 0, 1])],
                port=closed,
                properties=txt,
                server=f"{name}.local.",
            )
            zc.register_service(info)
            infos.append(info)

        # The node learns the two ghosts with its key from mDNS too and tries them: wait until it has known both
        # (a peer told of that never reports itself stays "unverified", never a member, and is dropped as never
        # heard from) and none of them is alive.
        seen: set[str] = set()

        def given_up() -> bool:
            rows = node.status()
            seen.update(r["node"] for r in rows if r["node"] in ghosts)
            alive = [r for r in rows if r["node"] in ghosts and r["state"] == "alive"]
            return {"ghost-closed", "ghost-old"} <= seen and not alive

        wait_until(given_up, timeout=15, what="the ghosts seen silent")
        out = lanmesh("doctor", "--node", node.address, "--mdns-timeout", "5")
    finally:
        for info in infos:
            zc.unregister_service(info)
        zc.close()
    assert out.returncode == 0, out.stderr
    assert "multicast works" in out.stdout
    lines = {line.split(" at ")[0].strip(): line for line in out.stdout.splitlines() if "ghost-" in line}
    assert f"port {closed} closed" in lines["ghost-closed"]
    assert "another mesh key" in lines["ghost-foreign"] or "protocol v" in lines["ghost-foreign"]
    assert "speaks protocol v99" in lines["ghost-old"]


def test_a_lan_wide_gateway_without_an_api_key_is_refused() -> None:
    out = lanmesh("node", *LOOPBACK, "--model", "echo", "--http-port", "8000", "--http-host", "0.0.0.0", timeout=30)
    assert out.returncode != 0
    assert "API key" in out.stderr or "api-key" in out.stderr
    assert "0.0.0.0" in out.stderr and "Traceback" not in out.stderr


def test_an_api_key_shorter_than_16_characters_stops_the_node_at_start() -> None:
    out = lanmesh("node", *LOOPBACK, "--model", "echo", "--api-key", "short-key", timeout=30)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "at least 16" in out.stderr and "9 characters" in out.stderr and "short-key" not in out.stderr


def test_an_unreadable_api_key_file_stops_the_node_before_it_loads_models(tmp_path: Path) -> None:
    out = lanmesh("node", *LOOPBACK, "--model", "echo", "--api-key-file", str(tmp_path / "missing"), timeout=30)
    assert out.returncode != 0 and "API key file" in out.stderr and "Traceback" not in out.stderr


def test_the_key_can_come_from_a_file(cluster: Cluster, tmp_path: Path) -> None:
    key_file = tmp_path / "api.key"
    key_file.write_text("from-a-file-sixteen-chars\n")
    node = start_gateway_node(cluster, "file-keyed", ["echo"], ["--api-key-file", str(key_file)])
    assert node.openai("from-a-file-sixteen-chars").models.list().data[0].id == "echo"


def test_a_node_without_the_web_stack_still_serves_and_says_why(cluster: Cluster, tmp_path: Path) -> None:
    blocker = tmp_path / "no-web" / "fastapi"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n")
    env = {"PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}"}
    node = cluster.add("no-http", [*LOOPBACK, "--model", "echo", "--http-port", str(free_port())], env=env)
    with Client(node.address, timeout=10) as client:
        assert client.request("echo", "complete", "still here").output == "still here"
    wait_until(lambda: "HTTP gateway disabled: pip install lanmesh[http]" in node.log_tail(), what="the warning")
