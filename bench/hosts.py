"""Many hosts on one machine: network namespaces on a private bridge, with faults (loss, partition, slow link).

Needs root. Nothing here touches the root namespace's interfaces: the bridge lives in its own "switch"
namespace, each host namespace has one veth into it, and no namespace has a default route.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

DEFAULT_PREFIX = "10.213.0"  # a /24 that only ever exists inside our namespaces
MAX_HOSTS = 253
BRIDGE = "lmbr"
HOST_IFACE = "eth0"
_NETNS_PREFIX = "lanmesh-"
_NETNS_RE = re.compile(rf"{_NETNS_PREFIX}(\d+)-[0-9a-f]+-(sw|h\d+)")
_CMD_TIMEOUT_S = 10.0

_File = int | IO[Any] | None


class LanError(RuntimeError):
    """Building or changing the namespaces failed; the message carries the failing command and its error."""


class FaultUnavailable(LanError):
    """The kernel or the system lacks what a fault needs (netem, iptables); the message says what."""


@dataclass(frozen=True, slots=True)
class Host:
    """One emulated machine: its network namespace, its address, and its port on the switch."""

    index: int
    name: str  # the network namespace
    ip: str
    port: str  # the switch-side end of its veth, in the switch namespace

    @property
    def mac(self) -> str:
        """Its interface's hardware address (locally administered, from its index: unique within a Lan)."""
        return f"02:6c:6d:00:{self.index >> 8:02x}:{self.index & 255:02x}"


@dataclass(frozen=True, slots=True)
class Traffic:
    """What one host's network interface has received and sent, as counters since it was made."""

    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int


def have_root() -> bool:
    return os.geteuid() == 0


@functools.cache
def netns_unavailable_reason() -> str | None:
    """None when this machine can build a Lan; otherwise why not, worded for a pytest skip."""
    if not have_root():
        return "needs root to create network namespaces (CI runs these tests as root)"
    if shutil.which("ip") is None:
        return "needs the `ip` command from iproute2"
    probe = f"{_NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-sw"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "-n", probe, "link", "add", "probebr", "type", "bridge"])
            _run(["ip", "-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"])
        finally:
            _run(["ip", "netns", "del", probe])
    except LanError as e:
        return f"cannot build network namespaces with bridges and veths here: {e}"
    return None


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (some minimal kernels ship without it; tbf is nearly universal)."""
    probe = f"{_NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}-sw"
    _run(["ip", "netns", "add", probe])
    try:
        _run(["ip", "-n", probe, "link", "set", "lo", "up"])
        done = subprocess.run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
            text=True,
            timeout=_CMD_TIMEOUT_S,
        )
        return done.returncode == 0
    finally:
        _run(["ip", "netns", "del", probe])


def sweep_stale() -> list[str]:
    """Delete namespaces left by Lans whose process died without tearing down (kill -9, a crashed CI job)."""
    removed = []
    for name in _netns_names():
        m = _NETNS_RE.fullmatch(name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue  # not ours, or its owner still runs (perhaps a parallel test run)
        _kill_netns_pids(name)
        _run(["ip", "netns", "del", name])
        removed.append(name)
    return removed


class Lan:
    """N hosts on one switch, each in its own network namespace: `with Lan(4) as lan: lan.spawn(lan.hosts[0], argv)`.

    Hosts get `<prefix>.1` .. `<prefix>.N` on a /24, loopback, multicast (a 224.0.0.0/4 route, so mDNS works)
    and no default route: nothing inside can reach any other network. Names carry our pid and a random tag,
    so parallel runs never collide. Teardown kills what was spawned and deletes every namespace.
    """

    def __init__(self, n_hosts: int, prefix: str | None = None) -> None:
        if not 1 <= n_hosts <= MAX_HOSTS:
            raise ValueError(f"n_hosts must be between 1 and {MAX_HOSTS}, got {n_hosts}")
        self.prefix = prefix or DEFAULT_PREFIX
        ipaddress.IPv4Network(f"{self.prefix}.0/24")  # raises on a malformed prefix
        self.subnet = f"{self.prefix}.0/24"
        self.tag = f"{_NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = [
            Host(i, f"{self.tag}-h{i}", f"{self.prefix}.{i + 1}", f"lmp{i}") for i in range(n_hosts)
        ]
        self._namespaces: list[str] = []  # created so far, for a teardown after a half-built Lan
        self._procs: list[subprocess.Popen[Any]] = []
        self._shaping: dict[int, tuple[int, int]] = {}  # host index -> (delay ms, rate kbit) in force
        self._torn_down = False
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise

    def __enter__(self) -> Lan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.teardown()

    @property
    def namespaces(self) -> list[str]:
        return [self.switch, *(h.name for h in self.hosts)]

    @property
    def netem(self) -> bool:
        return netem_available()

    def _build(self) -> None:
        self._add_netns(self.switch)
        _ip_batch(
            self.switch,
            [
                "link set lo up",
                # Snooping off: the bridge floods every multicast group like a dumb switch, so mDNS always arrives.
                f"link add {BRIDGE} type bridge mcast_snooping 0",
                f"link set {BRIDGE} up",
            ],
        )
        for h in self.hosts:
            self._add_netns(h.name)
            # Both ends are created inside our namespaces: nothing ever appears in the root namespace.
            _run(
                [
                    "ip",
                    "-n",
                    self.switch,
                    "link",
                    "add",
                    h.port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    HOST_IFACE,
                    "address",
                    h.mac,
                    "netns",
                    h.name,
                ]
            )
            _ip_batch(self.switch, [f"link set {h.port} master {BRIDGE}", f"link set {h.port} up"])
            _ip_batch(
                h.name,
                [
                    "link set lo up",
                    f"addr add {h.ip}/24 dev {HOST_IFACE}",
                    f"link set {HOST_IFACE} multicast on",
                    f"link set {HOST_IFACE} up",
                    f"route add 224.0.0.0/4 dev {HOST_IFACE}",
                ],
            )
        # Every host knows every other's hardware address from the start. The kernel keeps one neighbour table for
        # all namespaces and refuses entries past `net.ipv4.neigh.default.gc_thresh3` (1024 by default): a Lan of
        # 100 hosts that all talk to each other needs ~10,000, and learned ones would overflow it (connections then
        # fail at random; dmesg says "neighbor table overflow"). Permanent entries do not count against it, and no
        # ARP traffic mixes with what a benchmark measures.
        for h in self.hosts:
            _ip_batch(h.name, [f"neigh replace {o.ip} lladdr {o.mac} dev {HOST_IFACE} nud permanent"
                               for o in self.hosts if o is not h])  # fmt: skip

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    def spawn(
        self,
        host: Host,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        stdin: _File = subprocess.DEVNULL,
        stdout: _File = subprocess.DEVNULL,
        stderr: _File = None,
        cwd: str | None = None,
        text: bool = True,
    ) -> subprocess.Popen[Any]:
        """Start `argv` inside `host` in its own process group; `env` adds to this process's environment.

        The process is killed at teardown if still running.
        """
        self._check_live()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.name, *argv],
            env={**os.environ, **env} if env is not None else None,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            text=text,
            start_new_session=True,  # its own process group, so teardown can kill its children too
        )
        self._procs.append(proc)
        return proc

    def exec(self, host: Host, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `host` to completion and capture its output (no check on the exit status)."""
        self._check_live()
        return subprocess.run(
            ["ip", "netns", "exec", host.name, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )

    def traffic(self) -> dict[int, Traffic]:
        """Packets and bytes each host has received and sent so far, read off the switch's ports in one command
        (a port's tx is what its host received). Nothing runs inside the hosts, so reading it disturbs nothing."""
        self._check_live()
        done = subprocess.run(
            ["ip", "-n", self.switch, "-s", "-j", "link", "show"],
            capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=True,
        )  # fmt: skip
        ports = {h.port: h.index for h in self.hosts}
        out: dict[int, Traffic] = {}
        for link in json.loads(done.stdout):
            index = ports.get(link.get("ifname", "").split("@")[0])
            if index is not None:
                s = link["stats64"]
                out[index] = Traffic(s["tx"]["packets"], s["tx"]["bytes"], s["rx"]["packets"], s["rx"]["bytes"])
        return out

    def link_down(self, host: Host) -> None:
        """Unplug the host's cable at the switch: it can reach nobody and nobody can reach it."""
        self._check_live()
        _run(["ip", "-n", self.switch, "link", "set", host.port, "down"])

    def link_up(self, host: Host) -> None:
        self._check_live()
        _run(["ip", "-n", self.switch, "link", "set", host.port, "up"])

    def loss(self, host: Host, percent: float) -> None:
        """Drop `percent` % of the packets arriving at `host` from the LAN (iptables' statistic match); 0 clears."""
        self._check_live()
        if not 0 <= percent <= 100:
            raise ValueError(f"loss percent must be between 0 and 100, got {percent}")
        if shutil.which("iptables") is None:
            raise FaultUnavailable("packet loss needs iptables (Debian: apt-get install -y iptables)")
        # The namespace is ours alone, so its INPUT chain holds nothing but this rule. -w: the xtables lock is shared.
        self._iptables(host, ["-F", "INPUT"])
        if percent > 0:
            rule = ["-A", "INPUT", "-i", HOST_IFACE, "-m", "statistic", "--mode", "random"]
            self._iptables(host, [*rule, "--probability", f"{percent / 100:.6f}", "-j", "DROP"])

    def delay(self, host: Host, ms: int) -> None:
        """Add `ms` of latency each way on the host's link (needs netem); 0 clears."""
        self._check_live()
        if ms < 0:
            raise ValueError(f"delay must be >= 0 ms, got {ms}")
        if ms and not self.netem:
            raise FaultUnavailable(
                "this kernel has no netem qdisc, so latency cannot be emulated; rate() still slows a link (tbf)"
            )
        self._shape(host, ms, self._shaping.get(host.index, (0, 0))[1])

    def rate(self, host: Host, kbit: int) -> None:
        """Limit the host's link to `kbit` kbit/s each way (tbf, or netem when combined with a delay); 0 clears."""
        self._check_live()
        if kbit < 0:
            raise ValueError(f"rate must be >= 0 kbit/s, got {kbit}")
        self._shape(host, self._shaping.get(host.index, (0, 0))[0], kbit)

    def _shape(self, host: Host, delay_ms: int, rate_kbit: int) -> None:
        had = self._shaping.get(host.index, (0, 0)) != (0, 0)
        # Both ends of the veth, so the link is shaped in both directions.
        for ns, dev in ((host.name, HOST_IFACE), (self.switch, host.port)):
            tc = ["tc", "-n", ns, "qdisc"]
            if delay_ms:
                _run([*tc, "replace", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms"] + _netem_rate(rate_kbit))
            elif rate_kbit:
                # Burst: at least one full frame, else ~10 ms at the rate; latency bounds the queue like a real link.
                burst = max(1600, rate_kbit * 1000 // 8 // 100)
                qdisc = ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst), "latency", "100ms"]
                _run([*tc, "replace", "dev", dev, "root", *qdisc])
            elif had:
                _run([*tc, "del", "dev", dev, "root"])
        if delay_ms or rate_kbit:
            self._shaping[host.index] = (delay_ms, rate_kbit)
        else:
            self._shaping.pop(host.index, None)

    def _iptables(self, host: Host, args: list[str]) -> None:
        _run(["ip", "netns", "exec", host.name, "iptables", "-w", "5", *args])

    def _check_live(self) -> None:
        if self._torn_down:
            raise LanError(f"Lan {self.tag} was torn down")

    def teardown(self, grace: float = 2.0) -> None:
        """Stop every spawned process (SIGTERM, SIGKILL after `grace` s) and delete every namespace. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        atexit.unregister(self.teardown)
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            _killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p.pid, signal.SIGKILL)
                p.wait(_CMD_TIMEOUT_S)
        errors = []
        for ns in reversed(self._namespaces):
            # A namespace outlives `ip netns del` while a process is inside; anything in it is ours (this also
            # catches children that left their process group).
            _kill_netns_pids(ns)
            try:
                _run(["ip", "netns", "del", ns])
            except LanError as e:
                errors.append(str(e))
        self._namespaces.clear()
        if errors:
            raise LanError("teardown left namespaces behind: " + "; ".join(errors))


def _run(argv: list[str], stdin: str | None = None) -> None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LanError(f"`{' '.join(argv)}` took over {_CMD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise LanError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")


def _ip_batch(netns: str, commands: list[str]) -> None:
    # One `ip` process for several commands: building a 32-host Lan stays well under a second.
    _run(["ip", "-n", netns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def _netem_rate(rate_kbit: int) -> list[str]:
    return ["rate", f"{rate_kbit}kbit"] if rate_kbit else []


def _netns_names() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=True)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _kill_netns_pids(netns: str) -> None:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    for pid in done.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass  # it exited between the listing and the kill


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group has exited already
