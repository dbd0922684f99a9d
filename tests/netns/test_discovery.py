"""mDNS discovery for real, between hosts in network namespaces: finding peers, losing them, seeing restarts."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import protocol
from bench.hosts import Host, Lan

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

MakeLan = Callable[[int], Lan]
REPO = Path(__file__).resolve().parents[2]
PORT = 7000

# One node's discovery, reporting on stdout as JSON lines; "stop" on stdin (or EOF) stops it gracefully.
PROBE = """
import json, sys, threading, time
from protocol import PeerAddr
from mesh import Discovery

node, ip, port, iface = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lock = threading.Lock()

def emit(event, **fields):
    with lock:
        sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\\n")
        sys.stdout.flush()

def found(a):
    emit("found", node=a.addr.node, host=a.addr.host, port=a.addr.port, pub_port=a.addr.pub_port,
         version=a.version, fingerprint=a.fingerprint, source=a.source)

d = Discovery(PeerAddr(node, ip, port, port + 1), fingerprint="fp-" + node,
              interfaces=None if iface == "all" else [iface], on_found=found, on_lost=lambda n: emit("lost", node=n))
emit("starting")
d.start()
emit("started")
for line in sys.stdin:
    if line.strip() == "stop":
        break
t = time.monotonic()
d.stop()
emit("stopped", took=time.monotonic() - t)
"""


@dataclass
class Probe:
    """A discovery process on one host and the events it reported (CLOCK_MONOTONIC is shared by all processes)."""

    node: str
    host: Host
    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    _inbox: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    _reader: threading.Thread | None = None

    @classmethod
    def spawn(cls, lan: Lan, host: Host, port: int = PORT, iface: str = "all") -> Probe:
        node = f"node-{host.index}"
        argv = [sys.executable, "-c", PROBE, node, host.ip, str(port), iface]
        env = {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        proc = lan.spawn(host, argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        probe = cls(node, host, proc)
        probe._reader = threading.Thread(target=probe._read, daemon=True)
        probe._reader.start()
        return probe

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._inbox.put(json.loads(line))

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first event (already seen or arriving within `timeout`) that matches."""
        for ev in self.events:
            if match(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            gone = self._reader is not None and not self._reader.is_alive() and self._inbox.empty()
            if left <= 0 or gone:
                raise AssertionError(f"{self.node}: no matching event within {timeout} s; saw {self.events}")
            try:
                ev = self._inbox.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            self.events.append(ev)
            if match(ev):
                return ev

    def found(self, node: str, timeout: float, port: int = PORT) -> dict[str, Any]:
        return self.wait_for(lambda e: e["event"] == "found" and e["node"] == node and e["port"] == port, timeout)

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()


def start_all(lan: Lan) -> list[Probe]:
    # Host 0 names its interface, the others let zeroconf use every interface: both ways must work.
    probes = [Probe.spawn(lan, h, iface="eth0" if h.index == 0 else "all") for h in lan.hosts]
    for p in probes:
        p.wait_for(lambda e: e["event"] == "started", timeout=30)
    return probes


def test_every_host_sees_the_other_two_within_three_seconds(make_lan: MakeLan) -> None:
    lan = make_lan(3)
    t_spawn = time.monotonic()
    probes = start_all(lan)
    t_starting = max(p.wait_for(lambda e: e["event"] == "starting", 0)["t"] for p in probes)
    seen_at = []
    for p in probes:
        for other in probes:
            if other is not p:
                ev = p.found(other.node, timeout=10)
                assert ev == ev | {
                    "host": other.host.ip,
                    "pub_port": PORT + 1,
                    "version": protocol.VERSION,
                    "fingerprint": f"fp-{other.node}",
                    "source": "mdns",
                }
                seen_at.append(ev["t"])
    converged = max(seen_at) - t_starting
    print(
        f"\nmDNS convergence, 3 hosts: {converged:.2f} s after the last Discovery.start() began "
        f"({max(seen_at) - t_spawn:.2f} s after spawning the processes, interpreter start-up included)"
    )
    assert converged <= 3.0
    assert not any(e["event"] == "found" and e["node"] == p.node for p in probes for e in p.events), "saw itself"


def test_a_host_that_stops_is_lost_by_the_others_promptly(make_lan: MakeLan) -> None:
    lan = make_lan(3)
    probes = start_all(lan)
    leaving, stay = probes[2], probes[:2]
    for p in stay:
        p.found(leaving.node, timeout=10)
    t_stop = time.monotonic()
    leaving.stop()
    stopped = leaving.wait_for(lambda e: e["event"] == "stopped", timeout=10)
    assert stopped["took"] < 2.0
    assert leaving.proc.wait(10) == 0
    is_lost = lambda e: e["event"] == "lost" and e["node"] == leaving.node
    lost_after = [p.wait_for(is_lost, timeout=5)["t"] - t_stop for p in stay]
    print(
        f"\nmDNS goodbye: peers dropped the stopped node {max(lost_after) * 1000:.0f} ms after stop() began "
        f"(stop() took {stopped['took'] * 1000:.0f} ms)"
    )
    assert max(lost_after) <= 2.0
    assert not any(e["event"] == "lost" and e["node"] != leaving.node for p in stay for e in p.events)


def test_a_host_restarted_on_a_new_port_is_found_again(make_lan: MakeLan) -> None:
    lan = make_lan(3)
    probes = start_all(lan)
    crashed, stay = probes[2], probes[:2]
    for p in stay:
        p.found(crashed.node, timeout=10)
    # kill -9: no goodbye, so the peers still hold the old records when the new process announces itself.
    os.killpg(crashed.proc.pid, signal.SIGKILL)
    crashed.proc.wait(10)
    restarted = Probe.spawn(lan, crashed.host, port=PORT + 100)
    started = restarted.wait_for(lambda e: e["event"] == "started", timeout=30)
    for p in stay:
        ev = p.found(crashed.node, timeout=10, port=PORT + 100)
        assert ev["pub_port"] == PORT + 101
        assert ev["t"] - started["t"] <= 3.0
    for p in stay:
        restarted.found(p.node, timeout=10)


# Runs in a namespace: prints what a one-shot browse() hears, or what start() says about a duplicate node id.
BROWSE = """
import json, sys
from mesh import browse
print(json.dumps(sorted([a.addr.node, a.addr.host, a.addr.port] for a in browse(float(sys.argv[1])))))
"""
DUPLICATE = """
import sys
from protocol import PeerAddr
from mesh import Discovery
d = Discovery(PeerAddr(sys.argv[1], sys.argv[2], 7000, 7001), on_found=print, on_lost=print)
try:
    d.start()
except RuntimeError as e:
    print(e)
else:
    d.stop()
    print("registered")
"""


def run_python(lan: Lan, host: Host, code: str, *args: str) -> str:
    done = lan.exec(host, ["env", f"PYTHONPATH={REPO}", sys.executable, "-c", code, *args], timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_browse_lists_the_nodes_on_the_lan(make_lan: MakeLan) -> None:
    lan = make_lan(3)
    probes = [Probe.spawn(lan, h) for h in lan.hosts[:2]]
    for p in probes:
        p.wait_for(lambda e: e["event"] == "started", timeout=30)
    heard = json.loads(run_python(lan, lan.hosts[2], BROWSE, "2.0"))
    assert heard == [[p.node, p.host.ip, PORT] for p in probes]


def test_a_second_node_with_the_same_id_is_refused_with_a_clear_error(make_lan: MakeLan) -> None:
    lan = make_lan(2)
    first = Probe.spawn(lan, lan.hosts[0])
    first.wait_for(lambda e: e["event"] == "started", timeout=30)
    said = run_python(lan, lan.hosts[1], DUPLICATE, first.node, lan.hosts[1].ip)
    assert "already uses the name" in said and "another name" in said
