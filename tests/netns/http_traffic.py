"""HTTP traffic for the hostile-LAN tests, run inside a host's namespace: `python -m tests.netns.http_traffic CMD`.

    wait  URL                      until URL/health answers 200 (prints {"event": "ready"})
    slow  HOST PORT COUNT SECONDS  hold COUNT connections that never finish their headers, re-opening any the
                                   server closes, for SECONDS; then close them all (bounded: at most 50 opens per
                                   connection slot)
    valid URL KEY SECONDS RATE     chat requests with the key, each on a new connection, RATE per second for
                                   SECONDS; the status and latency of each

Each prints JSON lines; the last is {"event": "summary", ...}.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from typing import Any

import httpx

PARTIAL_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer not-the-key\r\n"


def _say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def wait(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                _say("ready")
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    _say("summary", ready=False)
    sys.exit(1)


def _open(host: str, port: int) -> socket.socket | None:
    try:
        sock = socket.create_connection((host, port), timeout=2)
        sock.sendall(PARTIAL_HEAD)
        sock.setblocking(False)
        return sock
    except OSError:
        return None


def slow(host: str, port: int, count: int, seconds: float) -> None:
    conns: list[socket.socket] = []
    opened = closed_by_server = failed = 0
    most_open = 0
    end = time.monotonic() + seconds
    budget = count * 50
    ramped = False
    while time.monotonic() < end:
        while len(conns) < count and opened < budget and time.monotonic() < end:
            sock = _open(host, port)
            opened += 1
            if sock is None:
                failed += 1
                break
            conns.append(sock)
        if not ramped and (len(conns) >= count or opened >= count):
            ramped = True
            _say("ramped", open=len(conns))
        most_open = max(most_open, len(conns))
        readable, _, _ = select.select(conns, [], [], 0.2) if conns else ([], [], [])
        for sock in readable:
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                closed_by_server += 1
                conns.remove(sock)
                sock.close()
    still_open = len(conns)
    for sock in conns:
        sock.close()
    _say(
        "summary", opened=opened, closed_by_server=closed_by_server, failed=failed, most_open=most_open,
        open_at_end=still_open,
    )  # fmt: skip


def valid(url: str, key: str, seconds: float, rate: float) -> None:
    body = {"model": "sleep:20", "messages": [{"role": "user", "content": "hello from another host"}]}
    headers = {"Authorization": f"Bearer {key}"}
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        t0 = time.monotonic()
        try:
            # A new connection each time: the hard case, since it must be let in past the other host's connections.
            status = str(httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=10).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        latencies.append(time.monotonic() - t0)
        statuses[status] = statuses.get(status, 0) + 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1) if ordered else 0.0

    metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    dropped = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("lanmesh_http_connections_dropped_total{")
    }
    _say(
        "summary", requests=len(latencies), statuses=statuses, p50_ms=pct(0.5), p99_ms=pct(0.99), max_ms=pct(1.0),
        dropped=dropped,
    )  # fmt: skip


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "wait":
        wait(args[0])
    elif command == "slow":
        slow(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif command == "valid":
        valid(args[0], args[1], float(args[2]), float(args[3]))
    else:
        sys.exit(f"unknown command {command!r}")
