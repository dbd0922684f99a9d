"""Whether a node answers at the address a command was given, and, when none does, one line saying why and what to
check: every command that talks to a node asks this first, so a wrong address fails in seconds instead of waiting
out a long deadline, while a slow answer from a live node still gets all the time it was given."""

from __future__ import annotations

import errno
import socket
from typing import Any

from mesh import Client, DeadlineExceeded, LanmeshError, MeshUnavailable

from ..runtime.config import DEFAULT_PORT

# How long a command waits for the first sign of life (a ping answered by the node's mesh loop, which no model
# work ever blocks). The TCP probe that explains a silence adds at most PROBE_TIMEOUT_S.
ANSWER_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 0.5


class NodeUnreachable(Exception):
    """No lanmesh node answered at an address; the message says why (as far as a TCP probe tells) and what to do."""


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port`; a bare host means the default port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address.strip("[]"), DEFAULT_PORT
    return host.strip("[]"), int(port)


def tcp_probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str:
    """'open', or why a TCP connection to host:port fails: closed, no route, or no answer."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return "open"
    except ConnectionRefusedError:
        return f"port {port} closed on {host} (the node stopped, or a firewall rejects it)"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g}s (a firewall drops the packets, or no route)"
    except socket.gaierror as exc:
        return f"cannot resolve the host name {host!r} ({exc.strerror or exc})"
    except OSError as exc:
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return f"no route to {host} from this machine (another subnet, or a VPN in the way)"
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def why_silent(address: str, waited: float) -> str:
    """One line: no node answered at `address` within `waited` seconds, what a TCP probe says, what to check."""
    host, port = split_address(address)
    probe = tcp_probe(host, port)
    if probe == "open":
        probe = (
            f"port {port} is open but nothing there answered as a lanmesh node (another program, or a node of "
            "another mesh: check --key-file)"
        )
    return (
        f"no lanmesh node answered at {address} within {waited:g}s: {probe}; check the address (--node HOST:PORT, "
        f"default port {DEFAULT_PORT}) and that `lanmesh node` runs there"
    )


def check_answers(client: Client, address: str, timeout: float = ANSWER_TIMEOUT_S) -> None:
    """Raise NodeUnreachable unless a node of `client` answers a ping within `timeout` seconds."""
    try:
        client.ping(timeout=timeout)
    except (MeshUnavailable, DeadlineExceeded):
        raise NodeUnreachable(why_silent(address, timeout)) from None


def node_answers(address: str, security: Any, timeout: float = ANSWER_TIMEOUT_S) -> None:
    """As `check_answers`, with a client of its own (for commands that then speak to the node another way)."""
    try:
        with Client(address, timeout=timeout, security=security, learn=False) as client:
            check_answers(client, address, timeout)
    except LanmeshError as exc:  # e.g. Unauthorized: its own message says what is wrong
        raise NodeUnreachable(f"{address}: {exc}") from None
