"""The many-hosts machinery: hosts reach each other and nothing else, faults take effect, teardown is complete."""

from __future__ import annotations

import errno
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.hosts import FaultUnavailable, Host, Lan, LanError, netns_unavailable_reason

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

MakeLan = Callable[[int], Lan]
PORT = 7400

# Echoes one line per connection, forever.
ECHO_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        c.sendall(c.recv(1024))
"""
# Connects (1 s timeout), sends a line, prints the echo; exit status 0 only if the echo came back.
ECHO_CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as c:
    c.sendall(b"hello")
    print(c.recv(1024).decode())
"""
# Reads until EOF, answers with the byte count.
SINK_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        n = 0
        while chunk := c.recv(65536):
            n += len(chunk)
        c.sendall(str(n).encode())
"""
# Sends N bytes, prints how long until the server confirmed it got them all.
SINK_CLIENT = """
import socket, sys, time
n = int(sys.argv[3])
t = time.monotonic()
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as c:
    c.sendall(b"x" * n)
    c.shutdown(socket.SHUT_WR)
    assert int(c.recv(64)) == n
print(time.monotonic() - t)
"""
# Counts datagrams until 0.5 s of silence (after the first), prints the count.
UDP_COUNTER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(10)
n = 0
try:
    while True:
        s.recv(64)
        n += 1
        s.settimeout(0.5)
except TimeoutError:
    pass
print(n, flush=True)
"""
UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"%d" % i, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.0002)  # pacing, so only the injected loss drops packets, not a full receive buffer
"""
CONNECT_OUTSIDE = """
import socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2)
except OSError as e:
    print(e.errno)
"""


def py(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args!r} within {timeout} s"
    return proc.stdout.readline().strip()


def serve(lan: Lan, host: Host, code: str) -> subprocess.Popen[str]:
    proc = lan.spawn(host, py(code, host.ip, PORT), stdout=subprocess.PIPE)
    assert read_line(proc, 10) == "ready"
    return proc


def echo_works(lan: Lan, client: Host, server: Host) -> bool:
    done = lan.exec(client, py(ECHO_CLIENT, server.ip, PORT), timeout=10)
    return done.returncode == 0 and done.stdout.strip() == "hello"


def udp_delivered(lan: Lan, sender: Host, receiver: Host, count: int) -> int:
    counter = lan.spawn(receiver, py(UDP_COUNTER, receiver.ip, PORT), stdout=subprocess.PIPE)
    assert read_line(counter, 10) == "ready"
    lan.exec(sender, py(UDP_SENDER, receiver.ip, PORT, count), timeout=20)
    return int(read_line(counter, 15))


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def test_hosts_reach_each_other_over_the_bridge(make_lan: MakeLan) -> None:
    lan = make_lan(3)
    for h in lan.hosts:
        serve(lan, h, ECHO_SERVER)
    for a in lan.hosts:
        for b in lan.hosts:
            if a != b:
                assert echo_works(lan, a, b), f"{a.ip} cannot reach {b.ip}"


def test_hosts_cannot_reach_anything_outside_the_bridge(make_lan: MakeLan) -> None:
    before = root_links()
    lan = make_lan(2)
    host = lan.hosts[0]
    assert lan.exec(host, ["ip", "route", "show", "default"]).stdout.strip() == ""
    # No route: the kernel refuses at once, nothing is sent anywhere.
    assert lan.exec(host, py(CONNECT_OUTSIDE)).stdout.strip() == str(errno.ENETUNREACH)
    assert root_links() == before, "building a Lan must not add interfaces to the root namespace"


def test_packet_loss_drops_about_that_share_and_zero_clears_it(make_lan: MakeLan, iptables: None) -> None:
    lan = make_lan(2)
    sender, receiver = lan.hosts
    count = 300
    lan.loss(receiver, 30)
    lossy = udp_delivered(lan, sender, receiver, count)
    # Binomial(300, 0.7): mean 210, sd ~8; the bounds are more than 5 sd away.
    assert 165 <= lossy <= 255, f"{lossy}/{count} delivered with 30% loss"
    lan.loss(receiver, 0)
    assert udp_delivered(lan, sender, receiver, count) == count


def test_link_down_partitions_a_host_and_link_up_heals_it(make_lan: MakeLan) -> None:
    lan = make_lan(3)
    a, b, c = lan.hosts
    serve(lan, b, ECHO_SERVER)
    serve(lan, c, ECHO_SERVER)
    assert echo_works(lan, a, b)
    lan.link_down(b)
    assert not echo_works(lan, a, b)
    assert not echo_works(lan, b, c)
    assert echo_works(lan, a, c), "the rest of the LAN keeps working"
    lan.link_up(b)
    deadline = time.monotonic() + 10
    while not echo_works(lan, a, b):
        assert time.monotonic() < deadline, "link did not heal within 10 s"
        time.sleep(0.1)


def test_rate_slows_the_link_and_zero_restores_it(make_lan: MakeLan) -> None:
    lan = make_lan(2)
    client, server = lan.hosts
    serve(lan, server, SINK_SERVER)
    size = 64 * 1024  # 512 kbit at 512 kbit/s: about one second

    def transfer_s() -> float:
        done = lan.exec(client, py(SINK_CLIENT, server.ip, PORT, size), timeout=30)
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    lan.rate(server, 512)
    slow = transfer_s()
    assert slow >= 0.6, f"64 KiB at 512 kbit/s took only {slow:.2f} s"
    lan.rate(server, 0)
    fast = transfer_s()
    assert fast < 0.3, f"64 KiB on an unshaped link took {fast:.2f} s"


def test_delay_says_clearly_when_the_kernel_has_no_netem(make_lan: MakeLan) -> None:
    lan = make_lan(1)
    if lan.netem:
        pytest.skip("this kernel has netem")
    with pytest.raises(FaultUnavailable, match="no netem"):
        lan.delay(lan.hosts[0], 50)


def test_delay_adds_latency_each_way(make_lan: MakeLan) -> None:
    lan = make_lan(2)
    if not lan.netem:
        pytest.skip("this kernel has no netem qdisc")
    client, server = lan.hosts
    serve(lan, server, ECHO_SERVER)
    lan.delay(server, 100)
    t = time.monotonic()
    assert echo_works(lan, client, server)
    # connect + echo: two round trips, each crossing the delayed link twice
    assert time.monotonic() - t >= 0.4


def test_teardown_leaves_no_namespaces_or_processes_behind(make_lan: MakeLan) -> None:
    lan = make_lan(2)
    sleeper = lan.spawn(lan.hosts[0], ["sleep", "1000"])
    # A grandchild in its own process group: only the namespace sweep can find it.
    lan.spawn(lan.hosts[1], ["sh", "-c", "setsid sleep 1000 & wait"])
    deadline = time.monotonic() + 5
    while len(pids := inside(lan)) < 3:
        assert time.monotonic() < deadline, f"processes did not start: {pids}"
        time.sleep(0.05)
    lan.teardown()
    assert sleeper.poll() is not None
    assert not any(name in netns_list() for name in lan.namespaces)
    assert all(not running(pid) for pid in pids)
    lan.teardown()  # idempotent
    with pytest.raises(LanError):
        lan.spawn(lan.hosts[0], ["true"])


def test_a_block_that_raises_still_tears_down() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(KeyError), Lan(2) as lan:
        names = lan.namespaces
        raise KeyError("boom")
    assert not any(name in netns_list() for name in names)


def test_two_lans_at_once_do_not_collide(make_lan: MakeLan) -> None:
    one, two = make_lan(2), make_lan(2)
    assert not set(one.namespaces) & set(two.namespaces)
    for lan in (one, two):
        serve(lan, lan.hosts[1], ECHO_SERVER)
        assert echo_works(lan, lan.hosts[0], lan.hosts[1])


def inside(lan: Lan) -> list[int]:
    pids: list[int] = []
    for ns in lan.namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout
        pids.extend(int(p) for p in out.split())
    return pids


def running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False
