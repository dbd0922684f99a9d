"""A gateway node shared by the HTTP tests that only read (echo and sleep models); others start their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway_nodes import GatewayNode, start_gateway_node

from bench.procs import Cluster


@pytest.fixture(scope="session")
def echo_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayNode]:
    # An open (--insecure) node: the tests sharing it speak plaintext, as tests/conftest.py sets for all but `cluster`.
    with Cluster(log_dir=tmp_path_factory.mktemp("http-logs"), insecure=True) as cluster:
        yield start_gateway_node(cluster, "http-echo", ["echo", "sleep:200", "sleep:2000"])
