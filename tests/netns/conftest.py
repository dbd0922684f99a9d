"""Fixtures for many-hosts tests: Lans of network namespaces (root only), torn down whatever happens."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from bench.hosts import Lan, netns_unavailable_reason, sweep_stale


@pytest.fixture(scope="session", autouse=True)
def _no_stale_namespaces() -> None:
    """Remove namespaces a killed earlier run left behind (only those whose owning process is gone)."""
    if netns_unavailable_reason() is None:
        sweep_stale()


@pytest.fixture
def make_lan() -> Iterator[Callable[[int], Lan]]:
    """`make_lan(n)` builds a Lan of n hosts; every Lan is torn down after the test, pass or fail."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    lans: list[Lan] = []

    def make(n_hosts: int) -> Lan:
        lan = Lan(n_hosts)
        lans.append(lan)
        return lan

    yield make
    for lan in lans:
        lan.teardown()


@pytest.fixture(scope="session")
def iptables() -> None:
    """iptables for packet-loss faults; the set-up installs the Debian package when it is missing."""
    if shutil.which("iptables") is not None:
        return
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    install = ["apt-get", "install", "-y", "--no-install-recommends", "iptables"]
    done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=300)
        done = subprocess.run(install, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or shutil.which("iptables") is None:
        pytest.skip(f"packet loss needs iptables and `apt-get install iptables` failed: {done.stderr.strip()[-300:]}")
