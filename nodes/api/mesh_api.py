"""The gateway's side of the mesh: each caller's client, the node's status rows shared for a moment, and the watch
that gives up on a request once no live node serves its model."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from mesh import AsyncClient, AsyncStream, BadRequest, LanmeshError, MeshUnavailable, Result
from protocol import Task, parse_stage

from .callers import CallerClients, Lease
from .feed import RequestFeed, note_model, note_served
from .metrics import NodeMetrics

log = logging.getLogger("lanmesh.gateway")

T = TypeVar("T")

WATCH_S = 0.5  # while a request waits, check this often whether any live node still serves its model
STATUS_TIMEOUT_S = 2.0


def live_servers(rows: list[dict[str, Any]], model: str) -> tuple[bool, list[str]]:
    """(whether any known node serves `model`, the live ones that do) in a node's status rows. A node holding a
    stage of it (`model[a-b]`) serves it with the others that hold the other stages."""
    known, live = False, []
    name, _, pin = model.partition("@")
    for row in rows:
        served = row.get("models") or {}
        current = served.get(name)
        pinned_current = bool(pin) and isinstance(current, list) and len(current) > 3 and current[3].startswith(pin)
        # status rows show a current version under its name alone
        if model in served or pinned_current or _holds_a_stage(served, name, pin):
            known = True
            if row.get("state") in ("self", "alive"):
                live.append(str(row.get("node")))
    return known, sorted(live)


def _holds_a_stage(served: dict[str, Any], name: str, pin: str) -> bool:
    for served_name, load in served.items():
        stage = parse_stage(served_name)
        if stage is not None and stage.model == name:
            version = load[3] if isinstance(load, list) and len(load) > 3 else ""
            if not pin or str(version).startswith(pin[:8]):
                return True
    return False


def model_names(rows: list[dict[str, Any]]) -> list[str]:
    """The models the mesh serves, as a caller names them: a model split into stages once, under its own name."""
    names = set()
    for row in rows:
        for served in row.get("models") or {}:
            stage = parse_stage(served)
            names.add(stage.model if stage is not None else served)
    return sorted(names)


class MeshView:
    """This node's status rows, taken on the mesh loop through a status ping and shared for a moment.

    One fetch at a time: concurrent callers await the same ping, so a burst of requests costs one.
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] | None = None
        self._at = -1e9
        self._fetch: asyncio.Task[list[dict[str, Any]] | None] | None = None
        self._failing = False

    async def rows(self, client: AsyncClient, max_age: float) -> list[dict[str, Any]] | None:
        """Rows at most `max_age` seconds old; None when the mesh loop did not answer."""
        if self._rows is not None and time.monotonic() - self._at <= max_age:
            return self._rows
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.ensure_future(self._ping(client))
        return await asyncio.shield(self._fetch)

    async def _ping(self, client: AsyncClient) -> list[dict[str, Any]] | None:
        try:
            rows = await client.status(timeout=STATUS_TIMEOUT_S)
        except LanmeshError as exc:
            if not self._failing:
                log.warning("the mesh loop did not answer a status ping: %s", exc)
            self._failing = True
            return None
        self._failing = False
        self._rows, self._at = rows, time.monotonic()
        return rows


async def _next_piece(stream: AsyncStream) -> str | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class MeshApi:
    """What the HTTP handlers need: the callers' clients, the status view, the metrics, the watch on waiting
    requests."""

    def __init__(self, node_id: str, metrics: NodeMetrics) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.view = MeshView()
        self.feed = RequestFeed()  # the web console's "recent requests"
        self.leaving = False
        self._client: AsyncClient | None = None  # the gateway's own: status pings, and callers past the LRU
        self._callers: CallerClients | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise MeshUnavailable("the gateway is not connected to its node")
        return self._client

    @property
    def callers(self) -> CallerClients:
        if self._callers is None:
            raise MeshUnavailable("the gateway is not connected to its node")
        return self._callers

    def connect(self, client: AsyncClient | None, callers: CallerClients | None = None) -> None:
        self._client = client
        self._callers = callers

    async def rows(self, max_age: float) -> list[dict[str, Any]] | None:
        return await self.view.rows(self.client, max_age)

    async def watch(self, future: Awaitable[T], model: str) -> T:
        """Await a mesh answer; give up with MeshUnavailable once no live node serves `model` (seen twice).

        The mesh answers UNAVAILABLE quickly, but the client retries that until the deadline: for a model whose
        only servers died this turns a wait of the whole deadline into about a second.
        """
        task = asyncio.ensure_future(future)
        misses = 0
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=WATCH_S)
                if done:
                    return task.result()
                rows = await self.rows(max_age=WATCH_S / 2)
                known, live = live_servers(rows, model) if rows else (False, [])
                misses = misses + 1 if known and not live else 0
                if misses >= 2:
                    raise MeshUnavailable(f"no live node serves model {model!r} now")
        finally:
            if not task.done():
                task.cancel()  # also when the caller went away: the request's future is cancelled with it

    async def serve(
        self, caller: str, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
    ) -> Result:
        note_model(model)
        with self.callers.lease(caller) as lease:
            try:
                future = lease.client.submit(model, task, payload, params=params, timeout=timeout)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            result = await self.watch(future, model)
        note_served(result)
        return result

    async def open_stream(
        self, caller: str, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
    ) -> tuple[AsyncStream, str | None, Lease]:
        """Start a stream and wait for its first piece (None: it ended at once), so errors get their status.

        The caller's lease travels with the stream: release it when the stream ends.
        """
        note_model(model, stream=True)
        lease = self.callers.lease(caller)
        try:
            try:
                stream = await _start_stream(lease.client, model, task, payload, params, timeout)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            try:
                first = await self.watch(_next_piece(stream), model)
            except BaseException:
                await stream.aclose()
                raise
        except BaseException:
            lease.release()
            raise
        return stream, first, lease

    async def next_piece(self, stream: AsyncStream, model: str) -> str | None:
        return await self.watch(_next_piece(stream), model)


async def _start_stream(
    client: AsyncClient, model: str, task: Task, payload: Any, params: dict[str, Any], timeout: float
) -> AsyncStream:
    """A streamed request with any params (tools, guidance)."""
    return await client.stream(model, task, payload, params=params, timeout=timeout)
