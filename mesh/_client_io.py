"""The threaded client's machinery under `Client`'s API: caller threads around one I/O thread that owns the ZeroMQ
sockets, the lock they share, how a blocked caller reads for itself, and the DEALERs of nodes learned at run time.

The failover logic lives in `_calls.CallTable` (shared with `AsyncClient`); this module moves frames, socket events
and timers between it and the sockets, and hands outcomes to callers.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
import time
from collections import deque
from typing import Any, cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from ._call import Call
from ._calls import CallTable
from ._dealers import DealerOptions, apply_monitor_event, close_all, close_dealer
from ._directory import NodeDirectory
from ._handles import NO_OUTCOMES, Outcome, Waiter, resolve
from .errors import InternalError, LanmeshError, MeshUnavailable

log = logging.getLogger(__name__)

# Plain ints: zmq's flag enums cost an enum construction per `&` on the hot path.
_EVENTS, _POLLIN, _DONTWAIT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.DONTWAIT)
_DRAIN_BATCH = 512  # frames read in one go before the reader lets others have the lock
# The I/O thread looks at its timers at least this often, so a new call whose deadline is later (almost all) need
# not wake it.
_IDLE_WAKE_S = 1.0
_IDLE_WAKE_MS = int(_IDLE_WAKE_S * 1000)
_CLOSE_JOIN_S = 2.0


class ClientIO:
    """The threaded client's machinery, under `Client`'s API: the DEALERs, the CallTable, the I/O thread, and the
    hand-offs between it and caller threads.

    Threading: every socket and the CallTable are used only under `_lock` (a ZeroMQ socket may move between threads
    behind a full memory barrier). The I/O thread sleeps in a poll on each DEALER's ZMQ_FD, never on the socket
    itself, so a caller may send while it sleeps. ZMQ_FD is edge-triggered and any send may consume its signal, so
    whoever holds the lock reads every DEALER until ZMQ_EVENTS shows no input before releasing it (`_settle`):
    replies that arrive later then raise ZMQ_FD again and wake the I/O thread.

    `submit()` only queues the call and wakes the I/O thread if it sleeps (no lock: a pipelining caller never waits
    on the I/O thread's socket work). A thread blocked in `request()` instead sends its call itself and polls the
    DEALERs while it waits (it "leads", one thread at a time), reading every reply that comes while the I/O thread
    leaves the DEALERs to it: two thread wake-ups fewer per synchronous request. Whoever ends the leader's call
    from another thread (a deadline, close) pokes it; a leader that leaves with calls still in flight hands the
    DEALERs back to the I/O thread. Futures are resolved outside the lock, on whichever of these threads read the
    reply, so a done-callback may call the client again (even `request()`), but should not block for long.

    DEALERs to learned nodes are opened and closed only by the I/O thread, under the lock, which updates its own
    polls and the leader's and then pokes the leader so that it polls the new set (`select.poll` reads its
    registrations when a poll starts, so changing them while another thread polls is safe).
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        *,
        client_id: str,
        dealer_options: DealerOptions,
        try_timeout: float | None,
        learn: bool,
    ) -> None:
        self.client_id = client_id
        self._dealer_options = dealer_options
        self._ctx = zmq.Context()
        self._dealers: dict[str, zmq.Socket[bytes]] = {}
        self._monitors: dict[str, zmq.Socket[bytes]] = {}
        try:
            for ep in endpoints:
                self._dealers[ep], self._monitors[ep] = self._dealer_options.open(self._ctx, ep)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise ValueError(f"cannot connect to {ep}: {exc}") from exc
        self._table = CallTable(
            endpoints, client_id=client_id, transmit=self._transmit, try_timeout=try_timeout,
            directory=NodeDirectory(endpoints) if learn else None, on_nodes_changed=self._wake,
            on_status=dealer_options.learn_status,
        )  # fmt: skip
        credentials = dealer_options.credentials
        self._introduce = (lambda ep: self._transmit(ep, credentials)) if credentials is not None else None
        self._lock = threading.Lock()
        self._closed = False
        self._outbox: list[Outcome] = []
        self._queued: deque[Call] = deque()  # submitted, for the I/O thread to send
        # Cancels may come from Stream.__del__ (the GC, maybe while this thread holds the lock): they queue here.
        self._cancels: deque[tuple[int, str]] = deque()
        # When the sleeping I/O thread wakes on its own (-inf: it is awake and will look at the timers itself). A
        # caller whose call needs the I/O thread sooner writes a byte to the wake-up socket.
        self._io_wake_at = -math.inf
        self._io_watching = True  # whether the I/O thread's poll includes the DEALERs
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._dealer_list = list(self._dealers.items())
        self._many = len(self._dealer_list) > 1
        self._sends = 0  # frames sent so far: tells the I/O thread whether its turn sent any
        # Each DEALER's ZMQ_FD, which the I/O thread and a leader poll instead of the socket: zmq_poll on the
        # socket would use it while a caller sends on it.
        self._fd_of = {ep: cast(int, dealer.getsockopt(zmq.FD)) for ep, dealer in self._dealers.items()}
        self._dealer_fds = set(self._fd_of.values())
        # The I/O thread's polls: with the DEALERs, and without them (while a caller leads); monitors in both.
        self._watching, self._quiet = zmq.Poller(), zmq.Poller()
        self._watchers: dict[Any, str] = {}  # monitor socket -> its node
        self._unread = False  # a reader stopped at its batch limit with input left on a DEALER
        self._leader = 0  # key of the call whose thread reads the DEALERs now (0: none, the I/O thread does)
        self._leader_poked = False
        self._poke_r, self._poke_w = socket.socketpair()
        self._poke_r.setblocking(False)
        self._poke_w.setblocking(False)
        self._pokes_open = True
        self._lead_poll = select.poll()  # one syscall per wait, where zmq_poll makes two
        for fd in self._dealer_fds:
            self._lead_poll.register(fd, select.POLLIN)
        self._lead_poll.register(self._poke_r.fileno(), select.POLLIN)
        self._thread = threading.Thread(target=self._run, name=f"lanmesh-{client_id}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the I/O thread; requests still pending fail with MeshUnavailable('client closed') and are cancelled
        on their nodes."""
        with self._lock:
            if not self._closed:  # closed already also when the I/O thread stopped after a crash
                self._closed = True
                self._wake()
        if threading.current_thread() is self._thread:
            return  # close() from a done-callback: the I/O thread stops once this callback returns
        self._thread.join(_CLOSE_JOIN_S)
        if self._thread.is_alive():
            log.error("the client I/O thread did not stop within %gs", _CLOSE_JOIN_S)
            return
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            if not self._leader:  # else the leader, poked by the I/O thread, closes them as it leaves
                self._close_pokes()

    # ------------------------------------------------------------- caller side

    def _enqueue(self, call: Call) -> None:
        if self._closed:
            raise MeshUnavailable("client closed")
        self._queued.append(call)
        if not self._closed:
            self._wake()
            return
        with self._lock:  # closed meanwhile: the I/O thread's last sweep of the queue may have missed this call
            self._fail_queued()
            outcomes = self._take_outcomes()
        resolve(outcomes)

    def _start(self, call: Call) -> bool:
        """Send the call's first try from this thread; True if this thread is now the leader and must read."""
        with self._lock:
            if self._closed:
                raise MeshUnavailable("client closed")
            table = self._table
            table.start(call, time.monotonic())
            lead = not self._leader and table.active(call.key)
            if lead:
                self._leader = call.key
            self._settle(leading=lead)
            if lead and not table.active(call.key):  # answered already, while this thread read the sockets
                self._leader = 0
                lead = False
                self._hand_over()
            outcomes = self._take_outcomes()
        if outcomes:
            resolve(outcomes)
        return lead

    def _lead(self, key: int) -> None:
        """Read the DEALERs from this thread until call `key` has ended; then hand them back."""
        poll = self._lead_poll.poll
        try:
            while True:
                poll(_IDLE_WAKE_MS)  # the I/O thread pokes on close or a deadline, so this cap is only a guard
                with self._lock:
                    if self._leader_poked:
                        self._drain(self._poke_r)
                        self._leader_poked = False
                    if self._closed:
                        self._leader = 0
                        self._close_pokes()  # close() left them to the leader
                        return
                    self._settle(leading=True)
                    ended = not self._table.active(key)
                    if ended:
                        self._leader = 0
                        self._hand_over()
                    outcomes = self._take_outcomes()
                if outcomes:
                    resolve(outcomes)
                if ended:
                    return
        except BaseException:
            self._step_down(key)  # e.g. KeyboardInterrupt in the poll: another thread or the I/O thread takes over
            raise

    def _step_down(self, key: int) -> None:
        """Stop leading for call `key` (if this thread does), handing the DEALERs to whoever reads next."""
        with self._lock:
            if self._leader == key:
                self._leader = 0
                if self._closed:
                    self._close_pokes()
                else:
                    self._hand_over()

    def _run_call(self, call: Call, waiter: Waiter) -> Any:
        try:
            if self._start(call):
                self._lead(call.key)
            return waiter.wait()
        except LanmeshError:
            raise
        except BaseException:
            # e.g. Ctrl-C while waiting: stop the request on its node. The interrupt may have come between this
            # thread becoming the leader and its first read, so hand the DEALERs back as well.
            self._step_down(call.key)
            self._cancel(call.key, "interrupted")
            raise

    def _cancel(self, key: int, reason: str) -> None:
        """Stop call `key` and cancel it on its node (by the I/O thread, which this wakes)."""
        # No lock: this also runs from Stream.__del__, which the GC may call while this thread holds the lock.
        # A cancel that races with close() is harmless: close cancels every pending call anyway.
        if self._closed:
            return
        self._cancels.append((key, reason))
        self._wake()

    def _wake(self) -> None:
        """Make the I/O thread run a turn soon. Any thread, lock or not: the I/O thread drains the wake-up socket,
        then clears the flag, then looks at its queues, so a byte is only skipped when one is on its way."""
        self._io_wake_at = -math.inf  # awake from now on: no caller needs to write another byte
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the socket buffer is full of wake-ups already; the I/O thread will wake
        except OSError:
            if not self._closed:
                raise
            # raced with close(): the wake-up socket is gone along with the I/O thread, which failed every call

    # ------------------------------------------------------------- under the lock, from any thread

    def _transmit(self, endpoint: str, frame: bytes) -> bool:
        try:
            self._dealers[endpoint].send(frame, _DONTWAIT)
        except zmq.Again:
            return False
        self._sends += 1
        return True

    def _settle(self, *, leading: bool = False) -> None:
        """Leave the sockets and threads so that whoever must wake does; call last before releasing the lock."""
        if self._read_replies(time.monotonic()):
            self._wake()  # more waiting than one batch: the I/O thread reads on
        else:
            wake = self._table.next_wake()
            if wake is not None and wake < self._io_wake_at:
                self._wake()  # a timer due before the sleeping I/O thread would look
        if not leading:
            self._hand_over()

    def _hand_over(self) -> None:
        """Make sure someone reads the DEALERs: poke a leader whose call ended here, or wake the I/O thread."""
        if self._leader:
            if not self._leader_poked and not self._table.active(self._leader):
                self._leader_poked = True
                self._poke_w.send(b"\0")  # one byte at most: the socket buffer cannot fill
        elif not self._io_watching and self._table.pending:
            self._wake()  # calls in flight and nobody polling their DEALERs

    def _close_pokes(self) -> None:
        if self._pokes_open:
            self._pokes_open = False
            self._poke_r.close()
            self._poke_w.close()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        # One read: bytes beyond it only cost a spare turn, where reading until EAGAIN costs an exception each time.
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass  # already drained

    def _read_replies(self, now: float) -> bool:
        """Read every DEALER until ZMQ_EVENTS shows no input; True when the batch limit left frames unread."""
        receive = self._table.receive
        budget = _DRAIN_BATCH
        again = True
        while again:
            again = False
            for ep, sock in self._dealer_list:
                # Ask EVENTS rather than recv until zmq.Again: raising and catching that costs more than the check.
                while cast(int, sock.get(_EVENTS)) & _POLLIN:
                    if not budget:
                        self._unread = True
                        return True
                    budget -= 1
                    receive(ep, sock.recv(_DONTWAIT), now)
                    # An answer can send a retry on a DEALER already read, which may consume its ZMQ_FD signal.
                    again = self._many
        self._unread = False
        return False

    def _fail_queued(self) -> None:
        closed = MeshUnavailable("client closed")
        while self._queued:
            self._queued.popleft().sink.fail(closed)

    def _take_outcomes(self) -> list[Outcome]:
        outbox = self._outbox
        if not outbox:
            return NO_OUTCOMES
        taken = outbox[:]
        outbox.clear()  # in place: every future sink holds this list
        return taken

    # ------------------------------------------------------------- the I/O thread

    def _run(self) -> None:
        table = self._table
        wake_fd = self._wake_r.fileno()
        for fd in self._dealer_fds:
            self._watching.register(fd, zmq.POLLIN)
        for poller in (self._watching, self._quiet):
            for ep, monitor in self._monitors.items():
                poller.register(monitor, zmq.POLLIN)  # monitor sockets are this thread's alone
                self._watchers[monitor] = ep
            poller.register(wake_fd, zmq.POLLIN)
        ready: list[tuple[Any, int]] = []
        try:
            while True:
                with self._lock:
                    if self._closed:
                        break
                    timeout = self._turn(ready, wake_fd)
                    outcomes = self._take_outcomes()
                if outcomes:
                    resolve(outcomes)
                ready = (self._watching if self._io_watching else self._quiet).poll(timeout)
        except Exception as exc:  # a bug in this client: fail every caller loudly instead of leaving them hanging
            log.exception("lanmesh client I/O thread crashed")
            with self._lock:
                table.fail_all(InternalError(f"client I/O thread crashed: {type(exc).__name__}: {exc}"))
                outcomes = self._take_outcomes()
            resolve(outcomes)
        finally:
            with self._lock:
                self._closed = True  # also after a crash: later calls must fail, not wait for a dead thread
                table.fail_all(MeshUnavailable("client closed"))  # cancels their tries: sent as the sockets close
                self._fail_queued()  # after setting `_closed`: a call queued later is failed by its submitter
                self._hand_over()  # wakes a leader, which then leaves the sockets alone: they close now
                self._close_sockets()
                outcomes = self._take_outcomes()
            resolve(outcomes)

    def _turn(self, ready: list[tuple[Any, int]], wake_fd: int) -> int:
        """One round of the I/O thread's work; returns how long it may then sleep (ms)."""
        table = self._table
        now = time.monotonic()
        if any(sock == wake_fd for sock, _ in ready):
            self._drain(self._wake_r)
            self._wake_pending = False
        # Replies first: an answer that arrived just before its node dropped is still an answer. Read only when
        # there can be input: every lock holder left the DEALERs read, so only a raised ZMQ_FD or a reader
        # that stopped at its batch limit means there is.
        more = False
        if self._unread or any(sock in self._dealer_fds for sock, _ in ready):
            more = self._read_replies(now)
        sends = self._sends
        watchers = self._watchers
        for sock, _ in ready:
            source = watchers.get(sock)
            if source is not None:
                self._drain_events(sock, source, now)
        queued = self._queued
        while queued:
            table.start(queued.popleft(), now)
        cancels = self._cancels
        while cancels:
            table.cancel(*cancels.popleft())
        table.expire(time.monotonic())
        changes = table.take_node_changes()
        if changes:
            self._change_nodes(changes)
        if self._sends != sends:  # new calls, failovers or retries went out, and a send may consume ZMQ_FD's signal
            more = self._read_replies(now) or more
        self._io_watching = not self._leader
        self._hand_over()  # a leader's call may have ended here (deadline, error)
        if more:
            self._io_wake_at = -math.inf
            return 0
        now = time.monotonic()
        wake = table.next_wake()
        self._io_wake_at = now + _IDLE_WAKE_S if wake is None else min(wake, now + _IDLE_WAKE_S)
        return max(0, math.ceil((self._io_wake_at - now) * 1000.0))

    def _drain_events(self, sock: zmq.Socket[bytes], ep: str, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(sock, zmq.DONTWAIT)
            except zmq.Again:
                return
            apply_monitor_event(self._table, ep, int(event["event"]), now, self._introduce)

    # ------------------------------------------------------------- learned nodes (the I/O thread, under the lock)

    def _change_nodes(self, changes: list[tuple[bool, str]]) -> None:
        for opened, ep in changes:
            if opened:
                self._open_dealer(ep)
            else:
                self._close_dealer(ep)
        if self._leader and not self._leader_poked:
            self._leader_poked = True  # the leader polls the DEALERs it saw when it began: make it look again
            self._poke_w.send(b"\0")

    def _open_dealer(self, ep: str) -> None:
        try:
            dealer, monitor = self._dealer_options.open(self._ctx, ep, resolve=False)
        except (zmq.ZMQError, ValueError) as exc:  # ValueError: a member identity knows no key for it
            log.warning("cannot connect to %s, learned from the mesh: %s", ep, exc)
            return  # the table waits for it to come up, which it never does; other nodes serve meanwhile
        fd = cast(int, dealer.getsockopt(zmq.FD))
        self._dealers[ep], self._monitors[ep], self._fd_of[ep] = dealer, monitor, fd
        self._dealer_list.append((ep, dealer))
        self._many = len(self._dealer_list) > 1
        self._dealer_fds.add(fd)
        self._watching.register(fd, zmq.POLLIN)
        self._lead_poll.register(fd, select.POLLIN)
        for poller in (self._watching, self._quiet):
            poller.register(monitor, zmq.POLLIN)
        self._watchers[monitor] = ep

    def _close_dealer(self, ep: str) -> None:
        dealer = self._dealers.pop(ep, None)
        if dealer is None:
            return
        monitor, fd = self._monitors.pop(ep), self._fd_of.pop(ep)
        self._dealer_list = [(e, sock) for e, sock in self._dealer_list if e != ep]
        self._many = len(self._dealer_list) > 1
        self._dealer_fds.discard(fd)
        self._watching.unregister(fd)
        self._lead_poll.unregister(fd)
        for poller in (self._watching, self._quiet):
            poller.unregister(monitor)
        del self._watchers[monitor]
        close_dealer(dealer, monitor)

    def _close_sockets(self) -> None:
        close_all(self._ctx, self._dealers.values(), self._monitors.values())


__all__ = ["ClientIO"]
