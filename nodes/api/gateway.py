"""The OpenAI-compatible HTTP gateway of a node: FastAPI served by uvicorn in a thread of the node's own process.

Every HTTP request enters the mesh through an `AsyncClient` connected to this node's ROUTER, one per caller
(`callers.py`), so it is routed, forwarded and retried exactly like a ZeroMQ request, and the mesh's per-client
limits see each caller apart; the gateway never touches the mesh loop's state. The routes are in `routes.py`, the
bodies and what each field means in `bodies.py`, answers and streams in `answers.py`, tools and structured output
in `structured_output.py`, connection caps and deadlines in `guard.py`, the web console in `webconsole.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
import zmq.asyncio

from mesh import AsyncClient

from .callers import CallerClients
from .guard import KEEP_ALIVE_S, BodyGuard, ConnectionBook, GuardedH11, Listener
from .keys import CallerKeys, check_api_key
from .mesh_api import MeshApi
from .metrics import NodeMetrics
from .routes import DEFAULT_TIMEOUT_S, build_app
from .webconsole import VIEW_PATH

log = logging.getLogger("lanmesh.gateway")

_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", VIEW_PATH}
)


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens and which node it talks to."""

    node_id: str
    host: str
    port: int
    mesh_endpoint: str  # this node's ROUTER, e.g. 127.0.0.1:5555
    api_key: str = ""
    grace: float = 10.0  # seconds in-flight HTTP requests get when the node stops
    state_dir: str = ""  # where the keys per caller are (`lanmesh apikey`); "": only `api_key`


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is an error at start, not in a thread later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve HTTP host {host!r}: {exc}") from None
    family, kind, proto, _name, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} for HTTP: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


class GatewayServer(uvicorn.Server):
    """uvicorn's server with our `Listener` accepting on its socket (uvicorn itself listens on nothing)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, book: ConnectionBook) -> None:
        super().__init__(config)
        self.sock = sock
        self.book = book
        self.listener: Listener | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        config = self.config
        make = functools.partial(
            config.http_protocol_class,  # type: ignore[call-arg]  # uvicorn's protocols take these, asyncio's not
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        self.listener = Listener(self.sock, self.book, make)
        self.listener.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.listener is not None:
            self.listener.stop()  # accept nothing more; requests in flight get their grace
        await super().shutdown()


class Gateway:
    """The HTTP server of one node: its own thread and event loop; `start()` returns once it accepts."""

    def __init__(self, settings: GatewaySettings, metrics: NodeMetrics) -> None:
        if settings.api_key:
            check_api_key(settings.api_key, "the gateway's API key")  # NodeConfig checks it at start already
        self.settings = settings
        self.api = MeshApi(settings.node_id, metrics)
        keys = CallerKeys(Path(settings.state_dir) if settings.state_dir else None, settings.api_key)
        self.app = build_app(self.api, keys)
        self.connections = ConnectionBook(metrics=metrics)
        self.port = settings.port
        self._server: GatewayServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        sock = bind_socket(self.settings.host, self.settings.port)
        self.port = int(sock.getsockname()[1])
        _route_uvicorn_logs()
        config = uvicorn.Config(
            BodyGuard(self.app, self.api.metrics, self.api.feed, _ENDPOINTS),
            http=functools.partial(GuardedH11, book=self.connections),  # type: ignore[arg-type]
            loop="asyncio",  # zmq.asyncio needs a loop with add_reader; the stdlib one is the one it is tested on
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=int(KEEP_ALIVE_S),
            timeout_graceful_shutdown=max(1, int(self.settings.grace)),
        )
        self._server = GatewayServer(config, sock, self.connections)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="http-gateway", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                self._server.should_exit = True
                raise OSError("the HTTP gateway did not start; see the log above")
            time.sleep(0.01)
        log.info("HTTP gateway on %s (web console at /, OpenAI API under /v1, metrics at /metrics)", self.url)

    def begin_stop(self) -> None:
        """Stop accepting connections and say 'leaving' on /health; requests in flight go on."""
        self.api.leaving = True
        if self._server is not None:
            self._server.should_exit = True

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for requests in flight, then close."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(2.0)

    def _run(self, sock: socket.socket) -> None:
        try:
            asyncio.run(self._serve(sock))
        except Exception:
            log.exception("the HTTP gateway stopped on an error")
        finally:
            sock.close()

    async def _serve(self, sock: socket.socket) -> None:
        assert self._server is not None
        endpoint, node = self.settings.mesh_endpoint, self.api.node_id
        # learn=False: the gateway enters the mesh at its own node and dies with it, so learning other nodes would
        # only open (and keep handshaking) up to 16 more connections per caller's client.
        # One ZeroMQ context for all of them: a client per caller costs sockets, not two more threads each.
        ctx = zmq.asyncio.Context()
        own = AsyncClient(endpoint, timeout=DEFAULT_TIMEOUT_S, client_id=f"http@{node}", learn=False, context=ctx)

        def caller_client(caller: str) -> AsyncClient:
            return AsyncClient(endpoint, timeout=DEFAULT_TIMEOUT_S, client_id=f"http:{caller}@{node}", learn=False,
                               context=ctx)  # fmt: skip

        callers = CallerClients(caller_client, own)
        self.api.connect(own, callers)
        sweeper = asyncio.ensure_future(callers.sweep_forever())
        try:
            await self._server.serve()
        finally:
            self.api.connect(None)
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await callers.close()
            await own.close()
            ctx.destroy(linger=100)  # every client closed its sockets; this closes any a bug left open


def _route_uvicorn_logs() -> None:
    """uvicorn's own warnings and errors go through the node's log handler, the root logger's (its INFO chatter
    does not)."""
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.WARNING)
        logger.propagate = True


def mesh_endpoint(bind: str, port: int) -> str:
    """Where the gateway reaches its own node: loopback when the ROUTER listens on every address."""
    if bind in ("0.0.0.0", "*", ""):
        return f"127.0.0.1:{port}"
    if bind in ("::", "[::]"):
        return f"[::1]:{port}"
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
