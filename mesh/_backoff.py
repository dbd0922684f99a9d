"""Every backoff of the mesh, described once: the pauses before asking again after refusals or silence.

Each is a `Backoff`: `first` seconds, times `factor` per round, never more than `cap`. ARCHITECTURE.md quotes the
schedules as `describe()` prints them (a test holds them equal).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """A pause that grows by `factor` each round, from `first` up to `cap` (seconds)."""

    first: float
    factor: float
    cap: float

    def delay(self, round_: int) -> float:
        """The pause before try round `round_` + 1 (round 1: the first pause)."""
        return min(self.first * self.factor ** max(round_ - 1, 0), self.cap)

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


def backoff_schedules() -> dict[str, str]:
    """Each schedule as ARCHITECTURE.md quotes it (until it reaches its cap)."""
    return {
        "entry": ENTRY.describe(ENTRY_ROUNDS),
        "client declined": CLIENT_DECLINED.describe(6),
        "client unavailable": CLIENT_UNAVAILABLE.describe(5),
    }
