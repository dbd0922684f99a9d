"""The mesh loop's watchdog: a loop that dies or stops turning makes the node say goodbye and exit."""

from __future__ import annotations

import threading
import time

from mesh import LoopWatchdog


def watch(loop: threading.Thread, last_turn: list[float], limit: float = 0.2) -> tuple[threading.Event, list[str]]:
    fired, said_goodbye = threading.Event(), []
    stopped = threading.Event()
    dog = LoopWatchdog(loop, lambda: last_turn[0], limit, stopped, goodbye=lambda: said_goodbye.append("mdns"),
                       on_stall=lambda reason: (said_goodbye.append(reason), fired.set()))  # fmt: skip
    dog.start()
    return fired, said_goodbye


def test_a_loop_that_stops_turning_is_caught_and_the_node_says_goodbye_first() -> None:
    release = threading.Event()
    loop = threading.Thread(target=release.wait, daemon=True)  # alive, but never turns
    loop.start()
    last_turn = [time.monotonic()]
    fired, events = watch(loop, last_turn)
    assert fired.wait(5), "a stalled loop went unnoticed"
    assert events[0] == "mdns" and "has not turned" in events[1]
    release.set()


def test_a_loop_that_died_is_caught() -> None:
    loop = threading.Thread(target=lambda: None, daemon=True)
    loop.start()
    loop.join()
    fired, events = watch(loop, [time.monotonic()], limit=30)
    assert fired.wait(10) and "died" in events[1]


def test_a_loop_that_turns_is_left_alone() -> None:
    stop = threading.Event()
    last_turn = [time.monotonic()]

    def turning() -> None:
        while not stop.wait(0.01):
            last_turn[0] = time.monotonic()

    loop = threading.Thread(target=turning, daemon=True)
    loop.start()
    fired, _ = watch(loop, last_turn, limit=0.2)
    assert not fired.wait(1.0)
    stop.set()
