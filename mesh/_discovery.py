"""mDNS discovery: announce this node as `_lanmesh._tcp.local.` and report the peers that announce themselves.

zeroconf runs on its own asyncio loop in a daemon thread, so the node's loop (plain threads and ZeroMQ) never
touches asyncio; callbacks arrive on that thread and must only hand the news over.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ifaddr
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

import protocol
from protocol import PeerAddr, name_problem

log = logging.getLogger(__name__)

SERVICE_TYPE = "_lanmesh._tcp.local."
# Probing for a unique name alone takes ~1.7 s with zeroconf's timings; leave room for a loaded machine.
START_TIMEOUT_S = 10.0
# Goodbyes go out three times 125 ms apart, then the sockets close.
STOP_TIMEOUT_S = 3.0
RESOLVE_TIMEOUT_MS = 3000

# The TXT keys. They mirror PeerAddr's fields so `avahi-browse -r` output explains itself.
_K_NODE, _K_PORT, _K_PUB, _K_VERSION, _K_FP = "node", "port", "pub_port", "version", "fingerprint"
_K_KEY = "key"  # member identities: the node's own CURVE key (Z85), which a node connecting to it expects
_KEY_RE = re.compile(r"[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")
_TXT_ENTRY_MAX = 255  # one TXT string is length-prefixed by a single byte
_FP_RE = re.compile(r"[A-Za-z0-9+/=:_.-]{0,128}")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_VERSION_RE = re.compile(r"[0-9]{1,5}")
_INSTANCE_MAX = 55  # "lanmesh-" + instance must fit one 63-byte DNS label (our host name)
_INSTANCE_UNSAFE = re.compile(r"[^A-Za-z0-9-]")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Announcement:
    """A peer as it announced itself: how to reach it and the static facts it claims."""

    addr: PeerAddr
    version: int
    fingerprint: str
    source: str = "mdns"


def txt_for(addr: PeerAddr, fingerprint: str) -> dict[str, str]:
    """The TXT record announcing `addr`: static facts only (load and liveness travel by gossip)."""
    txt = {
        _K_NODE: addr.node,
        _K_PORT: str(addr.port),
        _K_PUB: str(addr.pub_port),
        _K_VERSION: str(protocol.VERSION),
        _K_FP: fingerprint,
    }
    if addr.key:
        txt[_K_KEY] = addr.key
    # Validate what we send with the same rules we apply to what we receive, so every announcement we make parses.
    _node_id(txt[_K_NODE])
    _port(txt[_K_PORT], _K_PORT)
    _port(txt[_K_PUB], _K_PUB)
    _fingerprint(txt[_K_FP])
    return txt


def parse_txt(props: Mapping[bytes, bytes | None], addresses: Sequence[str], server_name: str) -> Announcement:
    """Turn a resolved `_lanmesh._tcp` service into an Announcement; raise ValueError on anything malformed.

    mDNS is unauthenticated input from anyone on the LAN: every field is checked, unknown keys are ignored
    (newer peers may add some), and the host is the first usable IPv4 address among `addresses`.
    """
    try:
        fields: dict[str, str | None] = {}
        for raw_key, raw_value in props.items():
            key = _decode(raw_key, "key")
            fields[key] = None if raw_value is None else _decode(raw_value, f"value of {key!r}")
        node = _node_id(_required(fields, _K_NODE))
        port = _port(_required(fields, _K_PORT), _K_PORT)
        pub_port = _port(_required(fields, _K_PUB), _K_PUB)
        version = _version(_required(fields, _K_VERSION))
        if _K_FP not in fields:
            raise ValueError(f"TXT has no {_K_FP!r} entry")
        fingerprint = _fingerprint(fields[_K_FP] or "")
        key = fields.get(_K_KEY) or ""
        if key and _KEY_RE.fullmatch(key) is None:
            raise ValueError(f"TXT {_K_KEY} is not a 40-character Z85 key")
        host = _first_ipv4(addresses)
    except ValueError as e:
        raise ValueError(f"bad lanmesh announcement from {server_name!r}: {e}") from None
    return Announcement(PeerAddr(node, host, port, pub_port, key), version, fingerprint)


def instance_name(node_id: str) -> str:
    """The mDNS instance name for a node: its id when DNS-safe, else a sanitized prefix plus a hash of the id.

    The hash keeps two ids that sanitize alike (`a.b` and `a_b`) from claiming the same name.
    """
    safe = _INSTANCE_UNSAFE.sub("-", node_id)
    if safe == node_id and 0 < len(safe) <= _INSTANCE_MAX:
        return safe
    digest = hashlib.sha256(node_id.encode()).hexdigest()[:8]
    return f"{safe[: _INSTANCE_MAX - 9]}-{digest}"


def resolve_interfaces(interfaces: list[str]) -> list[str]:
    """IP addresses for zeroconf from a mix of addresses and interface names (a name means its IPv4 addresses)."""
    adapters: list[Any] | None = None
    out: list[str] = []
    for item in interfaces:
        try:
            out.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass  # not an address literal: look it up as an interface name below
        if adapters is None:
            adapters = list(ifaddr.get_adapters())
        ips = [ip.ip for a in adapters if item in (a.nice_name, a.name) for ip in a.ips if isinstance(ip.ip, str)]
        if not ips:
            known = sorted({a.nice_name for a in adapters})
            raise ValueError(f"{item!r} is neither an IP address nor an interface with an IPv4 address (have: {known})")
        out.extend(ips)
    if not out:
        raise ValueError("interfaces is empty; pass None to use every interface")
    return out


class Discovery:
    """Announces one node over mDNS and reports peers appearing (`on_found`) and leaving (`on_lost`).

    Callbacks run on the discovery thread and must be cheap: hand the news to your own loop. `on_found` fires
    again when a peer's announcement changes (e.g. it restarted on another port); `on_lost` gets the node id
    when a peer says goodbye. A peer that dies without a goodbye is not reported here: its records live on
    for their TTL, and liveness is the failure detector's job.
    """

    def __init__(
        self,
        addr: PeerAddr,
        *,
        fingerprint: str = "",
        interfaces: list[str] | None = None,
        on_found: Callable[[Announcement], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.addr = addr
        self._txt = txt_for(addr, fingerprint)
        self._host = _announceable_ipv4(addr.host)
        self._interfaces = None if interfaces is None else resolve_interfaces(interfaces)
        self.instance = instance_name(addr.node)
        self.service_name = f"{self.instance}.{SERVICE_TYPE}"
        self._on_found = on_found
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._state = "new"  # new -> started -> stopped; start() and stop() each act once
        self._runner: _LoopThread | None = None
        # Owned by the discovery thread:
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._tasks: set[asyncio.Future[Any]] = set()  # strong refs: asyncio only keeps weak ones
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._known: dict[str, str] = {}  # service name -> node id reported by on_found

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start browsing, then register our service; return once the name is ours. Raises RuntimeError."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"Discovery for {self.addr.node!r} was already started")
            self._state = "started"
            runner = self._runner = _LoopThread(f"lanmesh-mdns-{self.instance}")
        where = "every interface" if self._interfaces is None else ", ".join(self._interfaces)
        try:
            runner.call(self._async_start(), timeout)
        except NonUniqueNameException:
            self._abandon_start()
            raise RuntimeError(
                f"another node on the LAN already uses the name {self.addr.node!r} (it announces "
                f"{self.service_name!r} on mDNS): give this node another name (lanmesh node --name NAME)"
            ) from None
        except TimeoutError:
            self._abandon_start()
            raise RuntimeError(f"mDNS registration of {self.service_name!r} on {where} took over {timeout} s") from None
        except Exception as e:
            self._abandon_start()
            raise RuntimeError(f"mDNS could not start on {where}: {type(e).__name__}: {e}") from e

    def _abandon_start(self) -> None:
        with self._lock:
            self._state = "stopped"
        self._shutdown(STOP_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Say goodbye (peers drop us at once) and close. Idempotent; returns within about `timeout` seconds."""
        if self._runner is not None and self._runner.is_current_thread():
            raise RuntimeError(
                "Discovery.stop() cannot run inside an on_found/on_lost callback: it would wait on itself"
            )
        with self._lock:
            if self._state == "stopped":
                return
            started = self._state == "started"
            self._state = "stopped"
        if started:
            self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> None:
        runner = self._runner
        if runner is None:
            return
        try:
            runner.call(self._async_stop(), timeout)
        except TimeoutError:
            log.warning("mDNS: goodbye for %s did not finish within %.1f s; closing anyway", self.service_name, timeout)
        finally:
            runner.close(timeout=1.0)

    async def _async_start(self) -> None:
        self._azc = _async_zeroconf(self._interfaces)
        # Browse first so the peers already out there are being found while we probe for our name.
        self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_change])
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=self.addr.port,
            properties=self._txt,
            server=f"lanmesh-{self.instance}.local.",
            parsed_addresses=[self._host],
        )
        announcing = await self._azc.async_register_service(self._info)
        self._registered = True
        self._keep(asyncio.ensure_future(announcing))

    async def _async_stop(self) -> None:
        for task in list(self._resolving.values()):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._azc is None:
            return
        if self._registered and self._info is not None:
            self._registered = False
            await (await self._azc.async_unregister_service(self._info))
        await self._azc.async_close()

    def _on_service_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf calls this by keyword, so the parameter names are fixed.
        if name.lower() == self.service_name.lower():  # DNS names compare case-insensitively
            return
        pending = self._resolving.pop(name, None)
        if pending is not None:
            pending.cancel()  # a newer event supersedes a resolution in flight
        if state_change is ServiceStateChange.Removed:
            node = self._known.pop(name, None)
            if node is not None:
                self._report(self._on_lost, node)
            return
        task = asyncio.get_running_loop().create_task(self._resolve_and_report(zeroconf, name))
        self._resolving[name] = task
        self._keep(task)

    async def _resolve_and_report(self, zeroconf: Zeroconf, name: str) -> None:
        ann = await _resolve(zeroconf, name)
        if self._resolving.get(name) is asyncio.current_task():
            del self._resolving[name]
        if ann is None:
            return
        if ann.addr.node == self.addr.node:
            log.warning("mDNS: %s announces our own node id %r; ignoring it", name, ann.addr.node)
            return
        previous = self._known.get(name)
        if previous is not None and previous != ann.addr.node:
            self._report(self._on_lost, previous)
        self._known[name] = ann.addr.node
        self._report(self._on_found, ann)

    def _report(self, callback: Callable[[T], None], value: T) -> None:
        try:
            callback(value)
        except Exception:
            # A broken callback must not stop discovery; make the bug visible instead.
            log.exception("mDNS discovery callback %r failed on %r", callback, value)

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def browse(timeout: float = 2.0, interfaces: list[str] | None = None) -> list[Announcement]:
    """Listen for `timeout` seconds and return every valid lanmesh announcement heard, one per node id."""
    ifaces = None if interfaces is None else resolve_interfaces(interfaces)
    runner = _LoopThread("lanmesh-mdns-browse")
    try:
        return runner.call(_async_browse(timeout, ifaces), timeout + RESOLVE_TIMEOUT_MS / 1000 + STOP_TIMEOUT_S)
    finally:
        runner.close(timeout=1.0)


async def _async_browse(timeout: float, interfaces: list[str] | None) -> list[Announcement]:
    azc = _async_zeroconf(interfaces)
    found: dict[str, Announcement] = {}
    resolving: dict[str, asyncio.Task[None]] = {}

    async def resolve_into(zc: Zeroconf, name: str) -> None:
        ann = await _resolve(zc, name)
        if ann is not None:
            found[name] = ann

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        pending = resolving.pop(name, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)
        else:
            resolving[name] = asyncio.get_running_loop().create_task(resolve_into(zeroconf, name))

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.sleep(timeout)
        # Services heard just before the deadline get a moment to resolve; most resolve from the cache at once.
        in_flight = [t for t in resolving.values() if not t.done()]
        if in_flight:
            await asyncio.wait(in_flight, timeout=0.5)
        for task in resolving.values():
            task.cancel()
    finally:
        await browser.async_cancel()
        await azc.async_close()
    by_node = {ann.addr.node: ann for ann in found.values()}
    return sorted(by_node.values(), key=lambda a: a.addr.node)


async def _resolve(zc: Zeroconf, name: str) -> Announcement | None:
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    if not info.load_from_cache(zc) and not await info.async_request(zc, RESOLVE_TIMEOUT_MS):
        log.warning("mDNS: %s was announced but did not resolve within %d ms", name, RESOLVE_TIMEOUT_MS)
        return None
    try:
        return parse_txt(info.properties, info.parsed_addresses(IPVersion.V4Only), info.server or name)
    except ValueError as e:
        log.warning("mDNS: ignoring %s", e)
        return None


def _async_zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    # Created inside the loop thread so zeroconf attaches to that running loop instead of starting its own.
    if interfaces is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)


class _LoopThread:
    """An asyncio loop on a daemon thread, driven from the caller's thread with bounded waits."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
        finally:
            self._loop.close()

    def is_current_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def close(self, timeout: float) -> None:
        if not self._closed:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("mDNS thread %s did not stop within %.1f s", self._thread.name, timeout)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"TXT {what} is not UTF-8") from None


def _required(fields: dict[str, str | None], key: str) -> str:
    value = fields.get(key)
    if value is None:
        raise ValueError(f"TXT has no {key!r} value")
    return value


def _node_id(value: str) -> str:
    if not value:
        raise ValueError("node id is empty")
    if len(f"{_K_NODE}={value}".encode()) > _TXT_ENTRY_MAX:
        raise ValueError(f"node id is longer than a TXT entry allows ({_TXT_ENTRY_MAX - len(_K_NODE) - 1} bytes)")
    if not value.isprintable():
        raise ValueError(f"node id {value!r} contains unprintable characters")
    problem = name_problem(value, "node id")  # the one rule for names (protocol._names), as on the wire
    if problem is not None:
        raise ValueError(problem)
    return value


def _port(value: str, key: str) -> int:
    if not _PORT_RE.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise ValueError(f"{key} {value!r} is not a port number (1-65535)")
    return int(value)


def _version(value: str) -> int:
    if not _VERSION_RE.fullmatch(value):
        raise ValueError(f"{_K_VERSION} {value!r} is not a protocol version number")
    return int(value)


def _fingerprint(value: str) -> str:
    if not _FP_RE.fullmatch(value):
        raise ValueError(f"{_K_FP} {value!r} is not a key fingerprint (up to 128 of A-Z a-z 0-9 + / = : _ . -)")
    return value


def _first_ipv4(addresses: Sequence[str]) -> str:
    for raw in addresses:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            continue  # one garbage address does not spoil the others
        if ip.version == 4 and not (ip.is_unspecified or ip.is_multicast or ip == _BROADCAST):
            return str(ip)
    raise ValueError(f"no usable IPv4 address among {addresses!r}")


def _announceable_ipv4(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"mDNS announces addr.host as an A record, so it must be an IPv4 address, got {host!r}"
        ) from None
    if ip.version != 4 or ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"addr.host {host!r} cannot be announced: use this machine's IPv4 address on the LAN")
    return str(ip)
