"""The membership protocol, told the time: one node's `Gossip` against a recording host, and whole meshes of them on
the simulated network of `bench/gossip_sim.py` (instant, lossless unless a test says otherwise)."""

from __future__ import annotations

from typing import Any

from bench.gossip_sim import LABELS, MODELS, SimMesh, messages_per_node_second
from mesh import Gossip, GossipSettings, PeerState, Transition
from protocol import Digest, LoadReport, Member, ModelLoad, PeerAddr, Ping, Suspicion

SUSPECT_OR_DEAD = (PeerState.SUSPECT, PeerState.DEAD)


class RecordingHost:
    def __init__(self) -> None:
        self.published: list[Any] = []
        self.sent: list[tuple[str, Any]] = []
        self.learned: list[PeerAddr] = []
        self.pulled: list[str] = []
        self.changes: list[Transition] = []

    def publish(self, msg: Any) -> None:
        self.published.append(msg)

    def send(self, node: str, msg: Any) -> bool:
        self.sent.append((node, msg))
        return True

    def learn(self, addr: PeerAddr, source: str) -> None:
        self.learned.append(addr)

    def pull(self, node: str) -> None:
        self.pulled.append(node)

    def changed(self, t: Transition) -> None:
        self.changes.append(t)


def addr(node: str) -> PeerAddr:
    return PeerAddr(node, "10.0.0.9", 7000, 7001)


def report(node: str, seq: int, incarnation: int = 1, leaving: bool = False) -> LoadReport:
    return LoadReport(node, incarnation, seq, addr(node), MODELS, LABELS, (), leaving, "", on_change=True)


def node_with_peer(peer: str = "b") -> tuple[Gossip, RecordingHost]:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    g.report(0.0, MODELS, LABELS)
    assert g.on_report(report(peer, 1), 0.0)
    return g, host


# ------------------------------------------------------------ one node


def test_a_member_is_routed_to_only_once_its_own_report_arrived_not_when_a_digest_names_it() -> None:
    g, host = node_with_peer()
    d = Digest("b", 3, 1, (Member(addr("a"), 100, 1), Member(addr("b"), 1, 1), Member(addr("c"), 5, 2)))
    g.on_digest(d, 1.0, asked=True)
    assert host.learned == [addr("c")] and g.state("c") is None
    assert g.on_report(report("c", 2, incarnation=5), 1.1)
    assert g.state("c") is PeerState.ALIVE


def test_only_the_member_itself_clears_a_suspicion_by_reporting_again() -> None:
    g, host = node_with_peer()
    g.on_suspicion(Suspicion("b", 1, 1, "w"), 1.0)
    assert g.state("b") is PeerState.SUSPECT
    g.on_digest(Digest("x", 2, 7, (Member(addr("b"), 1, 1, "alive"),)), 1.1, asked=False)
    assert g.state("b") is PeerState.SUSPECT  # another node's word that it is alive changes nothing
    assert not g.on_report(report("b", 1), 1.2)  # nor does its old report again
    assert g.on_report(report("b", 2), 1.3)
    assert g.state("b") is PeerState.ALIVE
    assert [(t.old, t.new) for t in host.changes[-2:]] == [
        (PeerState.ALIVE, PeerState.SUSPECT), (PeerState.SUSPECT, PeerState.ALIVE)
    ]  # fmt: skip


def test_an_accused_node_refutes_with_a_newer_report_and_answers_an_old_accusation_with_what_refutes_it() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    g.report(0.0, MODELS, LABELS)
    refutation = g.on_suspicion(Suspicion("a", 100, 1, "w", dead=True), 1.0)
    assert refutation is not None and refutation.seq == 2 and host.published[-1] == refutation
    again = g.on_suspicion(Suspicion("a", 100, 1, "v"), 1.1)
    assert again is not None and again.seq == 2 and len(host.published) == 2  # nothing new published
    assert g.on_suspicion(Suspicion("a", 99, 5, "v"), 1.2) is None  # an earlier life of this node


def test_a_refutation_is_published_three_times_more_a_tenth_of_a_second_apart_then_no_more() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    g.report(0.0, MODELS, LABELS)
    refutation = g.on_suspicion(Suspicion("a", 100, 1, "w"), 1.0)
    assert refutation is not None and len(host.published) == 2
    assert g.in_doubt is False  # (set by the next tick: a repeat due asks the loop for its fine clock)
    published_at = []
    for step in range(1, 21):  # the loop's fine clock: every 50 ms for a second
        now = 1.0 + step * 0.05
        before = len(host.published)
        g.tick(now)
        if len(host.published) > before:
            published_at.append(round(now, 2))
            assert host.published[-1].seq == refutation.seq  # the same report: it refutes the same accusation
    assert len(published_at) == 3  # each at the first tick from its time on (1.1, 1.2, 1.3 s)
    assert all(0 <= at - due < 0.05 + 1e-9 for at, due in zip(published_at, (1.1, 1.2, 1.3), strict=True))


def test_a_restarted_member_is_reported_as_restarted_so_work_on_its_old_process_moves() -> None:
    g, host = node_with_peer()
    assert g.on_report(report("b", 1, incarnation=2), 1.0)
    assert host.changes[-1].reason == "restarted" and g.state("b") is PeerState.ALIVE


def test_left_is_final_for_an_incarnation_and_a_restart_comes_back() -> None:
    g, host = node_with_peer()
    g.on_leave("b", 1, 1.0)
    assert g.state("b") is PeerState.LEFT
    assert not g.on_report(report("b", 5), 1.1)
    assert g.state("b") is PeerState.LEFT
    assert g.on_report(report("b", 1, incarnation=2), 2.0)
    assert g.state("b") is PeerState.ALIVE


def test_an_idle_node_publishes_its_report_once_and_load_that_moves_again() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    busy = {"echo": ModelLoad(4, 0, 8, 0.0, "v")}
    sent = [g.report(t * 0.25, MODELS if t < 100 else busy, LABELS) for t in range(200)]
    assert [i for i, r in enumerate(sent) if r is not None] == [0, 100]
    assert [r.seq for r in host.published] == [1, 2]


def test_while_an_older_node_is_alive_the_report_goes_out_every_interval_with_the_peers() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    for t in range(4):
        g.report(t * 0.25, MODELS, LABELS, legacy_peers=(addr("b"),))
    assert len(host.published) == 4 and host.published[-1].peers == (addr("b"),)


def test_members_with_requests_in_flight_are_probed_besides_the_ring() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host, GossipSettings(watchers=1))
    for i, peer in enumerate(("b", "c", "d", "e")):
        g.on_report(report(peer, 1, incarnation=i + 1), 0.0)
    ring = set(g.watched())
    other = next(p for p in ("b", "c", "d", "e") if p not in ring)
    g.tick(1.0, in_use=[other])
    pinged = {node for node, msg in host.sent if isinstance(msg, Ping)}
    assert pinged == ring | {other}


def test_a_node_that_did_not_run_for_a_while_restarts_its_silence_clocks_instead_of_accusing() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    g.report(0.0, MODELS, LABELS)
    for i, peer in enumerate(("b", "c", "d")):
        g.on_report(report(peer, 1, incarnation=i + 1), 0.0)
    t = 0.0
    while t < 1.0:  # probes answered
        g.tick(t)
        for node in ("b", "c", "d"):
            g.heard(node, t)
        t += 0.05
    g.tick(3.5)  # a starved CPU: no turn for 2.5 s, so no probe went out and no answer could come
    assert not any(isinstance(m, Suspicion) for m in host.published)
    assert all(g.state(n) is PeerState.ALIVE for n in ("b", "c", "d"))
    assert g.health == 1  # and, having run late, it is slower to accuse for a while
    for step in range(1, 30):
        g.tick(3.5 + step * 0.05)
    assert g.state("b") is PeerState.ALIVE  # 1.5 s of silence: not yet, at twice the usual patience
    for step in range(30, 50):  # from here on silence is evidence again
        g.tick(3.5 + step * 0.05)
    assert g.state("b") is PeerState.SUSPECT  # (kept to itself: it hears from nobody at all)


# ------------------------------------------------------------ meshes


def test_a_hung_member_is_suspect_everywhere_after_about_1s_and_dead_after_about_3s() -> None:
    mesh = SimMesh()
    names = mesh.converged(12)
    mesh.run_for(2.0)
    victim = names[5]
    mesh.hang(victim)
    suspect = mesh.run_while(lambda: not mesh.all_see(victim, SUSPECT_OR_DEAD), 10)
    dead = mesh.run_while(lambda: not mesh.all_see(victim, (PeerState.DEAD,)), 10)
    # Silence counts from the last pong, up to a probe period (0.5 s) before the hang.
    assert suspect is not None and 0.5 <= suspect <= 1.5, suspect
    assert dead is not None and 2.5 <= suspect + dead <= 3.5, suspect + dead
    mesh.resume(victim)
    back = mesh.run_while(lambda: not mesh.all_see(victim, (PeerState.ALIVE,)), 5)
    assert back is not None and back < 0.5  # it hears it was declared dead and reports again


def test_a_killed_member_is_dead_everywhere_within_a_second() -> None:
    mesh = SimMesh()
    names = mesh.converged(12)
    mesh.run_for(1.0)
    mesh.kill(names[3])
    took = mesh.run_while(lambda: not mesh.all_see(names[3], (PeerState.DEAD,)), 5)
    assert took is not None and took < 1.0


def test_a_new_node_that_knows_one_member_learns_the_mesh_and_the_mesh_learns_it() -> None:
    mesh = SimMesh()
    names = mesh.converged(30)
    mesh.run_for(1.0)
    newcomer = mesh.join("late", [names[7]])
    took = mesh.run_while(lambda: not (mesh.sees_everyone(newcomer) and mesh.all_see("late", (PeerState.ALIVE,))), 10)
    assert took is not None and took < 1.0


def test_on_a_lossy_network_a_newcomer_sees_everyone_and_is_seen_within_about_half_a_second() -> None:
    # Lost hellos and reports are said again every 0.1 s at first (`_backoff.HELLO`), and a lost table is asked
    # for again after 0.25 s (`_backoff.FIRST_SYNC`). At a flat 0.5 s, the pairs of 300 that lose two in a row (a
    # few at 3% loss) kept the mesh from seeing the newcomer for 0.6 s or more, and a lost table for 2.8 s.
    mesh = SimMesh(loss=0.03, tick=0.05, seed=3)
    names = mesh.converged(300)
    mesh.run_for(2.0)
    took = []
    for k in range(3):
        newcomer = mesh.join(f"late{k}", [names[k * 50]])
        took.append(
            mesh.run_while(
                lambda c=newcomer: not (mesh.sees_everyone(c) and mesh.all_see(c.name, (PeerState.ALIVE,))), 5, 0.01
            )
        )
        mesh.run_for(1.0)
    assert all(t is not None for t in took) and sorted(took)[1] < 0.55, took


def test_two_nodes_whose_tables_always_agree_go_on_syncing_every_two_seconds_for_hours() -> None:
    # No table ever comes back to a digest that matches: the newcomer's quick re-asking must end by itself (it once
    # counted on, and its pause overflowed a float after about half an hour).
    mesh = SimMesh(tick=0.25)
    mesh.converged(2)
    mesh.run_for(10.0)
    mesh.tally.reset()
    mesh.run_for(3 * 3600.0)
    per_node_s = mesh.tally.messages["Digest"] / 2 / (3 * 3600.0)
    assert 0.4 <= per_node_s <= 0.6, per_node_s


def test_an_idle_mesh_costs_each_node_the_same_messages_at_10_and_at_300_nodes_and_sends_no_reports() -> None:
    rates = []
    for n in (10, 300):
        mesh = SimMesh()
        mesh.converged(n)
        mesh.run_for(3.0)
        mesh.tally.reset()
        mesh.run_for(10.0)
        assert "LoadReport" not in mesh.tally.messages and "Suspicion" not in mesh.tally.messages
        rates.append(messages_per_node_second(mesh.tally, n, 10.0))
    assert rates[1] <= 1.2 * rates[0] and rates[1] < 15, rates


def test_a_node_that_was_stopped_for_seconds_refutes_its_death_and_accuses_nobody_when_it_runs_again() -> None:
    mesh = SimMesh()
    names = mesh.converged(10)
    mesh.run_for(2.0)
    sleeper = names[2]
    mesh.hang(sleeper)  # SIGSTOP: its watchers find it dead meanwhile
    mesh.run_for(5.0)
    assert mesh.all_see(sleeper, (PeerState.DEAD,))
    mesh.resume(sleeper)  # it reads what waited for it first, as the node's loop does, then ticks
    took = mesh.run_while(lambda: not mesh.all_see(sleeper, (PeerState.ALIVE,)), 5)
    mesh.run_for(3.0)
    assert took is not None and took < 0.5
    # It saw nobody for 5 s, which is no evidence against anyone: it published no suspicion.
    assert mesh.nodes[sleeper].gossip.counts.get("suspicions_sent", 0) == 0
    assert all(mesh.all_see(n, (PeerState.ALIVE,)) for n in names)


def test_a_node_cut_off_from_everyone_keeps_its_suspicions_to_itself_and_rejoins_when_plugged_back() -> None:
    mesh = SimMesh()
    names = mesh.converged(10)
    mesh.run_for(2.0)
    lonely = names[4]
    mesh.cut(lonely)
    mesh.run_for(8.0)
    others = [n for n in names if n != lonely]
    assert mesh.all_see(lonely, (PeerState.DEAD,))
    view = mesh.nodes[lonely].gossip.view
    assert all(view.public_state(n) is PeerState.ALIVE for n in others)  # what it saw alone it told nobody
    assert all(view.state(n) is PeerState.DEAD for n in mesh.nodes[lonely].gossip.watched())
    mesh.heal(lonely)
    took = mesh.run_while(lambda: not all(mesh.sees_everyone(n) for n in mesh.live()), 5)
    assert took is not None and took < 1.0


def test_a_suspicion_one_node_missed_reaches_it_through_anti_entropy() -> None:
    mesh = SimMesh(GossipSettings(sync_every=1.0))
    names = mesh.converged(8)
    mesh.run_for(1.0)
    deaf = mesh.nodes[names[0]]
    real_receive = deaf.receive

    def no_news(src: str, msg: Any, channel: str) -> None:
        if channel != "pub":  # it hears no published news at all
            real_receive(src, msg, channel)

    deaf.receive = no_news  # type: ignore[method-assign]
    victim = next(n for n in names[1:] if n not in deaf.gossip.watched())
    mesh.hang(victim)
    took = mesh.run_while(lambda: deaf.gossip.state(victim) is not PeerState.DEAD, 20)
    assert took is not None and took < 3.0 + 3 * 1.1, took
    assert mesh.tally.messages["Digest+members"] > 0


def test_at_one_percent_loss_no_live_member_is_ever_suspected() -> None:
    mesh = SimMesh(loss=0.01, seed=7)
    mesh.converged(30)
    mesh.run_for(120.0)
    suspicions = [t for _, _, t in mesh.transitions if t.new is not PeerState.ALIVE]
    assert suspicions == []


def test_a_suspicion_of_a_report_this_node_missed_is_cleared_by_the_member_reporting_past_it() -> None:
    mesh = SimMesh()
    names = mesh.converged(3)
    mesh.run_for(0.5)
    a, b = mesh.nodes[names[0]], mesh.nodes[names[1]]
    seq = b.gossip.seq
    a.gossip.on_suspicion(Suspicion(b.name, b.incarnation, seq + 8, names[2]), mesh.now)
    assert a.gossip.state(b.name) is PeerState.SUSPECT
    mesh.run_for(0.5)  # a asks b for its report; b's is older than the suspicion, so a tells b, and b refutes
    assert a.gossip.state(b.name) is PeerState.ALIVE and b.gossip.seq == seq + 9


def test_a_suspicion_naming_a_report_far_beyond_any_known_is_ignored() -> None:
    g, host = node_with_peer()
    g.on_suspicion(Suspicion("b", 1, 10**12, "liar", dead=True), 1.0)
    assert g.state("b") is PeerState.ALIVE
    assert g.on_suspicion(Suspicion("a", 100, 10**12, "liar"), 1.0) is None and len(host.published) == 1


def test_a_digest_from_a_node_not_verified_here_is_answered_but_not_believed() -> None:
    g, host = node_with_peer()
    lies = Digest("stranger", 2, 1, (Member(addr("b"), 1, 1, "dead"), Member(addr("c"), 1, 1)))
    assert g.on_digest(lies, 1.0, asked=False, trusted=False) is None
    assert g.state("b") is PeerState.ALIVE and host.learned == []
    answer = g.on_digest(Digest("stranger", 1, 1), 1.0, asked=False, trusted=False)
    assert answer is not None and {m.node for m in answer.members} == {"a", "b"}


def test_a_node_accused_or_proved_wrong_waits_longer_before_it_accuses_and_recovers_when_quiet() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    g.report(0.0, MODELS, LABELS)
    g.on_suspicion(Suspicion("a", 100, 1, "w"), 1.0)  # it was too slow to answer its watchers
    g.on_suspicion(Suspicion("a", 100, 2, "w"), 2.5)
    assert g.health == 2 and g.detector.suspect_after == 3.0 and g.detector.dead_after == 9.0
    for t in range(12, 60):
        g.tick(t / 4)
    assert g.health == 0 and g.detector.suspect_after == 1.0  # ten quiet seconds later


def test_a_watcher_with_several_probed_members_silent_at_once_counts_itself_unwell_one_with_one_does_not() -> None:
    mesh = SimMesh()
    names = mesh.converged(8)
    mesh.run_for(1.0)
    watcher = mesh.nodes[names[0]]
    one = watcher.gossip.watched()[0]
    mesh.hang(one)
    mesh.run_for(4.0)
    assert watcher.gossip.health == 0 and mesh.all_see(one, (PeerState.DEAD,))  # a member died: nothing wrong here
    mesh.resume(one)
    mesh.run_for(2.0)
    mesh.cut(names[0])  # its cable: every member it probes goes quiet at once
    mesh.run_for(2.0)
    assert watcher.gossip.health >= 1


def test_a_prefix_cache_change_is_news_and_a_report_carries_only_what_changed() -> None:
    host = RecordingHost()
    g = Gossip(addr("a"), 100, host)
    one, two = {"chat": b"1" * 8}, {"chat": b"1" * 8, "other": b"2" * 8}
    first = g.report(0.0, MODELS, LABELS, prefixes=one, revocations=3)
    assert first is not None and first.prefixes == one and first.revocations == 3
    assert g.report(1.0, MODELS, LABELS, prefixes=one, revocations=3) is None  # nothing new
    second = g.report(2.0, MODELS, LABELS, prefixes=two, revocations=3)  # a chat turn ended: at once, not in 2 s
    assert second is not None and second.prefixes == {"other": b"2" * 8}
    assert g.current_report().prefixes == two  # a member that asks (it missed a report, or is new) gets them all
    third = g.report(3.0, MODELS, LABELS, prefixes={"other": b"2" * 8}, revocations=4)
    assert third is not None and third.prefixes == {"chat": b""} and third.revocations == 4  # dropped, and a serial


def test_a_digest_entry_with_an_incarnation_far_ahead_of_this_nodes_clock_is_not_taken() -> None:
    g, _ = node_with_peer()
    g.sync_clock(1_000 * 10**9, 0.0)  # this node's wall clock: 1,000 s after the epoch
    forged = Member(addr("z"), 2**63 - 2, 1, "dead")  # believed, z's real reports would be stale for ever
    honest = Member(addr("y"), 999 * 10**9, 1, "dead")
    g.on_digest(Digest("b", 3, 1, (forged, honest)), 1.0, asked=False)
    assert "z" not in g.view and "y" in g.view
    assert not g.incarnation_ok(2**63 - 2, 1.0) and g.incarnation_ok(1_000 * 10**9 + 3599 * 10**9, 1.0)
