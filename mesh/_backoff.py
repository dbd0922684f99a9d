"""Every backoff of the mesh, described once: the pauses before asking again after refusals or silence.

Each is a `Backoff`: `first` seconds, times `factor` per round, never more than `cap`. ARCHITECTURE.md quotes the
schedules as `describe()` prints them (a test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """A pause that grows by `factor` each round, from `first` up to `cap` (seconds), after `steady` more rounds at
    `first`."""

    first: float
    factor: float
    cap: float
    steady: int = 0

    def delay(self, round_: int) -> float:
        """The pause before try round `round_` + 1 (round 1: the first pause)."""
        grown = min(max(round_ - 1 - self.steady, 0), 64)  # (no overflow, however late)
        return min(self.first * self.factor**grown, self.cap)

    def describe(self, rounds: int) -> str:
        """The first `rounds` pauses in milliseconds, e.g. "20, 80, 100 ms"."""
        return ", ".join(f"{self.delay(r) * 1000:g}" for r in range(1, rounds + 1)) + " ms"


# An entry node whose every eligible node refused the request (or is out of reach) pauses, then tries them all
# again, ENTRY_ROUNDS times before answering OVERLOADED or UNAVAILABLE.
ENTRY = Backoff(first=0.02, factor=4.0, cap=0.1)
ENTRY_ROUNDS = 3
# A client whose node declined a call (Reject, OVERLOADED) tries the next node after this pause, per node declined.
CLIENT_DECLINED = Backoff(first=0.005, factor=2.0, cap=0.1)
# A client whose every reachable node answered UNAVAILABLE (stopping, no live server) asks them all again after this.
CLIENT_UNAVAILABLE = Backoff(first=0.05, factor=2.0, cap=0.5)
# A node says hello again to a peer it learned (mDNS, a digest, a hello) until that peer's first report arrives: a
# hello is dropped while the link still connects, or lost, and each one missed delays the whole mesh seeing a newcomer.
# The first four pauses are even: the pairs of a mesh of n that lose k in a row grow as log n, and evenly spaced
# retries keep the time the last pair takes growing so too.
HELLO = Backoff(first=0.1, factor=2.0, cap=0.5, steady=3)
# A node held suspect or dead publishes a refutation (a new report), then publishes it again after these pauses: on a
# lossy network each copy is one more chance for every node to hear it before anti-entropy (2 s) would tell them.
# Evenly spaced: the copies a mesh of n needs grow as log n, and so, evenly spaced, does the time they take.
REFUTATION = Backoff(first=0.1, factor=1.0, cap=0.1)
REFUTATION_REPEATS = 3
# A node that joined asks a member for the membership table (a digest) and again after these pauses until a table
# comes back (the digest or the answer may be lost), then every `sync_every` (2 s) as every node does.
FIRST_SYNC = Backoff(first=0.25, factor=2.0, cap=2.0)


def pauses_from(now: float, backoff: Backoff, rounds: int) -> list[float]:
    """The times of `rounds` tries after one at `now`, `backoff` apart."""
    times, at = [], now
    for r in range(1, rounds + 1):
        at += backoff.delay(r)
        times.append(at)
    return times


def backoff_schedules() -> dict[str, str]:
    """Each schedule as ARCHITECTURE.md quotes it (until it reaches its cap)."""
    return {
        "entry": ENTRY.describe(ENTRY_ROUNDS),
        "client declined": CLIENT_DECLINED.describe(6),
        "client unavailable": CLIENT_UNAVAILABLE.describe(5),
        "hello": HELLO.describe(7),
        "refutation repeated": REFUTATION.describe(REFUTATION_REPEATS),
        "first sync": FIRST_SYNC.describe(4),
    }
