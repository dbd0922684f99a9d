"""Gossip that grows with the news, not the mesh: what one node tells whom, and what it makes of what it hears.

Pure, like the failure detector: `Gossip` is told what arrived and what time it is (`now`), and acts through the
`GossipHost` it was given (publish to every subscriber, send to one member, connect to a new one, ask one for its
report). `Membership` carries that out on a node's sockets; `bench/gossip_sim.py` on a simulated network.

What a node sends, and when (per node, none of it grows with the mesh):

- **Its own report** when it is news (`ReportNews`): models, labels, leaving, its prefix caches or its revocation
  list changed, a model's load moved past a threshold, or a smaller difference lasted `settle` seconds; at most once
  per `interval`. An idle node sends none.
- **Probes**: a `Ping` every `probe_every` to the `watchers` members just before it on the ring (`MemberView.watched`),
  to the members it has requests on, and to those it privately suspects. Silence from a probed member
  (`suspect_after`, `dead_after`, measured by a `FailureDetector` that holds only probed members) or a link that
  closed makes it suspect, then dead.
- **Suspicions**: what a node finds out about a member it watches on the ring it publishes (`Suspicion`), so every
  node knows within a message of the watchers; the member refutes by reporting again. What it finds out otherwise
  (transport, requests in flight) stays private, and so does all of it while the node hears from nobody at all:
  a node cut off from the mesh does not accuse the mesh.
- **Anti-entropy**: every `sync_every` a `Digest` (count and checksum of the public table) to one member drawn at
  random; only when the tables differ do the two exchange their tables, and each pulls the reports it lacks from
  the members themselves (a report is accepted only from the member it describes).

Suspect members that nobody refutes become dead after `dead_after - suspect_after`; dead and left ones are
forgotten after `forget_after`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import Any, Protocol

from protocol import Digest, LoadReport, Member, ModelLoad, PeerAddr, Ping, StageWant, Suspicion

from ._backoff import FIRST_SYNC, REFUTATION, REFUTATION_REPEATS, pauses_from
from ._failure import FORGOTTEN, FailureDetector, PeerState, Transition
from ._news import Content, ReportNews
from ._prefixes import summary_news
from ._settings import GossipSettings
from ._view import RANK, MemberView, outranks

__all__ = ["HEALTH_MAX", "SEQ_AHEAD", "Gossip", "GossipHost", "GossipSettings"]

HEALTH_MAX = 3  # how unwell a node may count itself: it then waits up to 4x as long before it accuses anyone
HEALTH_RECOVERS_S = 5.0  # quiet seconds per step back

# How many reports ahead of the last one known a suspicion may name. Honest watchers know at most the few reports
# a node missed; a forged one far ahead would make the accused unable to refute it (it refutes by reporting past it).
SEQ_AHEAD = 10_000


class GossipHost(Protocol):
    """What `Gossip` needs of the node (or of a simulation)."""

    def publish(self, msg: LoadReport | Suspicion) -> None:
        """To every node that subscribed to this one (the node's PUB)."""

    def send(self, node: str, msg: Ping | Digest | Suspicion) -> bool:
        """To one member, on the link this node holds to it; False when it could not go."""

    def learn(self, addr: PeerAddr, source: str) -> None:
        """A member this node holds no link to: connect to it and say hello (its report will follow)."""

    def pull(self, node: str) -> None:
        """Ask a member for its current report (a `Hello`: the report comes back on the same link)."""

    def changed(self, t: Transition) -> None:
        """What this node acts on about `t.node` changed (routing, fail-over, logs); FORGOTTEN: drop it."""


class Gossip:
    """One node's membership protocol (see the module docstring)."""

    def __init__(
        self,
        addr: PeerAddr,
        incarnation: int,
        host: GossipHost,
        settings: GossipSettings | None = None,
        rng: random.Random | None = None,
        fingerprint: str = "",
        view: MemberView | None = None,
    ) -> None:
        self.s = settings or GossipSettings()
        self.addr = addr
        self.node_id = addr.node
        self.incarnation = incarnation
        self.fingerprint = fingerprint
        self.host = host
        self.rng = rng or random.Random()
        self.seq = 0
        self.view = view or MemberView(Member(addr, incarnation, 0, PeerState.ALIVE.value))
        # Own evidence about the members this node probes, and only those (forgetting is the view's business).
        self.detector = FailureDetector(self.s.suspect_after, self.s.dead_after, math.inf)
        self.news = ReportNews(self.s.interval, self.s.threshold, self.s.settle)
        self.counts: dict[str, int] = {}
        self.leaving = False
        self._content: Content = ({}, {}, False, {}, 0, {})  # models, labels, leaving, prefixes, revocations, wants
        self._prefixes_sent: dict[str, bytes] = {}  # each model's prefix-cache summary as last published
        self._ring_watched: list[str] = []
        self._ring_version = -1
        self._probing: dict[str, float] = {}  # probed member -> when its next ping is due
        self._suspected_at: dict[str, float] = {}  # members suspect here (as acted on): since when
        self._gone_at: dict[str, float] = {}  # dead or left here: since when (forgotten after forget_after)
        self._asked: dict[str, float] = {}  # last time a member was asked for its report
        self._accused: dict[str, float] = {}  # last time a member was told it is held suspect or dead
        self._published: dict[str, tuple[int, int, PeerState]] = {}  # what this node last published of a member
        self._last_tick: float | None = None
        self._last_tick_before = 0.0
        self._repeats: list[float] = []  # when to publish the last refutation once more (`_backoff.REFUTATION`)
        self._last_heard_any = -math.inf
        self._next_sync = 0.0
        self._syncs_without_table = 0  # until a member's table reaches this node, it asks again soon (`FIRST_SYNC`)
        self._ping_seq = 0
        self.in_doubt = False  # a probed member has been silent for half the time to suspicion: tick often
        # Lifeguard's local health: how unwell this node counts itself (0 = well). It rises when this node did not
        # run for a second, was accused itself, or had several probed members unanswered at once, and falls back
        # one step per 5 quiet seconds; silence must last (1 + health) times as long before it suspects anyone.
        self.health = 0
        self._health_at = -math.inf

    # ------------------------------------------------------------ reading

    def state(self, node: str) -> PeerState | None:
        return self.view.state(node)

    def sync_clock(self, wall_ns: int, now: float) -> None:
        """This node's wall clock (ns) read at `now`: what peers' incarnations are bounded by."""
        self.detector.sync_clock(wall_ns, now)

    def incarnation_ok(self, incarnation: int, now: float) -> bool:
        """Whether a peer's incarnation is plausible: not far ahead of this node's clock (`INCARNATION_AHEAD_S`)."""
        return self.detector.incarnation_ok(incarnation, now)

    def probing(self) -> set[str]:
        return set(self._probing)

    def watched(self) -> list[str]:
        """The members this node watches on the ring (it publishes what it finds out about them)."""
        self._refresh_ring()
        return list(self._ring_watched)

    def current_report(self) -> LoadReport:
        """This node's report as last sent (with its seq and every prefix summary), for a member that asks."""
        return self._report(self._content, self.seq)

    def assume_reported(self, now: float, models: dict[str, ModelLoad], labels: dict[str, str], seq: int) -> None:
        """Take report `seq` with this content as already sent and known to the mesh: for a simulation that starts
        from a converged mesh instead of letting every node introduce itself."""
        content: Content = (models, labels, False, {}, 0, {})
        self.seq, self._content = seq, content
        self.news.sent(now, content)
        self.view.put(Member(self.addr, self.incarnation, seq, PeerState.ALIVE.value))

    # ------------------------------------------------------------ own reports

    def report(
        self,
        now: float,
        models: dict[str, ModelLoad],
        labels: dict[str, str],
        leaving: bool = False,
        *,
        force: bool = False,
        legacy_peers: tuple[PeerAddr, ...] | None = None,
        prefixes: dict[str, bytes] | None = None,
        revocations: int = 0,
        wants: dict[str, StageWant] | None = None,
    ) -> LoadReport | None:
        """Publish this node's report if it is news (or `force`); returns it, or None when nothing went out.

        `legacy_peers`: older members are alive, which take silence for failure: report every interval as they do,
        listing the live peers as they expect. `prefixes`: what its prefix caches hold (a change is news; a report
        carries the summaries that changed, `current_report` all). `revocations`: the serial of its revocation list.
        `wants`: the models it would hold a stage of.
        """
        content = (models, labels, leaving, prefixes or {}, revocations, wants or {})
        if not force and legacy_peers is None and not self.news.due(now, content):
            return None
        self.seq += 1
        self._content = content
        self.leaving = leaving
        self.news.sent(now, content)
        state = PeerState.LEFT if leaving else PeerState.ALIVE
        self.view.put(Member(self.addr, self.incarnation, self.seq, state.value))
        r = self._report(content, self.seq, legacy_peers or (), summary_news(content[3], self._prefixes_sent, False))
        self._prefixes_sent = dict(content[3])
        self._count("reports_sent")
        self.host.publish(r)
        return r

    def _report(
        self, content: Content, seq: int, peers: tuple[PeerAddr, ...] = (), prefixes: dict[str, bytes] | None = None
    ) -> LoadReport:
        models, labels, leaving, summaries, revocations, wants = content
        prefixes = summary_news(summaries, {}, True) if prefixes is None else prefixes
        return LoadReport(self.node_id, self.incarnation, seq, self.addr, models, labels, peers, leaving,
                          self.fingerprint, prefixes, wants, revocations, on_change=True)  # fmt: skip

    def _refute(self, now: float, accused_seq: int) -> LoadReport:
        """Someone holds this node suspect or dead as of report `accused_seq`: report again, past it. The
        refutation goes out three times more, 0.1 s apart: a node that missed all four is rare enough for
        anti-entropy."""
        self._count("refutations")
        self._unwell(now, "accused")
        self.seq = max(self.seq, accused_seq)
        models, labels, leaving, prefixes, revocations, wants = self._content
        r = self.report(now, models, labels, leaving, force=True, prefixes=prefixes, revocations=revocations,
                        wants=wants)  # fmt: skip
        assert r is not None
        self._repeats = pauses_from(now, REFUTATION, REFUTATION_REPEATS)
        return r

    # ------------------------------------------------------------ what arrives

    def on_report(self, r: LoadReport, now: float) -> bool:
        """A member's own report (on its PUB, or on the link to it). True when it is newer than what this node
        held, so the caller takes its models, labels and load."""
        if r.node == self.node_id:
            return False
        old = self.view.get(r.node)
        state = PeerState.LEFT if r.leaving else PeerState.ALIVE
        new = Member(r.addr, r.incarnation, r.seq, state.value)
        if old is not None:
            stale = (r.incarnation, r.seq) <= (old.incarnation, old.seq)
            if stale or (r.incarnation == old.incarnation and old.state == PeerState.LEFT):  # left is final
                if r.incarnation == old.incarnation:
                    self.heard(r.node, now)  # a repeat still says it runs
                return False
        self._heard_from(r.node, now)
        before = self.view.state(r.node)
        self.view.set_private(r.node, None)
        self.view.put(new)
        self.view.set_legacy(r.node, not r.on_change)
        if old is None:
            reason = "new"
        elif r.incarnation > old.incarnation:
            reason = "restarted"
        else:
            reason = "left" if r.leaving else "heard"
        if old is not None and r.incarnation > old.incarnation:
            self.detector.forget(r.node)  # a new process: what was seen of the old one is moot
            if r.node in self._probing:
                self.detector.heard(r.node, now)
        self._settle(r.node, before, now, reason, always=reason in ("new", "restarted"))
        if self._next_sync == math.inf:
            self._sync(now)  # a newcomer asks its first member for the table rather than wait for its clock
        return True

    def on_leave(self, node: str, incarnation: int, now: float) -> None:
        old = self.view.get(node)
        if old is None or incarnation < old.incarnation:
            return
        if incarnation == old.incarnation and old.state == PeerState.LEFT:
            return
        before = self.view.state(node)
        self.view.put(Member(old.addr, incarnation, old.seq if incarnation == old.incarnation else 0, "left"))
        self._settle(node, before, now, "left")

    def on_suspicion(self, s: Suspicion, now: float) -> LoadReport | None:
        """A member's watcher says it went quiet (published, or sent here by a node that holds this one suspect).
        Returns this node's refutation when it is the one accused (the caller may answer the sender with it)."""
        if s.node == self.node_id:
            if s.incarnation != self.incarnation or s.seq > self.seq + SEQ_AHEAD:
                return None
            if s.seq >= self.seq:
                return self._refute(now, s.seq)
            return self.current_report()  # already refuted: this report outranks the accusation
        old = self.view.get(s.node)
        if old is None or old.state == PeerState.LEFT or s.seq > old.seq + SEQ_AHEAD:
            return None
        if s.incarnation != old.incarnation:
            if s.incarnation > old.incarnation:
                self._ask(s.node, now)  # it restarted and this node missed it
            return None
        state = PeerState.DEAD if s.dead else PeerState.SUSPECT
        new = Member(old.addr, s.incarnation, s.seq, state.value)
        if not outranks(new, old):
            return None
        before = self.view.state(s.node)
        self.view.put(new)
        if s.seq > old.seq:
            self._ask(s.node, now)  # a report this node missed; if the member is alive it will refute anyway
        self._settle(s.node, before, now, f"{'dead' if s.dead else 'suspected'}, says {s.by}")
        heard = self.detector.last_heard(s.node) if s.node in self._probing else None
        if heard is not None and now - heard < self.s.suspect_after:
            self._accuse_to(s.node, now)  # this node hears it fine: make sure it knows, so it refutes
        return None

    def on_digest(self, d: Digest, now: float, *, asked: bool, trusted: bool = True) -> Digest | None:
        """A member's digest. `asked`: it answers a digest this node sent (so this node may answer once with its own
        table, for what the other lacks). Not `trusted` (its sender is no member here yet, so its name is only a
        claim): it is answered, but what it says is not taken. Returns what to send back to `d.node`, if anything."""
        self._count("digests_in")
        if not d.members:
            count, checksum = self.view.digest()
            if (d.count, d.checksum) == (count, checksum):
                return None
            return self._full_digest()
        if not trusted:
            return None
        theirs = {m.node: m for m in d.members}
        self._syncs_without_table = -1  # a table came: the clock of `sync_every` is enough from now on
        self._reconcile(d.members, now)
        if asked and self._they_lack(theirs):
            return self._full_digest()
        return None

    def _full_digest(self) -> Digest:
        count, checksum = self.view.digest()
        self._count("full_digests_sent")
        return Digest(self.node_id, count, checksum, self.view.members())

    def _reconcile(self, members: Iterable[Member], now: float) -> None:
        for e in members:
            if e.node == self.node_id:
                bad = e.incarnation == self.incarnation and e.state != PeerState.ALIVE
                if bad and self.seq <= e.seq <= self.seq + SEQ_AHEAD:
                    self._refute(now, e.seq)
                continue
            mine = self.view.get(e.node)
            if not self.incarnation_ok(e.incarnation, now):
                continue  # a forgery (or a wrong clock): taken, it would make the member's real reports stale
            if mine is None:
                if e.state in (PeerState.ALIVE, PeerState.SUSPECT):
                    self._count("learned_from_digest")
                    self.host.learn(e.addr, "digest")  # a hint: it is a member here once its own report arrives
                else:
                    self.view.put(e)  # gone already: kept (unlinked) so the tables agree until it is forgotten
                    self._gone_at.setdefault(e.node, now)
                continue
            if not outranks(e, mine) or (e.incarnation == mine.incarnation and e.seq > mine.seq + SEQ_AHEAD):
                continue
            if e.state in (PeerState.ALIVE, PeerState.LEFT) or e.incarnation != mine.incarnation:
                self._ask(e.node, now)  # only the member itself vouches for a report (or its goodbye)
                continue
            if mine.state == PeerState.LEFT:
                continue
            before = self.view.state(e.node)
            self.view.put(Member(mine.addr, e.incarnation, e.seq, e.state))
            if e.seq > mine.seq:
                self._ask(e.node, now)
            self._settle(e.node, before, now, f"{e.state} in a digest")

    def _they_lack(self, theirs: dict[str, Member]) -> bool:
        for m in self.view.members():
            other = theirs.get(m.node)
            if other is None or outranks(m, other):
                return True
        return False

    def heard(self, node: str, now: float) -> None:
        """Any message from `node` itself (a pong, a reply, a hello): proof that it runs."""
        self._heard_from(node, now)
        if self.view.private_state(node) is not None:
            before = self.view.state(node)
            self.view.set_private(node, None)
            self._settle(node, before, now, "heard")
        public = self.view.public_state(node)
        if public is PeerState.DEAD or (public is PeerState.SUSPECT and node in self._probing):
            # Held suspect or dead, yet it runs: tell it, so it refutes for everyone. Its watchers tell it of a
            # suspicion; of a death whoever hears from it does (it was cut off, and nobody watches the dead).
            self._accuse_to(node, now)

    def connection_lost(self, node: str, now: float) -> None:
        """The transport saw the link to `node` close: suspect now (a crashed process). It is probed from the next
        tick on (a member suspected on its own evidence always is), so a blip clears and a silence ends dead."""
        self._own_evidence(node, PeerState.SUSPECT, "connection closed", now)
        if node in self._probing:
            self.detector.connection_lost(node, now, "connection closed")  # recorded above; silence goes on

    def unreachable(self, node: str, now: float) -> None:
        """Reconnecting to `node` was refused (nothing listens at its port any more): dead now."""
        self._own_evidence(node, PeerState.DEAD, "reconnect failed", now)
        if node in self._probing:
            self.detector.unreachable(node, now, "reconnect failed")

    def reconnected(self, node: str, now: float) -> None:
        """The link to `node` is up again (a handshake completed): ping it at once when in doubt."""
        if self.view.state(node) in (PeerState.SUSPECT, PeerState.DEAD):
            self._ping(node)

    # ------------------------------------------------------------ time

    def tick(self, now: float, in_use: Iterable[str] = ()) -> None:
        """Probe, apply silence, time suspicions out, sync, forget. `in_use`: members this node has requests on."""
        stalled = self._last_tick is not None and now - self._last_tick > self.s.suspect_after / 2
        self._last_tick_before = self._last_tick if self._last_tick is not None else now
        self._last_tick = now
        self._refresh_ring()
        wanted = set(self._ring_watched)
        wanted.update(n for n in in_use if n in self.view)
        wanted.update(n for n in self._suspected_at if self.view.private_state(n) is not None)
        wanted = {n for n in wanted if self.view.state(n) in (PeerState.ALIVE, PeerState.SUSPECT)}
        for node in list(self._probing):
            if node not in wanted:
                del self._probing[node]
                self.detector.forget(node)
        for node in wanted:
            if node not in self._probing:
                self._probing[node] = now
                self.detector.heard(node, now)  # the silence clock starts now
        if stalled:
            # This node did not run for a while (a stop, a starved CPU): it saw nothing, so it has no evidence of
            # anyone's silence. Restart the clocks rather than accuse everyone it probes.
            if now - self._last_tick_before >= self.s.suspect_after:
                self._unwell(now, "late")
            for node in self._probing:
                self.detector.forget(node)
                self.detector.heard(node, now)
        elif self.health and now - self._health_at >= HEALTH_RECOVERS_S:
            self._set_health(self.health - 1, now)
        every = self.s.probe_every
        # In doubt: a probe went unanswered (silence past one probe period and a bit).
        doubt_after = min(1.2 * every, 0.75 * self.s.suspect_after)
        doubts = 0
        for node, due in list(self._probing.items()):
            doubt = now - (self.detector.last_heard(node) or now) >= doubt_after
            doubts += doubt
            if now >= due or (doubt and now >= due - every * 3 / 4):
                self._probe(node, now, doubt)
        self.in_doubt = doubts > 0 or bool(self._repeats)  # (a refutation to repeat also wants the fine clock)
        if doubts >= 2:
            self._unwell(now, "doubts")  # several members unanswered at once: more likely this node than them
        for t in self.detector.tick(now):
            if t.new is PeerState.SUSPECT or t.new is PeerState.DEAD:
                self._own_evidence(t.node, t.new, t.reason, now)
        if self._repeats and now >= self._repeats[0]:
            del self._repeats[0]
            self._count("reports_repeated")
            self.host.publish(self.current_report())
        self._time_out_suspicions(now)
        self._forget(now)
        if now >= self._next_sync:
            self._sync(now)

    def _probe(self, node: str, now: float, doubt: bool = False) -> None:
        # A member that did not answer a probe is probed four times as often (`in_doubt` asks the caller to tick
        # often meanwhile), so one or two lost messages never make a suspicion: it takes every probe of the last
        # half second lost, or a member that is gone.
        self._probing[node] = now + self.s.probe_every
        if doubt:
            self._count("probes_in_doubt")
        self._ping(node)

    def _ping(self, node: str) -> None:
        self._ping_seq += 1
        self._count("probes_sent")
        self.host.send(node, Ping(f"w{self._ping_seq}", self.node_id))

    def _time_out_suspicions(self, now: float) -> None:
        wait = (self.s.dead_after - self.s.suspect_after) * (1 + self.health)
        for node, since in list(self._suspected_at.items()):
            if now - since < wait or self.view.state(node) is not PeerState.SUSPECT:
                continue
            m = self.view.get(node)
            if m is None:
                continue
            before = self.view.state(node)
            if self.view.public_state(node) is PeerState.SUSPECT:
                self.view.put(Member(m.addr, m.incarnation, m.seq, PeerState.DEAD.value))
            else:
                self.view.set_private(node, PeerState.DEAD)
            self._settle(node, before, now, f"suspect for {now - since:.1f}s")

    def _forget(self, now: float) -> None:
        for node, since in list(self._gone_at.items()):
            if now - since >= self.s.forget_after:
                state = self.view.state(node)
                self.view.remove(node)
                del self._gone_at[node]
                self._suspected_at.pop(node, None)
                self._asked.pop(node, None)
                self._accused.pop(node, None)
                self._published.pop(node, None)
                if state is not None:
                    self.host.changed(Transition(node, state, state, FORGOTTEN))

    def _sync(self, now: float) -> None:
        jitter = self.rng.uniform(0.9, 1.1)
        self._next_sync = now + self.s.sync_every * jitter
        partner = self.view.random_member(self.rng)
        if partner is None:
            self._next_sync = math.inf  # alone so far: the first member's own report syncs at once (`on_report`)
            return
        if self._syncs_without_table >= 0:  # a newcomer: the digest or the table coming back may have been lost
            self._syncs_without_table += 1
            pause = FIRST_SYNC.delay(self._syncs_without_table)
            self._next_sync = min(self._next_sync, now + pause)
            if pause >= FIRST_SYNC.cap:  # (a table equal to its partner's is never sent: none may ever come)
                self._syncs_without_table = -1
        count, checksum = self.view.digest()
        self._count("digests_sent")
        self.host.send(partner, Digest(self.node_id, count, checksum))

    # ------------------------------------------------------------ evidence and states

    def _own_evidence(self, node: str, state: PeerState, reason: str, now: float) -> None:
        """This node found `node` suspect or dead itself. Published when it watches `node` on the ring and hears
        from someone (a node cut off from all keeps it to itself), even when the news reached it already from
        another watcher: each watcher's word is one more chance for every node to hear it. Private otherwise."""
        m = self.view.get(node)
        if m is None:
            return
        before = self.view.state(node)
        isolated = now - self._last_heard_any >= self.s.suspect_after
        if node in self._ring_watched and not isolated:
            new = Member(m.addr, m.incarnation, m.seq, state.value)
            if outranks(new, m):
                self.view.put(new)
            said = (m.incarnation, m.seq, state)
            if self._published.get(node) != said:
                self._published[node] = said
                self._count("suspicions_sent")
                self.host.publish(Suspicion(node, m.incarnation, m.seq, self.node_id, state is PeerState.DEAD))
        elif RANK[state] > RANK[before or PeerState.ALIVE]:
            self.view.set_private(node, state)
        self._settle(node, before, now, reason)

    def _settle(self, node: str, before: PeerState | None, now: float, reason: str, always: bool = False) -> None:
        """Bookkeeping after a member's records changed: timers, and telling the host when what it acts on did."""
        after = self.view.state(node)
        if after is None:
            return
        if after is PeerState.SUSPECT:
            self._suspected_at.setdefault(node, now)
        else:
            self._suspected_at.pop(node, None)
        if after in (PeerState.DEAD, PeerState.LEFT):
            self._gone_at.setdefault(node, now)
        else:
            self._gone_at.pop(node, None)
        if after is not before or always:
            self.host.changed(Transition(node, before, after, reason))

    def _heard_from(self, node: str, now: float) -> None:
        self._last_heard_any = now
        if node in self._probing:
            self.detector.heard(node, now)  # what it says (alive again) is acted on by the caller

    def _accuse_to(self, node: str, now: float) -> None:
        """Tell `node` itself that it is held suspect or dead (at most once a second): it refutes."""
        if now - self._accused.get(node, -math.inf) < 4 * self.s.interval:
            return
        m = self.view.get(node)
        if m is None:
            return
        self._accused[node] = now
        self._count("accusations_forwarded")
        self.host.send(node, Suspicion(node, m.incarnation, m.seq, self.node_id, m.state == PeerState.DEAD))

    def _ask(self, node: str, now: float) -> None:
        """Ask `node` for its report (at most once a second)."""
        if now - self._asked.get(node, -math.inf) < 4 * self.s.interval:
            return
        self._asked[node] = now
        self._count("reports_pulled")
        self.host.pull(node)

    def _unwell(self, now: float, why: str) -> None:
        """Evidence that this node's own view is unreliable (it ran late, was accused, several members it probes
        went quiet at once): one step more patient, at most one step a second."""
        self._count(f"unwell_{why}")
        if now - self._health_at >= 1.0 and self.health < HEALTH_MAX:
            self._set_health(self.health + 1, now)
        elif self.health:
            self._health_at = now  # still unwell: the quiet time before it recovers starts again

    def _set_health(self, health: int, now: float) -> None:
        self.health, self._health_at = health, now
        self.detector.suspect_after = self.s.suspect_after * (1 + health)
        self.detector.dead_after = self.s.dead_after * (1 + health)

    def _refresh_ring(self) -> None:
        if self._ring_version != self.view.ring_version:
            self._ring_version = self.view.ring_version
            self._ring_watched = self.view.watched(self.s.watchers)

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def stats(self) -> dict[str, Any]:
        return dict(self.counts) | {"health": self.health}
