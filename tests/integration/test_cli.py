"""The `lanmesh` command as a user types it: help, version, request, status, and clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.procs import ROOT, Cluster
from tests.conftest import LOOPBACK


def lanmesh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "nodes.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_version_and_help_explain_the_commands() -> None:
    v = lanmesh("--version")
    assert v.returncode == 0 and v.stdout.startswith("lanmesh ")
    top = lanmesh("--help")
    for command in ("node", "request", "status"):
        assert command in top.stdout
    node_help = lanmesh("node", "--help").stdout
    for option in ("--peer", "--model", "--interface", "--grace", "LANMESH_"):
        assert option in node_help


def test_request_prints_the_answer_and_who_served_it(cluster: Cluster) -> None:
    node = cluster.add("cli-node", [*LOOPBACK, "--model", "echo"])
    out = lanmesh("request", "echo", "hello from the shell", "--node", node.address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello from the shell"
    assert "served by cli-node" in out.stderr
    js = lanmesh("request", "echo", "x", "--task", "complete", "--json", "--node", node.address)
    assert json.loads(js.stdout)["node"] == "cli-node"
    stream = lanmesh("request", "echo", "one two three", "--stream", "--node", node.address)
    assert stream.stdout.strip() == "one two three"


def test_request_errors_are_reported_not_raised(cluster: Cluster) -> None:
    node = cluster.add("cli-node", [*LOOPBACK, "--model", "echo"])
    out = lanmesh("request", "nope", "x", "--node", node.address)
    assert out.returncode == 1
    assert "ModelNotFound" in out.stderr and "Traceback" not in out.stderr


def test_status_shows_a_table_of_nodes(cluster: Cluster) -> None:
    a = cluster.add("a", [*LOOPBACK, "--model", "echo", "--label", "room=lab"])
    cluster.add("b", [*LOOPBACK, "--model", "echo", "--peer", a.address])
    cluster.wait_converged()
    out = lanmesh("status", "--node", a.address)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["NODE", "ADDRESS", "STATE"]
    assert any(line.startswith("b ") and " alive " in line for line in lines)
    assert "room=lab" in out.stdout


def test_node_refuses_bad_configuration_clearly() -> None:
    out = lanmesh("node", "--no-mdns", "--bind", "127.0.0.1", "--model", "sleep:fast")
    assert out.returncode != 0 and "sleep" in out.stderr and "Traceback" not in out.stderr
    out = lanmesh("node", "--no-mdns", "--bind", "127.0.0.1", "--model", "echo", "--suspect-after", "5")
    assert out.returncode == 2 and "suspect_after < dead_after" in out.stderr
