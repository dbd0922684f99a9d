"""One mesh connection per HTTP caller, so the mesh tells HTTP callers apart.

The mesh caps and counts requests in flight per client *connection* (`--max-inflight-per-client`, checked in
`MeshNode._admit`). Behind one shared connection every HTTP caller shared one cap: a caller that filled it (or
walked away from its requests) refused everyone. So each caller gets an `AsyncClient` of its own (one DEALER to
this node's ROUTER), kept in a bounded LRU and closed once idle; callers past the bound, while every kept client
is busy, share an overflow client. A caller is the peer IP address: a node has one API key, which all its
callers share, so the key cannot tell them apart.

An HTTP caller that goes away cancels its request (`Lease` ends when the handler does, cancelled or not), so an
abandoned request stops counting here at once; cancelling its future (or closing its stream) makes the client send
the mesh's Cancel, which stops the work where it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh import AsyncClient

log = logging.getLogger("lanmesh.gateway")

MAX_CALLERS = 64  # mesh connections kept for distinct callers (each: a ZeroMQ context, 2 threads, ~50 KiB)
IDLE_CLOSE_S = 60.0  # a caller's connection with nothing in flight for this long is closed
SWEEP_S = 5.0


@dataclass(eq=False)
class Caller:
    """One caller's mesh connection and what it has in flight."""

    name: str
    client: AsyncClient
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)


class Lease:
    """A request's hold on its caller's client; `release()` (idempotent) when the request has ended."""

    __slots__ = ("caller", "_held")

    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        self._held = True
        caller.in_flight += 1
        caller.last_used = time.monotonic()

    @property
    def client(self) -> AsyncClient:
        return self.caller.client

    def release(self) -> None:
        if self._held:
            self._held = False
            self.caller.in_flight -= 1
            self.caller.last_used = time.monotonic()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CallerClients:
    """The mesh connections of one gateway's HTTP callers; use from the gateway's event loop only."""

    def __init__(
        self,
        make_client: Callable[[str], AsyncClient],
        overflow: AsyncClient,
        *,
        max_callers: int = MAX_CALLERS,
        idle_close_s: float = IDLE_CLOSE_S,
    ) -> None:
        self._make = make_client
        self._callers: OrderedDict[str, Caller] = OrderedDict()  # least recently used first
        self._overflow = Caller("(overflow)", overflow)
        self.max_callers = max_callers
        self.idle_close_s = idle_close_s
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._callers)

    def lease(self, caller: str) -> Lease:
        return Lease(self._caller(caller))

    def in_flight(self, caller: str) -> int:
        found = self._callers.get(caller)
        return found.in_flight if found is not None else 0

    def _caller(self, name: str) -> Caller:
        found = self._callers.get(name)
        if found is not None:
            self._callers.move_to_end(name)
            return found
        if len(self._callers) >= self.max_callers:
            idle = next((c for c in self._callers.values() if c.in_flight == 0), None)
            if idle is None:
                return self._overflow  # every kept caller is busy: share, rather than refuse
            self._drop(idle)
        made = Caller(name, self._make(name))
        self._callers[name] = made
        return made

    def sweep(self, now: float | None = None) -> int:
        """Close the connections of callers idle for `idle_close_s`; how many were closed."""
        now = time.monotonic() if now is None else now
        stale = [c for c in self._callers.values() if c.in_flight == 0 and now - c.last_used >= self.idle_close_s]
        for caller in stale:
            self._drop(caller)
        return len(stale)

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            self.sweep()

    async def close(self) -> None:
        for caller in list(self._callers.values()):
            self._drop(caller)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _drop(self, caller: Caller) -> None:
        del self._callers[caller.name]
        task = asyncio.ensure_future(caller.client.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
