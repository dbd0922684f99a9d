"""HTTP callers each get a mesh connection of their own: kept while used, closed once idle, bounded in number; past
the bound, while every kept caller is busy, new callers share one overflow connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from mesh import AsyncClient
from nodes.api.callers import CallerClients


class FakeClient:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def _callers(max_callers: int = 2, idle_close_s: float = 60.0) -> tuple[CallerClients, list[FakeClient]]:
    made: list[FakeClient] = []

    def make(name: str) -> AsyncClient:
        made.append(FakeClient(name))
        return cast(AsyncClient, made[-1])

    overflow = cast(AsyncClient, FakeClient("overflow"))
    return CallerClients(make, overflow, max_callers=max_callers, idle_close_s=idle_close_s), made


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_each_caller_gets_its_own_connection_and_keeps_it() -> None:
    async def scenario() -> None:
        callers, made = _callers()
        with callers.lease("10.0.0.1") as a1, callers.lease("10.0.0.2") as b, callers.lease("10.0.0.1") as a2:
            assert a1.client is a2.client and a1.client is not b.client
            assert callers.in_flight("10.0.0.1") == 2
        assert callers.in_flight("10.0.0.1") == 0 and [c.name for c in made] == ["10.0.0.1", "10.0.0.2"]

    _run(scenario())


def test_a_new_caller_takes_the_place_of_the_least_recently_used_idle_one() -> None:
    async def scenario() -> None:
        callers, made = _callers(max_callers=2)
        callers.lease("a").release()
        busy = callers.lease("b")
        with callers.lease("c") as c:
            assert cast(Any, c.client).name == "c"
        await asyncio.sleep(0)  # the evicted connection closes in the background
        assert made[0].closed and not made[1].closed and len(callers) == 2
        busy.release()

    _run(scenario())


def test_when_every_kept_caller_is_busy_newcomers_share_the_overflow_connection() -> None:
    async def scenario() -> None:
        callers, made = _callers(max_callers=1)
        held = callers.lease("a")
        with callers.lease("b") as b:
            assert cast(Any, b.client).name == "overflow"
        held.release()
        held.release()  # a release is idempotent: a cancelled request may end twice
        assert callers.in_flight("a") == 0

    _run(scenario())


def test_idle_callers_are_closed_after_a_while_busy_ones_never() -> None:
    async def scenario() -> None:
        callers, made = _callers(max_callers=4, idle_close_s=10)
        callers.lease("idle").release()
        busy = callers.lease("busy")
        assert callers.sweep(time.monotonic() + 11) == 1
        await callers.close()
        assert made[0].closed and made[1].closed and len(callers) == 0
        busy.release()

    _run(scenario())
