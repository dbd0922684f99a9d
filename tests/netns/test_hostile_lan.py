"""A hostile host on the LAN cannot stop the HTTP gateway serving others (real hosts: network namespaces).

Host 0 runs a node whose gateway is open to the LAN (with an API key); host 1 holds 600 connections that never
send their headers (no key needed for that), re-opening whatever the gateway closes, for 20 s; host 2 meanwhile
makes valid requests with the key, each on a new connection. Before the per-address caps, 26 of 27 such requests
got 503 (uvicorn counted the slow connections against everyone).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.hosts import Lan
from bench.procs import NodeProc

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
KEY = "hostile-lan-test-key-0123456789"
HTTP_PORT = 8000
SLOW_CONNECTIONS = 600
ATTACK_S = 20.0


def _traffic(lan: Lan, host: int, *args: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.netns.http_traffic", *args]
    return lan.spawn(lan.hosts[host], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))


def _lines(proc: subprocess.Popen[str], until: str, timeout: float) -> dict[str, Any]:
    """Read the helper's JSON lines until the event `until`; that event."""
    assert proc.stdout is not None
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == until:
            return event  # type: ignore[no-any-return]
    proc.wait(timeout)
    raise AssertionError(f"no {until!r} from the traffic helper: {proc.stderr.read() if proc.stderr else ''}")


def test_600_slow_connections_from_one_host_do_not_stop_valid_requests_from_another(
    make_lan: Any, tmp_path: Path, keyed: Path
) -> None:
    lan: Lan = make_lan(3)
    node_host = lan.hosts[0]

    def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[Any]:
        log = open(tmp_path / "gateway.log", "ab")  # noqa: SIM115 - handed to the child
        return lan.spawn(node_host, cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), text=False)

    argv = ["--model", "sleep:20:cap=8", "--no-mdns", "--http-host", "0.0.0.0", "--http-port", str(HTTP_PORT)]
    node = NodeProc("gateway", [*argv, "--api-key", KEY], host=node_host.ip, port=7000, spawn=spawn, key_file=keyed)
    node.log_path = tmp_path / "gateway.log"
    node.start(wait=0)
    url = f"http://{node_host.ip}:{HTTP_PORT}"
    try:
        ready = _traffic(lan, 2, "wait", url)
        assert _lines(ready, "ready", 60)["event"] == "ready", node.log_tail()
        ready.wait(10)

        quiet = _traffic(lan, 2, "valid", url, KEY, "4", "4")
        baseline = _lines(quiet, "summary", 60)
        quiet.wait(10)

        attacker = _traffic(lan, 1, "slow", node_host.ip, str(HTTP_PORT), str(SLOW_CONNECTIONS), str(ATTACK_S))
        _lines(attacker, "ramped", 30)
        client = _traffic(lan, 2, "valid", url, KEY, str(ATTACK_S - 6), "4")
        under_attack = _lines(client, "summary", 60)
        attack = _lines(attacker, "summary", ATTACK_S + 30)
        client.wait(10)
        attacker.wait(10)
    finally:
        node.stop(timeout=10)
    print(f"\nbaseline: {baseline}\nunder attack: {under_attack}\nattacker: {attack}")
    assert baseline["statuses"] == {"200": baseline["requests"]}
    assert under_attack["requests"] >= 40
    assert under_attack["statuses"] == {"200": under_attack["requests"]}, under_attack
    assert under_attack["p99_ms"] < 2000, under_attack
    assert attack["most_open"] >= SLOW_CONNECTIONS  # it really held its 600 sockets open from its side
    assert attack["closed_by_server"] > 0 and under_attack["dropped"].get("per_ip_limit", 0) > 0
