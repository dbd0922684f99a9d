"""Shared fixtures: node processes on loopback, stopped by PID after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import Cluster

# Nodes in loopback tests never touch a real network: bound to 127.0.0.1, no mDNS.
LOOPBACK = ["--bind", "127.0.0.1", "--no-mdns"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(log_dir=tmp_path) as c:
        yield c
        for node in c.nodes:
            if node.alive():
                continue
            # Surface a crashed node's log in the failure report.
            print(f"--- log of {node.name} ---\n{node.log_tail()}")
