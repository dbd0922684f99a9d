"""`NodeConfig`: the one configuration object of a node, fed by a TOML file, `LANMESH_*` env vars and flags.

Precedence, lowest first: defaults, the TOML file, the environment, command-line flags.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import re
import socket
import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from protocol import check_name

from ..api.keys import CallerKeys, check_api_key
from ..models.specs import parse_layers, parse_model_arg, split_model_specs

DEFAULT_PORT = 5555
DEFAULT_HTTP_PORT = 8000
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class NodeConfig:
    """Everything a node needs to know; see `lanmesh node --help` for what each means."""

    name: str = ""  # node id; default: hostname + random suffix
    port: int = DEFAULT_PORT  # ROUTER port (requests); gossip PUB is port + 1 unless pub_port is set
    pub_port: int = 0
    bind: str = "0.0.0.0"
    advertise: str = ""  # address peers should use; default: the chosen interface's IPv4
    interface: str = ""  # network interface (name or IPv4) for mDNS, binding and advertising
    peers: list[str] = field(default_factory=list)  # static seeds host:port
    mdns: bool = True
    models: list[str] = field(default_factory=list)  # model specs; empty: the default models
    layers: str = ""  # A-B: serve only those layers of the chat model (a pipeline stage); auto: join the split plan
    precision: str = "int4"  # chat models built for the onnxruntime engine: int4, int8, fp16 (GPU) or fp32
    labels: dict[str, str] = field(default_factory=dict)
    max_queue: int = 256
    batch_wait_ms: float = 5.0
    gossip_interval: float = 0.25
    suspect_after: float = 1.0
    dead_after: float = 3.0
    try_timeout: float = 0.0  # 0: a forwarded try lasts as long as its request (re-sent only if its node fails)
    stall_timeout: float = 10.0  # the watchdog exits the node when its mesh loop stops turning this long (0: off)
    max_tries: int = 4
    grace: float = 10.0  # seconds to finish in-flight work on SIGTERM
    routing: str = "cache-aware"  # p2c unless a node holds a chat's prefix; p2c, round-robin, random, least-loaded
    max_memory: str = ""  # e.g. "8G": refuse models that would take the process past this (and the cgroup's limit)
    kv_cache: int = 0  # MiB of key/value cache per chat model (0: 1024, cut to fit the memory limits)
    prefix_cache: int = -1  # MiB of that kept for the chat model's prefix cache (-1: half of it; 0: none)
    cache_dir: str = ""
    transfer_rate: float = 400.0  # Mbit/s this node sends model files to peers at, at most (0: no cap)
    log_level: str = "info"
    log_format: str = "text"  # text (key=value) or json
    http_host: str = "127.0.0.1"  # OpenAI-compatible gateway and /metrics; non-loopback needs an API key
    http_port: int = DEFAULT_HTTP_PORT  # 0 turns the gateway off (unlike --port, where 0 means any free port)
    api_key: str = field(default="", repr=False)  # bearer key for the gateway (env LANMESH_API_KEY); never logged
    api_key_file: str = ""  # file holding the key (first line), instead of api_key
    # Security (see docs/ARCHITECTURE.md, Security): the mesh key, or an explicitly open mesh.
    key_file: str = ""  # mesh key from `lanmesh keygen`; default: $LANMESH_KEY_FILE, then ~/.config/lanmesh/mesh.key
    insecure: bool = False  # plaintext, no authentication: anyone on the LAN can join and read the traffic
    # Member identities: the mesh authority's folder (default: `authority` beside the key file, if there), and
    # where the node keeps what must outlive it: the revocation list, the HTTP API's keys.
    authority_dir: str = ""
    state_dir: str = ""  # default: $STATE_DIRECTORY (systemd's StateDirectory=), else ~/.local/state/lanmesh
    # Limits on what one request, client or peer may ask of this node (beyond them: BAD_REQUEST or OVERLOADED).
    max_prompt_chars: int = 262_144  # characters of input (prompt, chat messages, texts to embed) per request
    max_tokens: int = 4096  # highest max_tokens a request may ask for
    max_embed_inputs: int = 256  # texts in one embed request
    max_inflight_per_client: int = 1024  # requests one client connection may have in flight here
    max_inflight_per_peer: int = 2048  # requests one peer may have forwarded here at once
    max_frame_bytes: int = 8 * 1024 * 1024  # largest ZeroMQ frame accepted (larger ones are dropped unread)
    max_items: int = 100_000  # longest msgpack array (maps: at most 10,000 keys) in one frame
    max_depth: int = 32  # deepest nesting of lists and maps in one frame

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.name:
            check_name(self.name, "node name")
        if not 0 <= self.port <= 65535 or not 0 <= self.pub_port <= 65535:
            raise ValueError("ports must be between 0 and 65535")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not 0 < self.suspect_after < self.dead_after:
            raise ValueError("need 0 < suspect_after < dead_after")
        if self.gossip_interval <= 0 or self.gossip_interval >= self.suspect_after:
            raise ValueError("gossip_interval must be positive and shorter than suspect_after")
        if self.max_tries < 1 or self.try_timeout < 0 or self.grace < 0 or self.stall_timeout < 0:
            raise ValueError("max_tries >= 1, try_timeout >= 0, stall_timeout >= 0 and grace >= 0 are required")
        if self.routing not in ("cache-aware", "p2c", "round-robin", "random", "least-loaded"):
            raise ValueError(
                f"routing must be cache-aware, p2c, round-robin, random or least-loaded, not {self.routing!r}"
            )
        if self.transfer_rate < 0:
            raise ValueError("transfer_rate must be >= 0 Mbit/s (0: no cap)")
        if self.kv_cache < 0:
            raise ValueError("kv_cache must be >= 0 MiB (0: the default, cut to fit the memory limit)")
        if self.layers:
            parse_layers(self.layers, "--layers")
        if self.prefix_cache < -1:
            raise ValueError("prefix_cache must be >= 0 MiB (0: none), or -1 for the default (half the kv cache)")
        if self.precision not in ("int4", "int8", "fp16", "fp32"):
            raise ValueError(f"precision must be int4, int8, fp16 or fp32, not {self.precision!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.max_memory:
            parse_memory_limit(self.max_memory)
        for spec in self.models:  # a bad spec is refused now, not after the models before it have loaded
            parse_model_arg(spec)
        for seed in self.peers:
            parse_hostport(seed.rpartition("@")[2])  # KEY@host:port with member identities
        if not 0 <= self.http_port <= 65535:
            raise ValueError("http_port must be between 0 and 65535 (0 = no HTTP gateway)")
        limits = ("max_prompt_chars", "max_tokens", "max_embed_inputs", "max_inflight_per_client")
        for name in (*limits, "max_inflight_per_peer", "max_items", "max_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_frame_bytes < 64 * 1024:
            raise ValueError("max_frame_bytes must be at least 65536 (64 KiB)")
        if (
            self.http_port
            and not is_loopback(self.http_host)
            and not (self.api_key or self.api_key_file or self.has_caller_keys())
        ):
            raise ValueError(
                f"--http-host {self.http_host} would expose the HTTP API beyond this machine without a key; "
                "give one with --api-key, LANMESH_API_KEY, --api-key-file or `lanmesh apikey add NAME` (or keep "
                "--http-host 127.0.0.1)"
            )
        if self.api_key:
            check_api_key(self.api_key, "--api-key (or LANMESH_API_KEY)")

    @classmethod
    def load(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, toml: str | None = None
    ) -> NodeConfig:
        """Build a config from a TOML file (or $LANMESH_CONFIG), env vars and flags (None = not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = toml or env.get("LANMESH_CONFIG")
        if path:
            values.update(_from_toml(Path(path)))
        values.update(_from_env(env))
        values.update({k: v for k, v in (flags or {}).items() if v is not None and k in _FIELDS})
        return cls(**values)

    def check_machine(self) -> None:
        """What only this machine can tell, checked before any model loads (a load takes minutes): the interface
        has an IPv4 address, the bind address is one of this machine's, the mesh's ports are free, and the cache
        folder can be written (a first build writes there after minutes of work)."""
        if self.interface:
            interface_ipv4(self.interface)
        if self.cache_dir:
            _check_writable(Path(self.cache_dir).expanduser())
        host = "" if self.bind in ("*", "0.0.0.0", "") else self.bind
        if host and not _is_ip(host):
            host = interface_ipv4(host)  # ZeroMQ binds an interface given by name too
        pub = self.pub_port or (self.port + 1 if self.port else 0)
        for port, option in ((self.port, "--port"), (pub, "--pub-port")):
            if port:
                _check_free(host, port, option)

    def node_id(self) -> str:
        if self.name:
            return self.name
        host = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-_")[:64] or "node"
        return f"{host}-{uuid.uuid4().hex[:6]}"  # a valid name whatever the hostname holds

    def has_caller_keys(self) -> bool:
        """Whether `lanmesh apikey add` gave the HTTP API keys per caller (in the state folder)."""
        return CallerKeys(self.state_folder()).configured()

    def state_folder(self) -> Path:
        """Where this node keeps state across restarts (member identities' revocation list, the API's keys)."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(systemd) if systemd else Path("~/.local/state/lanmesh").expanduser()

    def advertised_host(self) -> str:
        return self.advertise or (interface_ipv4(self.interface) if self.interface else default_ipv4())

    def max_memory_bytes(self) -> int | None:
        return parse_memory_limit(self.max_memory) if self.max_memory else None

    def http_api_key(self) -> str:
        """The gateway's API key ("" = none): `api_key`, else the first line of `api_key_file`."""
        if self.api_key or not self.api_key_file:
            return self.api_key
        try:
            key = Path(self.api_key_file).read_text().strip().splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {self.api_key_file}: {exc.strerror}") from None
        if not key or not key[0].strip():
            raise ValueError(f"the API key file {self.api_key_file} is empty")
        return check_api_key(key[0].strip(), f"the API key in {self.api_key_file}")


_FIELDS = {f.name: f for f in dataclasses.fields(NodeConfig)}


def _coerce(name: str, raw: Any) -> Any:
    """Turn a TOML or env value into the field's type, with a clear error."""
    kind = str(_FIELDS[name].type)
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("list"):
            if isinstance(raw, list):
                return [str(x) for x in raw]
            if name == "models":  # a spec has commas of its own: specs are separated by `;`
                return split_model_specs(str(raw))
            return [x.strip() for x in str(raw).split(",") if x.strip()]
        if kind.startswith("dict"):
            return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else parse_labels(str(raw))
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad value for {name}: {exc}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    for name in _FIELDS:
        raw = env.get(f"LANMESH_{name.upper()}")
        if raw is not None and raw != "":
            out[name] = _coerce(name, raw)
    return out


def _from_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    data = data.get("node", data)  # accept a [node] table or top-level keys
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown}")
    return {k: _coerce(k, v) for k, v in data.items()}


def parse_labels(text: str) -> dict[str, str]:
    out = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"label {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"peer {text!r} is not host:port")
    return host.strip("[]"), int(port)


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B?)\s*", re.IGNORECASE)
MIN_MEMORY_LIMIT = 64 << 20  # less than a node process needs before it loads any model


def parse_size(text: str) -> int:
    """Bytes in a size such as 512M, 8G, 1.5GiB or 300MB (K, M, G, T are powers of 1024); a bare number is bytes."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"size {text!r} is not a number with a unit, like 512M or 8G (units K, M, G, T)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_memory_limit(text: str) -> int:
    """`max_memory` in bytes: a size of at least 64 MiB, with a unit unless it is a plain number of bytes that big."""
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise ValueError(f"max_memory: {exc}") from None
    if size >= MIN_MEMORY_LIMIT:
        return size
    match = _SIZE.fullmatch(text)
    if match is not None and not match.group(2) and not match.group(3):
        number = match.group(1)
        raise ValueError(
            f"max_memory {text.strip()} has no unit, so it would mean {size} bytes: write {number}M or {number}G "
            "(units K, M, G, T)"
        )
    raise ValueError(f"max_memory {text.strip()} is below 64 MiB, less than a node needs; e.g. 512M or 8G")


def interface_ipv4(name_or_ip: str) -> str:
    """The IPv4 address of an interface given by name (or the address itself)."""
    addrs = psutil.net_if_addrs()
    if name_or_ip in addrs:
        for a in addrs[name_or_ip]:
            if a.family == socket.AF_INET:
                return str(a.address)
        raise ValueError(f"interface {name_or_ip} has no IPv4 address")
    for entries in addrs.values():
        if any(a.family == socket.AF_INET and a.address == name_or_ip for a in entries):
            return name_or_ip
    raise ValueError(f"no interface named or addressed {name_or_ip!r}; have {sorted(addrs)}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _check_writable(folder: Path) -> None:
    """Raise ValueError unless `folder` is (or can be made) a folder this process can write in."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".lanmesh-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"--cache-dir {folder}: cannot write there ({exc.strerror or exc}); give a folder this "
                         "user can write, e.g. ~/.cache/lanmesh") from None  # fmt: skip


def _check_free(host: str, port: int, option: str) -> None:
    """Raise ValueError unless a TCP listener could bind host:port now (as ZeroMQ would: with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            where = f"{host or 'every address'}"
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"port {port} is in use on {where} (another lanmesh node?): pick another with {option}"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ValueError(f"--bind {host}: not an address of this machine") from None
            raise ValueError(f"cannot bind port {port} on {where}: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) only reaches this machine."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a LAN address


def default_ipv4() -> str:
    """First IPv4 of an up, non-loopback interface; 127.0.0.1 when there is none."""
    stats = psutil.net_if_stats()
    for name, entries in sorted(psutil.net_if_addrs().items()):
        st = stats.get(name)
        if st is None or not st.isup or name == "lo" or name.startswith(("docker", "veth", "br-", "virbr")):
            continue
        for a in entries:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return "127.0.0.1"
