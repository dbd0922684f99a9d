"""What a node tells systemd through $NOTIFY_SOCKET (sd_notify), and that it tells nobody without one."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from nodes.runtime.systemd import START_EXTENSION_S, ServiceNotifier
from tests.notify_socket import NotifySocket


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_pings() -> None:
    notifier = ServiceNotifier.from_environment({})
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.send("READY=1") is False
    notifier.watch_loop(time.monotonic)
    assert not any(t.name == "systemd-watchdog" for t in threading.enumerate())
    notifier.close()


def test_ready_reaches_a_socket_in_the_abstract_namespace() -> None:
    notify = NotifySocket(abstract=True)
    try:
        notifier = ServiceNotifier.from_environment({"NOTIFY_SOCKET": notify.address})
        notifier.ready("serving echo on 127.0.0.1:5555")
        note = notify.wait_for("READY=1", timeout=2)
        assert note.fields["STATUS"] == "serving echo on 127.0.0.1:5555" and note.pid == os.getpid()
        notifier.close()
    finally:
        notify.close()


def test_the_environment_is_consumed_so_child_processes_never_speak_for_the_node(notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()), "X": "1"}
    notifier = ServiceNotifier.from_environment(env)
    assert notifier.enabled and notifier.watchdog_s == 3.0
    assert env == {"X": "1"}


def test_a_watchdog_meant_for_another_process_is_not_ours_to_feed(notify: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    notifier = ServiceNotifier.from_environment(env)
    assert notifier.enabled and notifier.watchdog_s is None


def test_model_loading_progress_shows_as_status_and_buys_start_up_time_at_most_once_a_second(
    notify: NotifySocket,
) -> None:
    notifier = ServiceNotifier(notify.address)
    for layer in range(30):  # a builder reporting every layer at once
        notifier.progress(f"smollm2: building ONNX int4 model: layer {layer}/30", layer / 30)
    notifier.progress("smollm2: ready", 1.0)
    notes = notify.collect(0.5)
    assert [n.fields["STATUS"] for n in notes] == [
        "loading models: smollm2: building ONNX int4 model: layer 0/30 (0%)",
        "loading models: smollm2: ready (100%)",
    ]
    assert all(n.fields["EXTEND_TIMEOUT_USEC"] == str(int(START_EXTENSION_S * 1e6)) for n in notes)


def test_stopping_is_said_with_a_reason(notify: NotifySocket) -> None:
    ServiceNotifier(notify.address).stopping("leaving the mesh")
    note = notify.wait_for("STOPPING=1", timeout=2)
    assert note.fields["STATUS"] == "leaving the mesh"


def test_pings_come_every_half_watchdog_interval_while_the_loop_turns_and_stop_when_it_does_not(
    notify: NotifySocket,
) -> None:
    last_turn = [time.monotonic()]
    turning = threading.Event()
    turning.set()
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.01):
            if turning.is_set():
                last_turn[0] = time.monotonic()

    threading.Thread(target=loop, daemon=True).start()
    notifier = ServiceNotifier(notify.address, watchdog_s=0.4)
    notifier.watch_loop(lambda: last_turn[0])
    try:
        pings = [n for n in notify.collect(1.1) if "WATCHDOG" in n.fields]
        assert len(pings) >= 4, "a turning loop is pinged for every 0.2 s"
        turning.clear()
        stalled_at = time.monotonic()
        late = [n for n in notify.collect(1.2) if "WATCHDOG" in n.fields]
        # At most the ping of the interval in which the loop still turned, and none after.
        assert len(late) <= 1 and all(n.at - stalled_at < 0.5 for n in late), [n.at - stalled_at for n in late]
        turning.set()
        notify.wait_for("WATCHDOG=1", timeout=1.0)
    finally:
        done.set()
        notifier.close()


def test_a_notify_socket_that_went_away_does_not_stop_the_node(notify: NotifySocket) -> None:
    notifier = ServiceNotifier(notify.address)
    notify.close()
    assert notifier.send("READY=1") is False
    assert notifier.send("STATUS=still going") is False
    notifier.close()
