"""The threaded client's hand-offs on real sockets: callers that send and read for themselves (a `request()` thread
"leads"), the I/O thread that takes the sockets back, and callbacks that call into the client again."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future

import pytest
from scripted_node import ScriptedNode

from mesh import Client, DeadlineExceeded, LanmeshError, MeshUnavailable, Result

pytestmark = pytest.mark.timeout(60)

# A leader waits in poll() at most this long without news; a test that finishes well inside it shows that the
# leader was woken (poked), not that the guard ran out.
GUARD_S = 1.0


@pytest.fixture
def node() -> Iterator[ScriptedNode]:
    with ScriptedNode("T") as n:
        yield n


def run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[Exception] = []

    def guarded(t: int) -> None:
        try:
            target(t)
        except Exception as exc:  # noqa: BLE001 - re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(count)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads), "a caller thread is still blocked"
    if errors:
        raise errors[0]


def test_eight_threads_of_synchronous_requests_each_get_their_own_answers(node: ScriptedNode) -> None:
    per_thread = 150
    answers: dict[int, list[object]] = {}
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)

        def caller(t: int) -> None:
            answers[t] = [client.request("echo", "infer", [t, i]).output for i in range(per_thread)]

        started = time.monotonic()
        run_threads(8, caller)
        took = time.monotonic() - started
    assert all(answers[t] == [[t, i] for i in range(per_thread)] for t in range(8))
    # 1200 round trips on loopback: a lost hand-off would park callers on the 1 s guard instead.
    assert took < 20, f"1200 requests from 8 threads took {took:.1f}s"


def test_requests_and_pipelined_futures_from_many_threads_mix_without_loss(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)
        got: dict[tuple[str, int, int], object] = {}
        lock = threading.Lock()

        def blocking(t: int) -> None:
            for i in range(100):
                out = client.request("echo", "infer", ["sync", t, i]).output
                with lock:
                    got[("sync", t, i)] = out

        def pipelining(t: int) -> None:
            futures = [client.submit("echo", "infer", ["future", t, i]) for i in range(200)]
            for i, f in enumerate(futures):
                out = f.result(timeout=15).output
                with lock:
                    got[("future", t, i)] = out

        run_threads(8, lambda t: blocking(t) if t % 2 else pipelining(t))
    assert len(got) == 4 * 100 + 4 * 200
    assert all(out == list(key) for key, out in got.items())


def test_a_deadline_reached_while_the_caller_reads_the_sockets_itself_is_raised_on_time(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.request("never", "infer", 1, timeout=0.3)
        took = time.monotonic() - started
    assert 0.29 < took < 0.3 + GUARD_S * 0.6, f"raised after {took:.2f}s"


def test_close_wakes_a_thread_waiting_in_request_at_once(node: ScriptedNode) -> None:
    client = Client(node.endpoint, timeout=30)
    client.ping(timeout=5)
    outcome: list[LanmeshError] = []

    def waiting() -> None:
        try:
            client.request("never", "infer", 1)
        except LanmeshError as exc:  # looked at in the test thread below
            outcome.append(exc)

    waiter = threading.Thread(target=waiting)
    waiter.start()
    deadline = time.monotonic() + 5
    while node.router.held < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert node.router.held == 1, "the request never reached the node"
    started = time.monotonic()
    client.close()
    waiter.join(5)
    took = time.monotonic() - started
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], MeshUnavailable) and "client closed" in str(outcome[0])
    assert took < GUARD_S * 0.6, f"the waiting thread took {took:.2f}s to notice close()"


def test_futures_still_resolve_after_the_thread_that_read_their_replies_leaves(node: ScriptedNode) -> None:
    # While a request() thread waits it reads every reply and the I/O thread leaves the sockets alone; when its
    # own answer comes first, the I/O thread must take the futures still in flight back at once.
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)
        blocking: Future[Result] = Future()
        leader = threading.Thread(target=lambda: blocking.set_result(client.request("slow:200", "infer", "first")))
        leader.start()
        deadline = time.monotonic() + 5
        while node.router.requests < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        futures = [client.submit("slow:400", "infer", i) for i in range(16)]
        submitted = time.monotonic()
        assert blocking.result(timeout=10).output == "first"
        results = [f.result(timeout=10) for f in futures]
        took = time.monotonic() - submitted
        leader.join(5)
    assert [r.output for r in results] == list(range(16))
    assert took < 0.4 + GUARD_S * 0.5, f"the futures resolved {took:.2f}s after they were submitted"


def test_done_callbacks_may_call_back_into_the_client(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=10) as client:
        client.ping(timeout=5)
        chain: list[object] = []
        finished: Future[None] = Future()

        def next_link(f: Future[Result]) -> None:
            chain.append(f.result().output)
            if len(chain) == 3:
                # A blocking request from inside a callback: the thread running it reads its own reply.
                chain.append(client.request("echo", "infer", "blocking").output)
                finished.set_result(None)
            else:
                client.submit("echo", "infer", len(chain)).add_done_callback(next_link)

        client.submit("echo", "infer", 0).add_done_callback(next_link)
        finished.result(timeout=10)
    assert chain == [0, 1, 2, "blocking"]


def test_a_cancelled_future_stops_its_request_and_the_client_goes_on(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=20) as client:
        client.ping(timeout=5)
        held = client.submit("never", "infer", 1)
        deadline = time.monotonic() + 5
        while node.router.held < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert held.cancel()
        with pytest.raises(CancelledError):
            held.result(timeout=1)
        assert client.request("echo", "infer", 2).output == 2


def test_an_unknown_or_unhashable_task_is_refused_before_anything_is_sent(node: ScriptedNode) -> None:
    with Client(node.endpoint, timeout=5) as client:
        for task in ("dance", ["infer"]):
            with pytest.raises(ValueError, match="task must be one of"):
                client.submit("echo", task, 1)  # type: ignore[arg-type]
        assert client.request("echo", "infer", 3).output == 3
    assert node.router.requests == 1
