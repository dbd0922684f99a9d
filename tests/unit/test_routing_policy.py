"""The routing policy, as a specification: load estimates from gossip and own dispatches, and power of two choices."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import Choice, RoutingPolicy

MODEL = "smollm2"


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LocalLoad:
    """This node's exact (inflight + queued, capacity), as the executor would report it."""

    def __init__(self, load: int = 0, capacity: int = 1) -> None:
        self.load, self.capacity = load, capacity

    def __call__(self, model: str) -> tuple[int, int]:
        return self.load, self.capacity


def make_policy(clock: FakeClock, local: LocalLoad | None = None, seed: int = 0, self_id: str = "a") -> RoutingPolicy:
    return RoutingPolicy(self_id, local or LocalLoad(), stale_after=0.75, rng=random.Random(seed))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- the estimate -------------------------------------------------------------------------------


def test_unknown_peer_is_estimated_idle(clock: FakeClock) -> None:
    assert make_policy(clock).estimate("b", MODEL, clock.now) == 0.0


def test_requests_count_at_dispatch_not_at_reply(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.dispatched("b", MODEL)
    policy.dispatched("b", MODEL)
    assert policy.estimate("b", MODEL, clock.now) == 2.0
    assert policy.inflight_to("b") == 2
    policy.completed("b", MODEL)
    assert policy.estimate("b", MODEL, clock.now) == 1.0


def test_fresh_gossip_plus_what_this_node_sent_since(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.dispatched("b", MODEL)  # already counted in the peer's report below
    policy.observe_gossip("b", MODEL, load=5, capacity=4, now=clock.now)
    assert policy.estimate("b", MODEL, clock.now) == 5.0
    policy.dispatched("b", MODEL)
    policy.dispatched("b", MODEL)
    assert policy.estimate("b", MODEL, clock.now) == 7.0  # g + (m - m0) = 5 + (3 - 1)


def test_completions_since_gossip_lower_the_estimate_but_not_below_own_inflight(clock: FakeClock) -> None:
    policy = make_policy(clock)
    for _ in range(3):
        policy.dispatched("b", MODEL)
    policy.observe_gossip("b", MODEL, load=4, capacity=4, now=clock.now)
    policy.completed("b", MODEL)
    assert policy.estimate("b", MODEL, clock.now) == 3.0  # 4 + (2 - 3)
    policy.observe_gossip("b", MODEL, load=0, capacity=4, now=clock.now)  # a report that missed our 2 requests
    assert policy.estimate("b", MODEL, clock.now) == 2.0  # max(m, ...) : we know 2 are there


def test_stale_gossip_falls_back_to_own_inflight(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.observe_gossip("b", MODEL, load=9, capacity=4, now=clock.now)
    policy.dispatched("b", MODEL)
    clock.advance(0.75)
    assert policy.estimate("b", MODEL, clock.now) == 10.0  # exactly three gossip intervals old: still used
    clock.advance(0.25)
    assert policy.estimate("b", MODEL, clock.now) == 1.0  # older: only what this node knows for sure


def test_queue_in_a_reply_refreshes_the_estimate_and_keeps_capacity(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.observe_gossip("b", MODEL, load=0, capacity=8, now=clock.now)
    clock.advance(2.0)
    policy.dispatched("b", MODEL)
    policy.dispatched("b", MODEL)
    policy.completed("b", MODEL)  # the reply: completed first, then its queue
    policy.observe_queue("b", MODEL, queue=6, now=clock.now)
    assert policy.estimate("b", MODEL, clock.now) == 6.0
    # capacity 8 kept: (6 + 1) / 8 beats an idle peer of unknown capacity, (0 + 1) / 1
    assert policy.choose(MODEL, ["b", "c"], clock.now).node == "b"


def test_completed_never_counts_below_zero(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.completed("b", MODEL)
    policy.dispatched("b", MODEL)
    policy.completed("b", MODEL)
    policy.completed("b", MODEL)
    assert policy.inflight_to("b") == 0
    policy.dispatched("b", MODEL)
    assert policy.inflight_to("b") == 1


def test_inflight_to_sums_models_and_forget_clears_it(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.dispatched("b", "chat")
    policy.dispatched("b", "embed")
    policy.observe_gossip("b", "chat", load=3, capacity=2, now=clock.now)
    assert policy.inflight_to("b") == 2
    policy.forget("b")
    assert policy.inflight_to("b") == 0
    assert policy.estimate("b", "chat", clock.now) == 0.0
    policy.forget("never-seen")


def test_negative_observations_are_rejected(clock: FakeClock) -> None:
    policy = make_policy(clock)
    with pytest.raises(ValueError):
        policy.observe_gossip("b", MODEL, load=-1, capacity=4, now=clock.now)
    with pytest.raises(ValueError):
        policy.observe_queue("b", MODEL, queue=-1, now=clock.now)


def test_non_positive_stale_after_is_rejected(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="stale_after"):
        RoutingPolicy("a", LocalLoad(), stale_after=0.0)


# --- choosing -----------------------------------------------------------------------------------


def test_no_candidates_is_an_error(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match=MODEL):
        make_policy(clock).choose(MODEL, [], clock.now)


def test_single_remote_candidate_is_chosen(clock: FakeClock) -> None:
    assert make_policy(clock).choose(MODEL, ["b"], clock.now) == Choice("b", "only:b")


def test_self_as_the_only_candidate_is_local(clock: FakeClock) -> None:
    assert make_policy(clock, LocalLoad(50, 1)).choose(MODEL, ["a", "a"], clock.now) == Choice("a", "local")


def test_the_lower_load_per_slot_wins_and_the_reason_names_both(clock: FakeClock) -> None:
    policy = make_policy(clock, LocalLoad(load=3, capacity=1))  # self: (3 + 1) / 1 = 4
    policy.observe_gossip("b", MODEL, load=6, capacity=4, now=clock.now)  # (6 + 1) / 4 = 1.75
    for _ in range(20):
        assert policy.choose(MODEL, ["a", "b"], clock.now) == Choice("b", "p2c:b<a")


def test_ties_go_to_self(clock: FakeClock) -> None:
    for seed in range(20):
        policy = make_policy(clock, LocalLoad(load=1, capacity=2), seed=seed)
        policy.observe_gossip("b", MODEL, load=1, capacity=2, now=clock.now)
        assert policy.choose(MODEL, ["b", "a"], clock.now) == Choice("a", "p2c:a<b")


def test_ties_between_peers_go_to_the_first_sampled_so_both_get_work(clock: FakeClock) -> None:
    policy = make_policy(clock)
    chosen = {policy.choose(MODEL, ["b", "c"], clock.now).node for _ in range(50)}
    assert chosen == {"b", "c"}


def test_zero_capacity_node_is_never_chosen_over_one_with_capacity(clock: FakeClock) -> None:
    for seed in range(50):
        policy = make_policy(clock, LocalLoad(load=0, capacity=0), seed=seed)  # self cannot serve it
        policy.observe_gossip("b", MODEL, load=0, capacity=0, now=clock.now)
        policy.observe_gossip("c", MODEL, load=40, capacity=1, now=clock.now)  # busy, but can serve
        assert policy.choose(MODEL, ["a", "b", "c"], clock.now).node == "c"


def test_when_no_node_has_capacity_one_is_still_chosen(clock: FakeClock) -> None:
    policy = make_policy(clock, LocalLoad(load=0, capacity=0))
    policy.observe_gossip("b", MODEL, load=0, capacity=0, now=clock.now)
    assert policy.choose(MODEL, ["a", "b"], clock.now).node == "a"  # it will answer the request with a Reject


def test_peer_of_unknown_capacity_counts_as_one_slot(clock: FakeClock) -> None:
    policy = make_policy(clock)
    policy.observe_gossip("b", MODEL, load=2, capacity=4, now=clock.now)  # (2 + 1) / 4 = 0.75
    assert policy.choose(MODEL, ["b", "c"], clock.now).node == "b"  # c: (0 + 1) / 1 = 1


# --- the herd: why never "least loaded by gossip" -------------------------------------------------


ENTRIES = [f"n{i}" for i in range(8)]
BURST_PER_ENTRY = 16
CAPACITY = 4
# The last gossip, the same at every node: n0 had just emptied, the others held 2 each.
GOSSIP = {node: (0 if node == "n0" else 2) for node in ENTRIES}


def p2c_burst(seed: int) -> dict[str, int]:
    """Final load of every node after the burst, each entry routing with its own RoutingPolicy."""
    clock = FakeClock()
    final = dict(GOSSIP)  # true load; gossip was accurate when sent
    policies = {}
    for i, entry in enumerate(ENTRIES):
        local = lambda model, entry=entry: (final[entry], CAPACITY)  # exact: counts what others sent it too
        policy = RoutingPolicy(entry, local, rng=random.Random(seed * 1000 + i))
        for peer in ENTRIES:
            if peer != entry:
                policy.observe_gossip(peer, MODEL, GOSSIP[peer], CAPACITY, clock.now)
        policies[entry] = policy
    clock.advance(0.1)  # the burst lands between two gossip rounds
    for _ in range(BURST_PER_ENTRY):
        for entry in ENTRIES:
            node = policies[entry].choose(MODEL, ENTRIES, clock.now).node
            if node != entry:
                policies[entry].dispatched(node, MODEL)
            final[node] += 1
    return final


def least_loaded_by_gossip_burst() -> dict[str, int]:
    """The contrast: every entry picks the node the (shared, stale) gossip says is least loaded."""
    final = dict(GOSSIP)
    for _ in range(BURST_PER_ENTRY):
        for _entry in ENTRIES:
            node = min(ENTRIES, key=lambda n: GOSSIP[n])
            final[node] += 1
    return final


def test_least_loaded_by_gossip_sends_the_whole_burst_to_one_node() -> None:
    final = least_loaded_by_gossip_burst()
    assert final["n0"] == len(ENTRIES) * BURST_PER_ENTRY


@pytest.mark.parametrize("seed", range(20))
def test_power_of_two_choices_spreads_a_burst_under_stale_gossip(seed: int) -> None:
    final = p2c_burst(seed)
    fair = sum(final.values()) / len(ENTRIES)
    assert sum(final.values()) == sum(GOSSIP.values()) + len(ENTRIES) * BURST_PER_ENTRY
    assert max(final.values()) <= 2 * fair, final
    assert min(final.values()) > 0


# --- properties ---------------------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("gossip"), st.sampled_from("bc"), st.integers(0, 50), st.integers(0, 8)),
        st.tuples(st.just("queue"), st.sampled_from("bc"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("dispatched"), st.sampled_from("bc"), st.just(0), st.just(0)),
        st.tuples(st.just("completed"), st.sampled_from("bc"), st.just(0), st.just(0)),
        st.tuples(st.just("wait"), st.just(""), st.integers(0, 10), st.just(0)),
        st.tuples(st.just("forget"), st.sampled_from("bc"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


def _apply(policy: RoutingPolicy, clock: FakeClock, op: tuple[str, str, int, int]) -> None:
    kind, node, x, y = op
    if kind == "gossip":
        policy.observe_gossip(node, MODEL, x, y, clock.now)
    elif kind == "queue":
        policy.observe_queue(node, MODEL, x, clock.now)
    elif kind == "dispatched":
        policy.dispatched(node, MODEL)
    elif kind == "completed":
        policy.completed(node, MODEL)
    elif kind == "wait":
        clock.advance(x / 10)
    else:
        policy.forget(node)


@given(_ops)
def test_estimate_is_never_negative_nor_below_own_inflight(ops: list[tuple[str, str, int, int]]) -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    for op in ops:
        _apply(policy, clock, op)
        for node in "bc":
            assert policy.estimate(node, MODEL, clock.now) >= policy.inflight_to(node) >= 0


@given(
    _ops,
    st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=6),
    st.integers(0, 5),
    st.integers(0, 4),
    st.integers(0, 2**32),
)
def test_choose_always_returns_one_of_the_candidates(
    ops: list[tuple[str, str, int, int]], candidates: Sequence[str], load: int, capacity: int, seed: int
) -> None:
    clock = FakeClock()
    policy = make_policy(clock, LocalLoad(load, capacity), seed=seed)
    for op in ops:
        _apply(policy, clock, op)
    choice = policy.choose(MODEL, candidates, clock.now)
    assert choice.node in candidates
    assert choice.reason in ("local", f"only:{choice.node}") or choice.reason.startswith(f"p2c:{choice.node}<")


def test_with_measured_speeds_a_fast_busy_peer_beats_a_slow_idle_one(clock: FakeClock) -> None:
    # Both have two slots; "fast" completes 40 requests/s, "slow" 10/s. Fast has one request running.
    p = RoutingPolicy("entry", lambda m: (0, 0), rng=random.Random(1))
    p.observe_gossip("fast", "m", 1, 2, clock.now, rate=40.0)
    p.observe_gossip("slow", "m", 0, 2, clock.now, rate=10.0)
    assert {p.choose("m", ["fast", "slow"], clock.now).node for _ in range(10)} == {"fast"}
    # Without speeds the same loads favour the idle node, as (est + 1) / cap says.
    q = RoutingPolicy("entry", lambda m: (0, 0), rng=random.Random(1))
    q.observe_gossip("fast", "m", 1, 2, clock.now)
    q.observe_gossip("slow", "m", 0, 2, clock.now)
    assert {q.choose("m", ["fast", "slow"], clock.now).node for _ in range(10)} == {"slow"}


def test_speed_is_used_only_when_both_sampled_nodes_report_one(clock: FakeClock) -> None:
    p = RoutingPolicy("a", lambda m: (0, 2), local_rate=lambda m: 0.0)
    p.observe_gossip("b", "m", 1, 2, clock.now, rate=1000.0)
    # This node has not measured itself yet: plain (est + 1) / cap, where it is idle and wins.
    assert p.choose("m", ["a", "b"], clock.now).node == "a"
    with pytest.raises(ValueError):
        p.observe_gossip("b", "m", 0, 2, clock.now, rate=-1.0)
