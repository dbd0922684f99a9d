"""The failure detector, as a specification: what a node believes about a peer after what it heard, and silence."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import FORGOTTEN, FailureDetector, PeerState, Transition

ALIVE, SUSPECT, DEAD, LEFT = PeerState.ALIVE, PeerState.SUSPECT, PeerState.DEAD, PeerState.LEFT


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fd(clock: FakeClock) -> FailureDetector:
    return FailureDetector(suspect_after=1.0, dead_after=3.0, forget_after=300.0)


def test_first_message_from_a_peer_makes_it_alive(fd: FailureDetector, clock: FakeClock) -> None:
    assert fd.heard("b", clock.now, incarnation=7, seq=0) == Transition("b", None, ALIVE, "new")
    assert fd.state("b") is ALIVE
    assert fd.last_heard("b") == clock.now
    assert fd.incarnation("b") == 7


def test_unknown_peer_has_no_state(fd: FailureDetector, clock: FakeClock) -> None:
    assert fd.state("nobody") is None
    assert fd.last_heard("nobody") is None
    assert fd.incarnation("nobody") is None


def test_peer_heard_regularly_stays_alive_without_new_transitions(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 0)
    for seq in range(1, 40):  # gossip every 250 ms for 10 s
        clock.advance(0.25)
        assert fd.heard("b", clock.now, 1, seq) is None
        assert fd.tick(clock.now) == []
    assert fd.state("b") is ALIVE


def test_peer_is_suspect_after_one_second_of_silence(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now)
    clock.advance(0.75)
    assert fd.tick(clock.now) == []
    clock.advance(0.25)
    assert fd.tick(clock.now) == [Transition("b", ALIVE, SUSPECT, "silent 1.0s")]
    assert fd.state("b") is SUSPECT
    assert fd.tick(clock.now) == []  # reported once


def test_peer_is_dead_after_three_seconds_of_silence(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now)
    clock.advance(1.0)
    fd.tick(clock.now)
    clock.advance(1.75)
    assert fd.tick(clock.now) == []
    clock.advance(0.25)
    assert fd.tick(clock.now) == [Transition("b", SUSPECT, DEAD, "silent 3.0s")]
    assert fd.state("b") is DEAD


def test_late_tick_reports_both_steps_to_dead(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now)
    clock.advance(5.0)  # the loop was busy: no tick for 5 s
    assert fd.tick(clock.now) == [
        Transition("b", ALIVE, SUSPECT, "silent 5.0s"),
        Transition("b", SUSPECT, DEAD, "silent 5.0s"),
    ]


def test_suspect_peer_heard_again_is_alive(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 0)
    clock.advance(1.5)
    fd.tick(clock.now)
    assert fd.heard("b", clock.now, 1, 1) == Transition("b", SUSPECT, ALIVE, "heard")
    assert fd.state("b") is ALIVE


def test_dead_peer_heard_again_is_alive(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now)
    clock.advance(10.0)
    fd.tick(clock.now)
    assert fd.heard("b", clock.now) == Transition("b", DEAD, ALIVE, "heard")
    clock.advance(0.5)
    assert fd.tick(clock.now) == []  # silence counts from the new message


def test_any_message_without_incarnation_is_proof_of_life(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 3, 10)
    clock.advance(0.9)
    assert fd.heard("b", clock.now) is None  # e.g. a Reply: no transition, but it refreshes liveness
    clock.advance(0.9)
    assert fd.tick(clock.now) == []
    assert fd.incarnation("b") == 3


def test_restart_with_higher_incarnation_is_reported_even_while_alive(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 50)
    clock.advance(0.2)
    # The caller must fail over what was in flight to incarnation 1: the old process is gone.
    assert fd.heard("b", clock.now, 2, 0) == Transition("b", ALIVE, ALIVE, "restarted")
    assert fd.incarnation("b") == 2
    assert fd.heard("b", clock.now, 2, 1) is None  # seq restarts with the incarnation


def test_restart_revives_a_dead_peer(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 0)
    clock.advance(4.0)
    fd.tick(clock.now)
    assert fd.heard("b", clock.now, 2, 0) == Transition("b", DEAD, ALIVE, "restarted")


def test_message_from_an_older_incarnation_is_not_proof_of_life(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 2, 0)
    heard_at = clock.now
    for _ in range(4):
        clock.advance(0.9)
        assert fd.heard("b", clock.now, 1, 999) is None  # delayed gossip from before the restart
        fd.tick(clock.now)
    assert fd.last_heard("b") == heard_at
    assert fd.incarnation("b") == 2
    assert fd.state("b") is DEAD


def test_repeated_or_old_seq_is_not_proof_of_life(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 5)
    heard_at = clock.now
    clock.advance(0.75)
    assert fd.heard("b", clock.now, 1, 5) is None  # duplicate
    assert fd.heard("b", clock.now, 1, 4) is None  # reordered, older
    assert fd.last_heard("b") == heard_at
    clock.advance(0.25)
    assert [t.new for t in fd.tick(clock.now)] == [SUSPECT]
    assert fd.heard("b", clock.now, 1, 6) == Transition("b", SUSPECT, ALIVE, "heard")


def test_stale_gossip_does_not_revive_a_dead_peer(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 5)
    clock.advance(3.0)
    fd.tick(clock.now)
    assert fd.heard("b", clock.now, 1, 5) is None
    assert fd.state("b") is DEAD


def test_seq_without_incarnation_is_a_caller_error(fd: FailureDetector, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="incarnation"):
        fd.heard("b", clock.now, seq=3)


def test_left_peer_stays_left_against_late_gossip(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 4, 10)
    assert fd.left("b", clock.now, 4) == Transition("b", ALIVE, LEFT, "left")
    clock.advance(0.1)
    assert fd.heard("b", clock.now, 4, 11) is None  # gossip sent just before the goodbye, delivered after it
    assert fd.heard("b", clock.now) is None  # its last replies while it drains
    assert fd.state("b") is LEFT


def test_left_peer_is_not_reported_by_silence(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 4, 10)
    fd.left("b", clock.now, 4)
    clock.advance(10.0)
    assert fd.tick(clock.now) == []
    assert fd.state("b") is LEFT


def test_left_peer_comes_back_with_a_higher_incarnation(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 4, 10)
    fd.left("b", clock.now, 4)
    clock.advance(2.0)
    assert fd.heard("b", clock.now, 5, 0) == Transition("b", LEFT, ALIVE, "restarted")


def test_goodbye_from_an_older_incarnation_is_ignored(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 5, 0)
    assert fd.left("b", clock.now, 4) is None  # the old process's goodbye arrived after the new one's hello
    assert fd.state("b") is ALIVE


def test_goodbye_from_an_unknown_peer_keeps_its_late_gossip_out(fd: FailureDetector, clock: FakeClock) -> None:
    assert fd.left("b", clock.now, 4) == Transition("b", None, LEFT, "left")
    assert fd.heard("b", clock.now, 4, 3) is None
    assert fd.state("b") is LEFT


def test_goodbye_without_incarnation_takes_the_next_one_heard_as_the_leaver(
    fd: FailureDetector, clock: FakeClock
) -> None:
    fd.heard("b", clock.now)
    fd.left("b", clock.now)
    assert fd.heard("b", clock.now, 4, 3) is None
    assert fd.state("b") is LEFT
    assert fd.heard("b", clock.now, 5, 0) == Transition("b", LEFT, ALIVE, "restarted")


def test_dead_peer_is_forgotten_after_forget_after(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now, 1, 0)
    clock.advance(3.0)
    fd.tick(clock.now)  # dead now
    clock.advance(299.0)
    assert fd.tick(clock.now) == []
    clock.advance(1.0)
    assert fd.tick(clock.now) == [Transition("b", DEAD, DEAD, FORGOTTEN)]
    assert fd.state("b") is None
    assert "b" not in fd.nodes()
    assert fd.heard("b", clock.now, 1, 1) == Transition("b", None, ALIVE, "new")


def test_left_peer_is_forgotten_after_forget_after(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now)
    fd.left("b", clock.now)
    clock.advance(300.0)
    assert fd.tick(clock.now) == [Transition("b", LEFT, LEFT, FORGOTTEN)]
    assert fd.state("b") is None


def test_forget_drops_a_peer_at_once(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("b", clock.now)
    fd.forget("b")
    fd.forget("never-seen")
    assert fd.nodes() == {}


def test_nodes_lists_every_known_peer(fd: FailureDetector, clock: FakeClock) -> None:
    fd.heard("a", clock.now)
    fd.heard("b", clock.now)
    fd.left("c", clock.now)
    clock.advance(1.0)
    fd.heard("a", clock.now)
    fd.tick(clock.now)
    assert fd.nodes() == {"a": ALIVE, "b": SUSPECT, "c": LEFT}


@pytest.mark.parametrize(
    ("suspect_after", "dead_after", "forget_after"),
    [
        (0.0, 3.0, 300.0),
        (-1.0, 3.0, 300.0),
        (3.0, 3.0, 300.0),
        (3.0, 1.0, 300.0),
        (1.0, float("inf"), 300.0),
        (float("nan"), 3.0, 300.0),
        (1.0, 3.0, 0.0),
    ],
)
def test_bad_timeouts_are_rejected(suspect_after: float, dead_after: float, forget_after: float) -> None:
    with pytest.raises(ValueError, match="after"):
        FailureDetector(suspect_after, dead_after, forget_after)


# Any interleaving of messages (fresh, stale, restarts, goodbyes) and ticks.
_events = st.lists(
    st.one_of(
        st.tuples(st.just("heard"), st.sampled_from("abc"), st.none() | st.integers(0, 3), st.integers(0, 5)),
        st.tuples(st.just("left"), st.sampled_from("abc"), st.none() | st.integers(0, 3), st.just(0)),
        st.tuples(st.just("wait"), st.just(""), st.none(), st.integers(0, 40)),
    ),
    max_size=60,
)


def _replay(fd: FailureDetector, clock: FakeClock, events: list[tuple[str, str, int | None, int]]) -> None:
    for kind, node, incarnation, n in events:
        if kind == "heard":
            fd.heard(node, clock.now, incarnation, None if incarnation is None else n)
        elif kind == "left":
            fd.left(node, clock.now, incarnation)
        else:
            clock.advance(n / 10)
            fd.tick(clock.now)


@given(_events)
def test_silence_always_ends_in_dead_or_left(events: list[tuple[str, str, int | None, int]]) -> None:
    clock = FakeClock()
    fd = FailureDetector()
    _replay(fd, clock, events)
    # A hair past dead_after: at 1000 s, (T + 3.0) - T can round to 2.9999999999998 (real ticks come every 50 ms).
    clock.advance(3.0 + 1e-6)
    fd.tick(clock.now)
    assert set(fd.nodes().values()) <= {DEAD, LEFT}


@given(_events)
def test_known_incarnation_never_goes_backwards(events: list[tuple[str, str, int | None, int]]) -> None:
    clock = FakeClock()
    fd = FailureDetector()
    highest: dict[str, int] = {}
    for event in events:
        _replay(fd, clock, [event])
        for node in fd.nodes():
            inc = fd.incarnation(node)
            if inc is not None:
                assert inc >= highest.get(node, inc)
                highest[node] = inc
        for node in list(highest):
            if fd.state(node) is None:
                del highest[node]  # forgotten: a new life may start anywhere


def test_a_closed_connection_makes_a_peer_suspect_at_once_and_a_message_revives_it() -> None:
    clock = FakeClock()
    fd = FailureDetector()
    fd.heard("b", clock.now, 1, 1)
    clock.advance(0.1)
    assert [(t.old, t.new) for t in fd.connection_lost("b", clock.now)] == [(PeerState.ALIVE, PeerState.SUSPECT)]
    assert fd.connection_lost("b", clock.now) == []  # already suspect
    clock.advance(0.05)
    t = fd.heard("b", clock.now, 1, 2)
    assert t is not None and t.new is PeerState.ALIVE


def test_a_refused_reconnect_makes_a_peer_dead_at_once_but_a_left_peer_stays_left() -> None:
    clock = FakeClock()
    fd = FailureDetector()
    fd.heard("b", clock.now, 1, 1)
    steps = fd.unreachable("b", clock.now)
    assert [(t.old, t.new) for t in steps] == [
        (PeerState.ALIVE, PeerState.SUSPECT),
        (PeerState.SUSPECT, PeerState.DEAD),
    ]
    assert fd.state("b") is PeerState.DEAD
    assert fd.unreachable("b", clock.now) == []
    fd.heard("c", clock.now, 1, 1)
    fd.left("c", clock.now, 1)
    assert fd.unreachable("c", clock.now) == [] and fd.state("c") is PeerState.LEFT
    assert fd.unreachable("nobody", clock.now) == [] and fd.connection_lost("nobody", clock.now) == []


# ---------------------------------------------------------------- incarnations are bounded by this node's clock

WALL = 1_765_000_000 * 10**9  # this node's wall clock (ns) at monotonic 0
H = 3600 * 10**9


@pytest.fixture
def timed() -> FailureDetector:
    fd = FailureDetector(suspect_after=1.0, dead_after=3.0, forget_after=300.0)
    fd.sync_clock(WALL, 0.0)
    return fd


def test_a_forged_incarnation_far_ahead_is_refused_and_real_reports_keep_counting(timed: FailureDetector) -> None:
    """A process on the peer's own machine gossips as the peer with incarnation 2^63-2 for 3 s: refused each time,
    so the peer's real reports (a lower incarnation) are never stale and it stays alive."""
    real = WALL - 600 * 10**9  # started ten minutes ago
    assert timed.heard("b", 0.0, real, 1) is not None
    for i in range(12):
        assert timed.heard("b", 0.25 * i, 2**63 - 2, i) is None
        assert timed.heard("b", 0.25 * i + 0.1, real, 2 + i) is None  # heard, not stale: still alive
    assert timed.refused_incarnations == 12
    assert timed.incarnation("b") == real and timed.state("b") is ALIVE
    assert timed.left("b", 3.5, 2**63 - 2) is None and timed.state("b") is not LEFT, "a forged goodbye was believed"


def test_a_forged_incarnation_is_refused_at_first_contact_too(timed: FailureDetector) -> None:
    assert timed.heard("b", 1.0, WALL + 2 * H, 1) is None
    assert timed.state("b") is None and timed.refused_incarnations == 1
    assert timed.heard("b", 1.0, WALL - 5 * 10**9, 1) == Transition("b", None, ALIVE, "new")


def test_clocks_minutes_apart_and_restarts_after_hours_are_accepted(timed: FailureDetector) -> None:
    # A peer that ran for three weeks before this node met it, with a clock 10 minutes ahead of this node's.
    assert timed.heard("b", 0.0, WALL - 21 * 24 * H, 1) is not None
    five_hours = 5 * 3600.0
    restart = WALL + int(five_hours * 1e9) + 10 * 60 * 10**9  # it restarts 5 h later, by its own (fast) clock
    t = timed.heard("b", five_hours, restart, 1)
    assert t is not None and t.reason == "restarted" and timed.refused_incarnations == 0


def test_the_bound_follows_this_nodes_clock_as_it_is_resynced(timed: FailureDetector) -> None:
    later = 2 * H
    assert not timed.incarnation_ok(WALL + 2 * H, 0.0)
    timed.sync_clock(WALL + 3 * H, 10.0)  # NTP stepped this node's clock three hours forward
    assert timed.incarnation_ok(WALL + later, 10.0)


def test_without_a_clock_every_incarnation_is_taken_as_before(fd: FailureDetector) -> None:
    assert fd.heard("b", 0.0, 2**63 - 2, 1) is not None
