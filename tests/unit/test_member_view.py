"""The membership table and the rule for which news wins, the ring of watchers, and when a node's own report is news."""

from __future__ import annotations

import itertools
import random

from mesh import MemberView, PeerState, ReportNews, outranks
from protocol import Member, ModelLoad, PeerAddr


def member(node: str, incarnation: int = 1, seq: int = 1, state: str = "alive") -> Member:
    return Member(PeerAddr(node, f"10.0.0.{sum(map(ord, node)) % 250 + 1}", 7000, 7001), incarnation, seq, state)


def test_a_later_report_outranks_an_earlier_one_and_for_the_same_report_the_worse_state_wins() -> None:
    assert outranks(member("a", 1, 3), member("a", 1, 2, "dead"))  # the member reported again: refuted
    assert outranks(member("a", 2, 1), member("a", 1, 9, "left"))  # a restart outranks everything before it
    assert outranks(member("a", 1, 2, "suspect"), member("a", 1, 2))
    assert outranks(member("a", 1, 2, "dead"), member("a", 1, 2, "suspect"))
    assert not outranks(member("a", 1, 2), member("a", 1, 2, "suspect"))  # only a newer report clears a suspicion
    assert not outranks(member("a", 1, 1, "dead"), member("a", 1, 2))  # a suspicion of an old report is stale


def test_two_nodes_that_heard_the_same_news_in_any_order_hold_the_same_checksum() -> None:
    news = [member("b"), member("c"), member("b", 1, 2), member("c", 1, 1, "suspect"), member("d", 3, 1)]
    checksums = set()
    for order in itertools.permutations(news):
        view = MemberView(member("a"))
        for m in order:
            old = view.get(m.node)
            if old is None or outranks(m, old):
                view.put(m)
        checksums.add(view.digest())
    assert len(checksums) == 1
    other = MemberView(member("a"))
    for m in news[:3]:
        other.put(m)
    assert other.digest() != checksums.pop()


def test_private_evidence_changes_what_a_node_acts_on_but_not_what_it_tells_others() -> None:
    view = MemberView(member("a"))
    view.put(member("b"))
    before = view.digest()
    view.set_private("b", PeerState.SUSPECT)
    assert view.state("b") is PeerState.SUSPECT and view.public_state("b") is PeerState.ALIVE
    assert view.digest() == before
    view.put(member("b", 1, 1, "dead"))
    assert view.state("b") is PeerState.DEAD  # the worse of the two
    view.set_private("b", None)
    assert view.state("b") is PeerState.DEAD


def test_every_member_is_watched_by_three_others_and_watches_three_whatever_the_size() -> None:
    for n in (2, 3, 4, 10, 57):
        names = [f"node-{i}" for i in range(n)]
        views = {}
        for name in names:
            view = MemberView(member(name))
            for other in names:
                if other != name:
                    view.put(member(other))
            views[name] = view
        watched_by: dict[str, int] = dict.fromkeys(names, 0)
        for name, view in views.items():
            targets = view.watched(3)
            assert len(targets) == min(3, n - 1) and name not in targets
            assert len(set(targets)) == len(targets)
            for t in targets:
                watched_by[t] += 1
                assert name in views[t].watchers(t, 3)
        assert set(watched_by.values()) == {min(3, n - 1)}


def test_a_dead_member_leaves_the_ring_and_its_watchers_move_on_to_the_next() -> None:
    names = [f"node-{i}" for i in range(8)]
    view = MemberView(member(names[0]))
    for other in names[1:]:
        view.put(member(other))
    first = view.watched(3)
    version = view.ring_version
    view.put(member(first[0], 1, 1, "dead"))
    assert view.ring_version != version
    again = view.watched(3)
    assert first[0] not in again and first[1:] == again[:2] and len(again) == 3
    view.put(member(first[1], 1, 1, "suspect"))
    assert first[1] in view.watched(3)  # suspects stay watched, so their watchers can confirm or clear them


def test_an_older_members_ever_growing_seq_stays_out_of_the_checksum() -> None:
    a, b = MemberView(member("a")), MemberView(member("a"))
    a.put(member("old", 1, 5))
    b.put(member("old", 1, 9))
    a.set_legacy("old", True)
    b.set_legacy("old", True)
    assert a.digest() == b.digest()


def test_a_converged_view_copied_for_another_member_is_that_members_view() -> None:
    view = MemberView(member("a"))
    for other in ("b", "c", "d"):
        view.put(member(other))
    copy = view.copy_for("c")
    assert copy.me == "c" and copy.digest() == view.digest()
    assert set(copy.watched(3)) == {"a", "b", "d"}


# ------------------------------------------------------------ a node's own report


def content(load: int = 0, cap: int = 8, rate: float = 10.0, labels: dict[str, str] | None = None, leaving=False):  # type: ignore[no-untyped-def]
    return {"m": ModelLoad(load, 0, cap, rate, "v1")}, labels or {"gpu": "false"}, leaving


def test_an_idle_node_reports_once_and_then_stays_quiet() -> None:
    news = ReportNews(interval=0.25, threshold=0.25, settle=2.0)
    assert news.due(0.0, content())
    news.sent(0.0, content())
    assert not any(news.due(t / 10, content()) for t in range(1, 6000))


def test_load_that_moves_past_a_quarter_of_capacity_is_news_at_most_once_per_interval() -> None:
    news = ReportNews(interval=0.25, threshold=0.25, settle=2.0)
    news.sent(0.0, content(load=0))
    assert not news.due(1.0, content(load=1))  # 1 of 8: below the threshold
    assert news.due(1.0, content(load=2))
    news.sent(1.0, content(load=2))
    assert not news.due(1.1, content(load=6))  # big, but within the interval
    assert news.due(1.25, content(load=6))
    small = ReportNews(interval=0.25, threshold=0.25, settle=2.0)
    small.sent(0.0, content(load=0, cap=2))
    assert small.due(0.3, content(load=1, cap=2))  # at least one request


def test_a_small_difference_goes_out_once_it_has_lasted_the_settle_time() -> None:
    news = ReportNews(interval=0.25, threshold=0.25, settle=2.0)
    news.sent(0.0, content(load=0))
    assert not news.due(1.0, content(load=1))
    assert not news.due(2.9, content(load=1))
    assert news.due(3.0, content(load=1))
    news.sent(3.0, content(load=1))
    assert not news.due(4.0, content(load=0))
    assert not news.due(5.0, content(load=1))  # back to what was sent: nothing to say, the clock restarts
    assert not news.due(7.5, content(load=1))


def test_models_labels_capacity_leaving_and_a_rate_twice_or_half_as_fast_are_news_at_once() -> None:
    news = ReportNews(interval=0.25, threshold=0.25, settle=2.0)
    news.sent(0.0, content())
    assert news.due(0.5, content(cap=16))
    assert news.due(0.5, content(labels={"gpu": "true"}))
    assert news.due(0.5, content(leaving=True))
    assert news.due(0.5, content(rate=21.0)) and news.due(0.5, content(rate=4.0))
    assert not news.due(0.5, content(rate=14.0))
    assert not news.due(9.5, content(rate=14.0))  # a rate that drifts by less than 2x is no news, however long
    assert news.due(0.5, ({}, {"gpu": "false"}, False))


def test_checksums_agree_for_random_orders_of_many_members() -> None:
    rng = random.Random(3)
    states = ["alive", "suspect", "dead", "left"]
    news = [member(f"n{i % 50}", rng.randint(1, 3), rng.randint(1, 5), rng.choice(states)) for i in range(400)]
    digests = set()
    for _ in range(3):
        rng.shuffle(news)
        view = MemberView(member("me"))
        for m in news:
            old = view.get(m.node)
            if old is None or outranks(m, old):
                view.put(m)
        digests.add(view.digest())
    assert len(digests) == 1
