"""Node addresses as a client takes them (`host:port`, `tcp://...`, `[v6]:port`, found by mDNS) and as ZeroMQ wants
them (`tcp://host:port`)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import MeshUnavailable

_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.%A-Za-z]+")


def parse_endpoints(nodes: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise node addresses (`host:port`, `tcp://host:port`, `[v6]:port`, comma-separated) to zmq endpoints."""
    if isinstance(nodes, str):
        items = nodes.split(",")
    elif isinstance(nodes, Sequence) and all(isinstance(n, str) for n in nodes):
        items = list(nodes)
    else:
        raise ValueError(f"nodes must be 'host:port' or a list of them, got {type(nodes).__name__}")
    endpoints: list[str] = []
    for raw in items:
        ep = parse_endpoint(raw)
        if ep not in endpoints:
            endpoints.append(ep)
    if not endpoints:
        raise ValueError("no node address given; expected 'host:port' (e.g. '192.168.1.20:7700')")
    return tuple(endpoints)


def parse_endpoint(raw: str) -> str:
    """One node address as a zmq endpoint; ValueError for anything that is not `host:port`."""
    text = raw.strip()
    if text.startswith("tcp://"):
        text = text[len("tcp://") :]
    elif "://" in text:
        raise ValueError(f"node address {raw!r}: only tcp:// addresses are supported")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        ok_host = bool(sep) and _IPV6_RE.fullmatch(host) is not None and ":" in host
        shown = f"[{host}]"
    else:
        host, sep, port = text.rpartition(":")
        ok_host = bool(sep) and _HOST_RE.fullmatch(host) is not None
        shown = host
    if not ok_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"node address {raw!r} is not 'host:port' with a port in 1..65535 (e.g. '10.0.0.5:7700')")
    return f"tcp://{shown}:{int(port)}"


def discover_endpoints(timeout: float, interfaces: list[str] | None) -> tuple[str, ...]:
    """Browse mDNS for `timeout` seconds and return the ROUTER endpoints of the nodes that answered."""
    from . import _discovery  # zeroconf is only needed by callers that discover

    found = _discovery.browse(timeout, interfaces)
    hosts = [f"[{a.addr.host}]:{a.addr.port}" if ":" in a.addr.host else f"{a.addr.host}:{a.addr.port}" for a in found]
    if not hosts:
        raise MeshUnavailable(f"no lanmesh node answered mDNS within {timeout:g}s")
    return parse_endpoints(hosts)


__all__ = ["discover_endpoints", "parse_endpoint", "parse_endpoints"]
