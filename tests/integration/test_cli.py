"""The `lanmesh` command as a user types it: help, version, request, status, and clear refusals: every error one
line that says what to do, a node that does not answer given up within seconds, Ctrl-C a quiet cancel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from scripted_node import ScriptedNode, closed_port, wait_until

from bench.procs import ROOT, Cluster, NodeProc
from nodes.cli.main import build_parser
from tests.conftest import LOOPBACK

# mDNS must never reach a real network: only where this process sees nothing but loopback (a test namespace).
ONLY_LOOPBACK = set(psutil.net_if_addrs()) <= {"lo"}


def lanmesh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "nodes.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_version_and_help_explain_the_commands() -> None:
    v = lanmesh("--version")
    assert v.returncode == 0 and v.stdout.startswith("lanmesh ")
    top = lanmesh("--help")
    for command in ("node", "request", "status", "models", "systemd-unit", "start here:", "lanmesh keygen"):
        assert command in top.stdout
    request_help = lanmesh("request", "--help").stdout
    assert "examples:" in request_help and "(default: 60.0)" in request_help and "(default: None)" not in request_help
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


def test_bad_configuration_stops_the_node_before_any_model_loads_or_it_joins(silent_port: int, tmp_path: Path) -> None:
    echo = ["node", *LOOPBACK, "--model", "echo"]
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    for argv, code, message in (
        ([*echo, "--max-memory", "300"], 2, "max_memory 300 has no unit, so it would mean 300 bytes: write 300M"),
        ([*echo, "--max-memory", "abc"], 2, "max_memory: size 'abc' is not a number with a unit, like 512M or 8G"),
        ([*echo, "--model", "sleep:fast"], 2, "ms must be a number"),
        ([*echo, "--port", str(silent_port)], 1, f"port {silent_port} is in use on 127.0.0.1"),
        ([*echo, "--interface", "nosuch0"], 1, "no interface named or addressed 'nosuch0'"),
        ([*echo, "--cache-dir", str(not_a_folder / "cache")], 1, f"--cache-dir {not_a_folder / 'cache'}: cannot write"),
    ):
        out = lanmesh(*argv)
        assert out.returncode == code and message in out.stderr, (argv, out.stderr)
        assert "Traceback" not in out.stderr
        for started in ("model echo ready", "node up", "serving echo"):
            assert started not in out.stderr, (argv, out.stderr)


def test_node_refuses_bad_configuration_clearly() -> None:
    out = lanmesh("node", "--no-mdns", "--bind", "127.0.0.1", "--model", "sleep:fast")
    assert out.returncode != 0 and "sleep" in out.stderr and "Traceback" not in out.stderr
    out = lanmesh("node", "--no-mdns", "--bind", "127.0.0.1", "--model", "echo", "--suspect-after", "5")
    assert out.returncode == 2 and "suspect_after < dead_after" in out.stderr


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The command failed with one line on stderr (no traceback), which it returns."""
    assert out.returncode not in (0, None), out
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def timed(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = lanmesh(*args)
    return out, time.monotonic() - t0


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) but never says a word: not a lanmesh node."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


def test_commands_give_up_within_5s_when_no_node_answers_saying_what_to_check(silent_port: int) -> None:
    closed = closed_port()
    for args in (
        ("request", "echo", "hi", "--node", f"127.0.0.1:{closed}"),  # its deadline is 60 s
        ("models", "--node", f"127.0.0.1:{closed}"),  # a traceback before
        ("models", "pull", "smollm2", "--node", f"127.0.0.1:{closed}"),  # its deadline is 900 s
        ("status", "--node", f"127.0.0.1:{closed}"),
        ("chat", "--node", f"127.0.0.1:{closed}"),
    ):
        out, took = timed(*args)
        line = one_line_error(out)
        assert took < 5.0, f"{args} took {took:.1f}s"
        assert f"no lanmesh node answered at 127.0.0.1:{closed} within 3s" in line, line
        assert f"port {closed} closed" in line and "--node HOST:PORT" in line, line
    out, took = timed("request", "echo", "hi", "--node", f"127.0.0.1:{silent_port}")
    line = one_line_error(out)
    assert took < 5.0 and f"port {silent_port} is open but nothing there answered as a lanmesh node" in line, line


def test_a_slow_answer_from_a_live_node_gets_its_whole_deadline(cluster: Cluster) -> None:
    node = cluster.add("slow", [*LOOPBACK, "--model", "sleep:6500"])
    out, took = timed("request", "sleep:6500", "worth the wait", "--node", node.address, "--timeout", "30")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "worth the wait" and took > 6.5


@pytest.mark.parametrize("before", [True, False], ids=["--node before the action", "--node after the action"])
def test_models_actions_act_on_the_node_given_before_or_after_the_action(cluster: Cluster, before: bool) -> None:
    node = cluster.add("target", [*LOOPBACK, "--model", "echo"])
    where = ["--node", node.address, "--timeout", "30"]
    load = ["load", "spare", "name=spare,kind=echo"]
    out = lanmesh("models", *where, *load) if before else lanmesh("models", *load, *where)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: "spare" in node.status()[0]["models"], 10, "the node to serve the model it was told to load")
    unload = ["unload", "spare"]
    out = lanmesh("models", *where, *unload) if before else lanmesh("models", *unload, *where)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: "spare" not in node.status()[0]["models"], 10, "the model to be unloaded")


def test_options_of_lanmesh_models_keep_their_value_on_either_side_of_the_action() -> None:
    parse = build_parser().parse_args
    for argv in (
        ["models", "--node", "h:1", "--timeout", "7", "--key-file", "k", "pull", "x"],
        ["models", "pull", "x", "--node", "h:1", "--timeout", "7", "--key-file", "k"],
    ):
        args = parse(argv)
        assert (args.node, args.timeout, args.key_file) == ("h:1", 7.0, "k"), argv


def test_a_streamed_answer_cut_at_max_tokens_says_so_and_how_to_get_more() -> None:
    with ScriptedNode("T") as node:
        address = node.endpoint.removeprefix("tcp://")
        out = lanmesh("request", "stream:10", "count", "--stream", "--max-tokens", "3", "--node", address)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "w0 w1 w2"
        assert "cut at max_tokens after 3 tokens, finish_reason length" in out.stderr
        assert "--max-tokens 64" in out.stderr
        whole = lanmesh("request", "stream:4", "count", "--stream", "--node", address)
        assert whole.stdout.strip() == "w0 w1 w2 w3" and "cut" not in whole.stderr
        plain = lanmesh("request", "stream:10", "count", "--max-tokens", "3", "--node", address)
        assert "finish_reason length" in plain.stderr
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        chat = subprocess.run([sys.executable, "-m", "nodes.cli", "chat", "--model", "stream:10", "--max-tokens", "3",
                               "--node", address], input="count\n", capture_output=True, text=True, timeout=30,
                              env=env)  # fmt: skip
        assert chat.stdout.strip() == "w0 w1 w2" and "cut at max_tokens after 3 tokens" in chat.stderr


def _inflight(node: NodeProc, model: str) -> int:
    return int(node.status()[0]["models"][model][0])


@pytest.mark.parametrize("stream", [False, True], ids=["request", "--stream"])
def test_ctrl_c_cancels_the_request_on_the_node_and_exits_130_quietly(cluster: Cluster, stream: bool) -> None:
    node = cluster.add("busy", [*LOOPBACK, "--model", "sleep:20000"])
    argv = ["request", "sleep:20000", "a long job", "--node", node.address, *(["--stream"] if stream else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "nodes.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        wait_until(lambda: _inflight(node, "sleep:20000") == 1, 10, "the request to run on the node")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    wait_until(lambda: _inflight(node, "sleep:20000") == 0, 3, "the node to stop the cancelled work")


def test_a_reader_that_goes_away_ends_the_command_quietly_as_a_pipeline_expects(cluster: Cluster) -> None:
    node = cluster.add("piped", [*LOOPBACK, "--model", "echo"])
    read, write = os.pipe()
    os.close(read)  # `lanmesh status | head -0`: nobody reads what it writes
    try:
        cmd = [sys.executable, "-m", "nodes.cli", "status", "--node", node.address]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, stdout=write, stderr=subprocess.PIPE, text=True, timeout=30, env=env)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == "", done.stderr


@pytest.mark.skipif(not ONLY_LOOPBACK, reason="mDNS only inside a loopback-only network namespace (sandbox, CI)")
def test_a_node_whose_name_is_taken_on_the_lan_says_so_in_one_line(cluster: Cluster) -> None:
    mdns = [a for a in LOOPBACK if a != "--no-mdns"]
    cluster.add("twin", [*mdns, "--model", "echo"])
    out = lanmesh("node", "--name", "twin", *mdns, "--port", str(closed_port()), "--model", "echo", timeout=60)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert "lanmesh node: cannot start: another node on the LAN already uses the name 'twin'" in out.stderr
    assert "give this node another name (lanmesh node --name NAME)" in out.stderr
