"""Node processes with their HTTP gateway on, for the tests in this folder: start, wait until ready, scrape."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import Cluster, NodeProc
from tests.conftest import LOOPBACK

# Fast failure detection, so tests that kill a node do not wait for the 3 s default.
FAST = ["--gossip-interval", "0.1", "--suspect-after", "0.4", "--dead-after", "0.8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayNode:
    """A node process and the base URL of its gateway."""

    proc: NodeProc
    url: str

    @property
    def name(self) -> str:
        return self.proc.name

    def openai(self, api_key: str = "no-key-needed") -> OpenAI:
        """The official client, unmodified; no retries, so each error status is seen as the gateway sent it."""
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30.0)


def start_gateway_node(
    cluster: Cluster,
    name: str,
    models: Sequence[str],
    extra: Sequence[str] = (),
    key: str | None = None,
    wait: float = 30.0,
    env: dict[str, str] | None = None,
) -> GatewayNode:
    port = free_port()
    argv = [*LOOPBACK, "--http-port", str(port)]
    for model in models:
        argv += ["--model", model]
    if key is not None:
        argv += ["--api-key", key]
    proc = cluster.add(name, [*argv, *extra], wait=wait, env=env)
    node = GatewayNode(proc, f"http://127.0.0.1:{port}")
    wait_healthy(node)
    return node


def wait_healthy(node: GatewayNode, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        try:
            r = httpx.get(f"{node.url}/health", timeout=1.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise TimeoutError(f"gateway of {node.name} not ready in {timeout}s ({last}):\n{node.proc.log_tail()}")


def wait_until(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout}s")


def scrape(
    node: GatewayNode, api_key: str | None = None, source: str | None = None
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name -> {sorted labels: value}, samples under their own names (…_total, …_bucket) too.

    `source`: the local address to ask from (another loopback address is another caller to the gateway).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(transport=transport, timeout=10, headers=headers) as client:
        r = client.get(f"{node.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        out.setdefault(family.name, {})
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return sum(v for key, v in metrics.get(name, {}).items() if set(labels.items()) <= set(key))
