"""One lanmesh node: loads its models, runs the executor and the mesh loop, leaves gracefully."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from mesh import (
    Authority,
    AuthorityError,
    MemberIdentity,
    MeshKey,
    MeshKeyError,
    MeshNode,
    MeshSettings,
    Plaintext,
    RequestLimits,
    Role,
    key_path,
    load_mesh_key,
    require_curve,
)
from protocol import Limits

from ..models.backends.base import Backend, ProgressFn, release_free_memory
from ..models.cache import CACHE_MARKER
from ..models.hardware import detect_labels, unmet
from ..models.loader import load_backend
from ..models.memory import MemoryNeed, estimate_memory, fit_kv_cache, onnx_chat
from ..models.specs import (
    ModelSpec,
    default_models,
    parse_model_arg,
    resolve_path,
    with_kv_cache,
    with_layers,
    with_precision,
    with_prefix_cache,
)
from ..models.transfer import PullError
from .admin import NodeAdmin, pulled_copy, spec_for_folder
from .config import NodeConfig, parse_hostport
from .executor import Executor
from .memory_budget import ModelTooBig, check_models_fit, describe_limits, node_memory_limits
from .stage_planner import StagePlanner, Want, cores
from .systemd import ServiceNotifier

log = logging.getLogger("lanmesh.node")


class StartupInterrupted(BaseException):
    """SIGTERM/SIGINT arrived while the node was starting (loading models, binding): leave instead of starting.

    A BaseException, like KeyboardInterrupt: it must unwind through model loaders that catch Exception.
    """


STAGE_OFFER_MARGIN = 16 * 1024 * 1024  # bytes (at least; 5% of what is free when more) a node keeps back from a stage


class Node:
    """A running node. `start()` returns once it serves; `run_until_signal()` blocks until SIGINT/SIGTERM."""

    def __init__(
        self, config: NodeConfig, backends: list[Backend] | None = None, notifier: ServiceNotifier | None = None
    ) -> None:
        self.config = config
        self.notifier = notifier or ServiceNotifier()  # systemd's notify socket; by default nobody listens
        self.node_id = _member_name(config) or config.node_id()  # a member identity's node is named by its certificate
        self._backends = backends
        self.executor: Executor | None = None
        self.mesh: MeshNode | None = None
        self.mesh_key: MeshKey | MemberIdentity | None = None  # None only when running --insecure
        self.metrics: Any = None  # nodes.api.metrics.NodeMetrics when the http extra is installed
        self.gateway: Any = None  # nodes.api.gateway.Gateway while the HTTP gateway runs
        self._stop = threading.Event()
        self._starting = False
        self._handlers_installed = False
        self.labels: dict[str, str] = {}
        self.admin: NodeAdmin | None = None
        self._spec_text: dict[str, str] = {}  # model name -> the spec it was configured with
        self._to_pull: list[ModelSpec] = []  # configured models whose files are not here: fetched from peers
        self._wants: list[Want] = []  # chat models this node holds a stage of by the automatic split
        self.planner: StagePlanner | None = None

    def _build_backends(self, progress: ProgressFn | None) -> list[Backend]:
        specs = [parse_model_arg(m) for m in self.config.models] if self.config.models else default_models()
        specs = [self.with_node_defaults(s) for s in specs]
        if self.config.layers:
            chat = [s for s in specs if s.kind in ("gguf", "transformers", "onnx-chat")]
            if len(chat) != 1:
                raise ValueError(f"--layers applies to one chat model, and {len(chat)} are configured; give each its "
                                 f"own with layers=A-B in its --model spec")  # fmt: skip
            specs = [with_layers(s, self.config.layers) if s is chat[0] else s for s in specs]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"two models share a name: {names}")
        self._spec_text = dict(zip(names, self.config.models or names, strict=True))
        specs = self._local_or_pulled(specs)
        self.labels = {**detect_labels(any(s.kind not in ("echo", "sleep") for s in specs)), **self.config.labels}
        runnable = []
        for spec in specs:
            missing = unmet(spec.requires, self.labels)
            if missing:
                log.warning("not serving %s: it requires %s, this node has %s", spec.name, missing, self.labels)
            else:
                runnable.append(spec)
        if not runnable and not self._to_pull:
            raise ValueError(f"none of the models can run here (node labels {self.labels})")
        runnable = self._fit_or_split(runnable)
        if self.notifier.enabled:  # systemd hears of the progress too (STATUS=, and more time to start)
            progress = _both(progress, self.notifier.progress)
        backends = []
        for number, spec in enumerate(runnable, 1):
            self.notifier.status(f"loading model {spec.name} ({number}/{len(runnable)})")
            t0 = time.monotonic()
            backend = load_backend(spec, progress=progress)
            engine = backend.describe().get("engine", type(backend).__name__)
            log.info("model %s ready in %.1fs (%s)", backend.name, time.monotonic() - t0, engine)
            backends.append(backend)
        return backends

    def _fit_or_split(self, specs: list[ModelSpec]) -> list[ModelSpec]:
        """The specs to load whole (or as the stage they name), after the memory check; a chat model that does not
        fit (or says layers=auto) is wanted instead: this node will hold the stage of it the automatic split gives."""
        split = [s for s in specs if s.options.get("layers") == "auto"]
        specs = [s for s in specs if s not in split]
        while True:
            try:
                fitted = self.check_memory(specs)
                break
            except ModelTooBig as exc:
                spec = next((s for s in specs if s.name == exc.model), None)
                if spec is None or "layers" in spec.options or not onnx_chat(spec):
                    raise
                log.warning("%s: serving a stage of it together with other nodes instead (the automatic split; "
                            "--layers A-B to choose one)", exc)  # fmt: skip
                specs = [s for s in specs if s is not spec]
                split.append(spec)
        if split:
            limits = node_memory_limits(self.config.max_memory_bytes())
            free = min(lim.free for lim in limits) if limits else psutil.virtual_memory().available
            for spec in fitted:
                try:
                    free -= estimate_memory(spec).total
                except (OSError, ValueError):
                    continue
            # Offer less than is free now: the process itself grows as it starts serving (35 -> 43 MiB measured), and a
            # stage planned to the last MiB was then refused when it loaded (a 3-node split under --max-memory 330M).
            free -= max(STAGE_OFFER_MARGIN, free // 20)
            if len(split) > 1:
                free //= len(split)
            self._wants = [Want(s, max(0, free), cores()) for s in split]
        if not fitted and not split and not self._to_pull:
            raise ValueError("none of the models fits this node's memory")
        return fitted

    def check_memory(self, specs: list[ModelSpec]) -> list[ModelSpec]:
        """Each model's memory budget (weights + engine + the key/value cache a chat model may fill), logged, and the
        specs to load with it: a chat model's cache left to the node shrinks to fit the cgroup's limit or
        --max-memory. A model that does not fit even so is refused with an error naming it and the limit (better
        than an OOM kill halfway through loading it). At start-up and before each model loaded on a running node
        (what is loaded already counts in the memory the cgroup and the process hold)."""
        limits = node_memory_limits(self.config.max_memory_bytes())
        estimated: list[tuple[ModelSpec, MemoryNeed]] = []
        for spec in specs:
            try:
                estimated.append((spec, estimate_memory(spec)))
            except (OSError, ValueError) as exc:  # loading it will say what is wrong, if anything is
                log.warning("cannot estimate the memory model %s needs (%s): loading it unchecked", spec.name, exc)
        fitted = {id(spec): (spec, need) for spec, need in estimated}

        def shrink(index: int, free: int) -> int | None:
            spec, need = estimated[index]
            smaller = fit_kv_cache(spec, need, free)
            if smaller is None:
                return None
            fitted[id(spec)] = smaller
            log.warning("model %s: key/value cache cut to %d MiB to fit the memory limit (%s)", spec.name,
                        smaller[1].kv_cache >> 20, describe_limits(limits))  # fmt: skip
            return smaller[1].total

        if limits:
            check_models_fit([(spec.name, need.total) for spec, need in estimated], limits, shrink)
        total = 0
        for spec, need in fitted.values():
            if need.total:
                total += need.total
                log.info("model %s: memory budget %s", spec.name, need.describe(), extra={"model": spec.name})
        in_use = psutil.Process().memory_info().rss
        where = f"{describe_limits(limits)}; " if limits else ""
        log.info("memory: %sthis process holds %d MiB, the models' budget is %d MiB", where, in_use >> 20,
                 total >> 20, extra={"memory_in_use": in_use, "memory_budget": total})  # fmt: skip
        return [fitted[id(spec)][0] if id(spec) in fitted else spec for spec in specs]

    def _local_or_pulled(self, specs: list[ModelSpec]) -> list[ModelSpec]:
        """The specs whose files are here (or were pulled before); the others are fetched from peers once joined."""
        here = []
        for spec in specs:
            try:
                if spec.kind not in ("echo", "sleep"):
                    resolve_path(spec)
            except FileNotFoundError as exc:
                pulled = pulled_copy(spec.name, self.config.cache_dir or None)
                if pulled is not None:
                    log.info("model %s: serving the copy pulled from peers earlier (%s)", spec.name, pulled.name)
                    here.append(spec_for_folder(spec.name, _pulled_kind(pulled), pulled))
                else:
                    log.warning("%s; it will be fetched from a peer that serves it", exc)
                    self._to_pull.append(spec)
                continue
            here.append(spec)
        return here

    def _pull_missing(self) -> None:
        """Fetch the configured models this node lacks from the peers that serve them, then serve them."""
        assert self.admin is not None and self.mesh is not None
        for spec in self._to_pull:
            end = time.monotonic() + 300
            while not self.mesh.holders(spec.name):
                if self._stop.wait(1.0) or time.monotonic() > end:
                    log.error("model %s: no peer serves it; not serving it", spec.name)
                    break
            else:
                try:
                    folder = self.admin.pull(spec.name)
                    self.admin.handle_load(f"name={spec.name},path={folder}")
                except (PullError, ValueError, OSError) as exc:
                    log.error("model %s: cannot fetch it from peers: %s", spec.name, exc)

    def with_node_defaults(self, spec: ModelSpec) -> ModelSpec:
        """A spec as this node serves it (its precision and key/value cache, unless the spec names them)."""
        spec = with_kv_cache(with_precision(spec, self.config.precision), self.config.kv_cache)
        return with_prefix_cache(spec, self.config.prefix_cache)

    def mesh_security(self) -> MeshKey | MemberIdentity | Plaintext:
        return self.mesh_key if self.mesh_key is not None else Plaintext()

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM leave gracefully at any moment: during start-up (model loading included) they stop it,
        once serving they start the graceful leave; a second one exits at once. Call first thing (main thread)."""

        def handler(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                log.warning("second %s: exiting now", name)
                raise SystemExit(1)
            self._stop.set()
            if self._starting:
                log.info("%s received while starting: leaving", name)
                raise StartupInterrupted(name)
            log.info("%s received: leaving the mesh", name)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        self._handlers_installed = True

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def start(self, progress: ProgressFn | None = None) -> None:
        """Load the models, join the mesh, start the gateway. Raises StartupInterrupted on a signal meanwhile
        (then call `shutdown()`: it undoes whatever had started)."""
        self._starting = True
        try:
            if self._stop.is_set():
                raise StartupInterrupted("stop requested before start")
            self._start(progress)
        finally:
            self._starting = False

    def _start(self, progress: ProgressFn | None) -> None:
        cfg = self.config
        api_key = cfg.http_api_key()  # an unreadable key file fails now, not after a long model load
        self.mesh_key = self._load_mesh_key()  # likewise: no key, no model load
        cfg.check_machine()  # and no such interface, or a port in use
        self.labels = {**detect_labels(False), **cfg.labels}
        backends = self._backends if self._backends is not None else self._build_backends(progress)
        release_free_memory()  # what loading the models freed (parsers, conversion buffers) leaves the process
        self.executor = Executor(backends, max_queue=cfg.max_queue, batch_wait=cfg.batch_wait_ms / 1000)
        self.executor.labels = dict(self.labels)  # node labels: what routing's `require` matches
        self.admin = NodeAdmin(self, cfg.transfer_rate * 1e6 / 8 if cfg.transfer_rate else None)
        for backend in backends:
            entry = self.admin.register(backend, self._spec_text.get(backend.name, backend.name))
            self.executor.set_version(backend.name, entry.version)
        self.executor.start()
        interfaces = [cfg.advertised_host()] if cfg.interface else None
        seeds = list(cfg.peers)
        for seed in seeds:
            parse_hostport(seed.rpartition("@")[2])
        identity = self.mesh_key if isinstance(self.mesh_key, MemberIdentity) else None
        if identity is not None:  # the nodes its identity file knows are seeds too (mDNS may not reach them)
            seeds += [f"{n.key}@{n.address}" for n in identity.nodes if n.name != identity.name]
        settings = MeshSettings(
            node_id=self.node_id,
            bind=cfg.bind,
            port=cfg.port,
            pub_port=cfg.pub_port,
            advertise=cfg.advertised_host(),
            seeds=seeds,
            mdns=cfg.mdns,
            interfaces=interfaces,
            gossip_interval=cfg.gossip_interval,
            suspect_after=cfg.suspect_after,
            dead_after=cfg.dead_after,
            try_timeout=cfg.try_timeout,
            max_tries=cfg.max_tries,
            stall_timeout=cfg.stall_timeout,
            routing=cfg.routing,
            key=self.mesh_key,
            fingerprint=self.mesh_key.fingerprint if self.mesh_key is not None else "",
            authority=self._authority() if identity is not None else None,
            state_dir=str(cfg.state_folder()) if identity is not None else "",
            limits=Limits(
                max_frame_bytes=cfg.max_frame_bytes,
                max_array_len=cfg.max_items,
                max_map_len=min(cfg.max_items, 10_000),
                max_str_len=min(cfg.max_frame_bytes, 4 * 1024 * 1024),
                max_depth=cfg.max_depth,
            ),
            request_limits=RequestLimits(cfg.max_prompt_chars, cfg.max_tokens, cfg.max_embed_inputs),
            max_inflight_per_client=cfg.max_inflight_per_client,
            max_inflight_per_peer=cfg.max_inflight_per_peer,
        )
        self.mesh = MeshNode(self.executor, settings)
        self.mesh.services.handler = self.admin.handle
        mesh = self.mesh
        self.executor.attach_stages(
            lambda stage: (self.node_id, lambda node, items: mesh.send_stage(node, items, stage.undeliverable))
        )  # fmt: skip
        try:
            self.mesh.start()
        except Exception:
            self.executor.stop(1.0)
            self.mesh.stop()
            self.mesh = None
            raise
        if self._to_pull:
            threading.Thread(target=self._pull_missing, name="lanmesh-pull", daemon=True).start()
        if self._wants:
            self.planner = StagePlanner(self, self._wants)
            self.planner.start()
        a = self.mesh.addr
        models = ", ".join(sorted(self.executor.lanes))
        log.info(f"serving {models} on {a.host}:{a.port} (gossip :{a.pub_port})", extra={"models": models})
        # The web stack takes ~1 s to import: only once the mesh already serves. Metrics start with the gateway.
        self.metrics = _http_metrics(self.node_id) if cfg.http_port else None
        if self.metrics is not None:
            self.mesh.observer = self.metrics
            self._start_gateway(api_key)

    def _start_gateway(self, api_key: str) -> None:
        from ..api.gateway import Gateway, GatewaySettings, mesh_endpoint

        assert self.mesh is not None
        cfg = self.config
        settings = GatewaySettings(
            self.node_id,
            cfg.http_host,
            cfg.http_port,
            mesh_endpoint(cfg.bind, self.mesh.addr.port),
            api_key,
            cfg.grace,
            str(cfg.state_folder()),
        )
        gateway = Gateway(settings, self.metrics)
        try:
            gateway.start()
        except OSError as exc:
            # The mesh node is useful without HTTP (ZeroMQ clients, peers): say so loudly and keep serving.
            log.error("HTTP gateway not started: %s; pass --http-port PORT (0 = no gateway)", exc)
            return
        self.gateway = gateway

    def _authority(self) -> Authority | None:
        """The mesh authority, when this node holds it: --authority-dir, else `authority` beside the key file."""
        cfg = self.config
        folder = Path(cfg.authority_dir).expanduser() if cfg.authority_dir else None
        if folder is None:
            path = key_path(cfg.key_file or None)
            folder = path.parent / "authority" if path is not None else None
            if folder is None or not folder.exists():
                return None
        try:
            authority = Authority.open(folder)
        except AuthorityError as exc:
            raise ValueError(str(exc)) from None
        log.info("this node holds the mesh authority (%s): it answers joins, invites and revocations", folder)
        return authority

    def _load_mesh_key(self) -> MeshKey | MemberIdentity | None:
        """The mesh key, or None with a loud warning under --insecure; raises when there is neither."""
        if self.config.insecure:
            log.warning(
                "INSECURE: this node runs an OPEN mesh (--insecure): no encryption, no authentication. Anyone on "
                "the LAN can read every prompt and answer, join the mesh and submit work. Create a key with "
                "`lanmesh keygen` and drop --insecure to close it.",
                extra={"security": "insecure"},
            )
            return None
        require_curve()
        key = load_mesh_key(self.config.key_file or None)
        if isinstance(key, MemberIdentity):
            if key.role < Role.NODE:
                raise MeshKeyError(f"this machine's identity ({key.name}) is a {key.role}'s: it may send "
                                   "requests but not serve; a node needs an invite with --role node")  # fmt: skip
            if self.config.name and self.config.name != key.name:
                raise MeshKeyError(f"--name {self.config.name}: this machine's certificate names it {key.name} "
                                   "(a name belongs to a key; drop --name, or enrol again)")  # fmt: skip
            log.info("member %s (%s) of mesh %s: its own key on every connection", key.name, key.role,
                     key.fingerprint, extra={"fingerprint": key.fingerprint})  # fmt: skip
            return key
        log.info("mesh key %s: CURVE on every connection", key.fingerprint, extra={"fingerprint": key.fingerprint})
        return key

    def request_stop(self) -> None:
        self._stop.set()

    def run_until_signal(self, on_ready: Callable[[], Any] | None = None) -> int:
        """Serve until SIGINT/SIGTERM, then leave gracefully; returns the exit status."""
        if not self._handlers_installed:
            self.install_signal_handlers()
        self._tell_systemd_ready()
        if on_ready is not None:
            on_ready()
        while not self._stop.wait(0.5):
            pass
        self.shutdown()
        return 0

    def _tell_systemd_ready(self) -> None:
        """READY=1 (the models are loaded and the mesh is up), then watchdog pings while the mesh loop turns."""
        if self.mesh is None or not self.notifier.enabled:
            return
        mesh, a = self.mesh, self.mesh.addr
        models = ", ".join(sorted(self.executor.lanes)) if self.executor is not None else ""
        http = f", HTTP on {self.config.http_host}:{self.config.http_port}" if self.gateway is not None else ""
        self.notifier.ready(f"serving {models} on {a.host}:{a.port}{http}")
        watchdog_s, stall = self.notifier.watchdog_s, self.config.stall_timeout
        if watchdog_s is not None and stall and watchdog_s < stall + 3:
            # Its own watchdog exits at --stall-timeout (checked every second) after an mDNS goodbye of up to 2 s.
            log.warning(
                "systemd's WatchdogSec=%g is not above --stall-timeout %g + 3 s: systemd may kill a stuck node "
                "before the node's own watchdog says goodbye on mDNS", watchdog_s, stall,
            )  # fmt: skip
        self.notifier.watch_loop(lambda: mesh.last_turn)

    def shutdown(self) -> None:
        """Graceful leave: unregister and gossip 'leaving', finish or hand back work, then close."""
        self.notifier.stopping()
        grace = self.config.grace
        end = time.monotonic() + grace
        if self.planner is not None:
            self.planner.stop()
        if self.mesh is not None:
            self.mesh.begin_leave()
        if self.gateway is not None:
            self.gateway.begin_stop()
        if self.executor is not None:
            self.executor.drain(grace)
        if self.gateway is not None:
            self.gateway.stop(max(0.5, end - time.monotonic()))
        if self.mesh is not None:
            self.mesh.wait_settled(max(0.0, end - time.monotonic()))
            self.mesh.stop()
        if self.executor is not None:
            self.executor.stop(max(0.5, end - time.monotonic()))
        self.notifier.close()
        log.info("left the mesh")


def _member_name(config: NodeConfig) -> str:
    """The name a member identity's certificate gives this node ("" for a shared key, or when there is no readable
    key: starting says what is wrong)."""
    if config.insecure:
        return ""
    try:
        key = load_mesh_key(config.key_file or None)
    except (MeshKeyError, OSError, ValueError):
        return ""
    return key.name if isinstance(key, MemberIdentity) else ""


def _both(first: ProgressFn | None, second: ProgressFn) -> ProgressFn:
    if first is None:
        return second

    def report(what: str, fraction: float) -> None:
        first(what, fraction)
        second(what, fraction)

    return report


def _pulled_kind(folder: Path) -> str:
    try:
        return str(json.loads((folder / CACHE_MARKER).read_text()).get("kind", ""))
    except (OSError, ValueError):
        return ""


_HTTP_EXTRA = frozenset({"fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic", "h11"})


def _http_metrics(node_id: str) -> Any:
    """The node's metrics, or None (with one warning) when the http extra is not installed."""
    try:
        from ..api import gateway  # noqa: F401 - imported here to find out whether the web stack is installed
        from ..api.metrics import NodeMetrics
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _HTTP_EXTRA:
            raise
        log.warning("HTTP gateway disabled: pip install lanmesh[http] (missing %s)", exc.name)
        return None
    return NodeMetrics(node_id)
