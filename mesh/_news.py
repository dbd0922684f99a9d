"""When a node's own report is news (`ReportNews`): pure, told the report's content and the time."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Content", "ReportNews"]

# models, labels, leaving, then what reports gained later (prefix-cache summaries, the revocation serial, wants)
Content = tuple[Any, ...]


class ReportNews:
    """Whether a node's own report is news: pure, told the current content and the time.

    News at once: the models served, a model's capacity, version or labels changed, the node is leaving; a model's
    load (in flight + queued) moved by at least `threshold` of its capacity (at least one request); its measured
    rate doubled or halved (a coarse, noisy measure: what routing needs of it is which node is several times
    faster; smaller drifts are not news at all). A smaller load difference is news once it has lasted `settle`
    seconds, so what peers hold converges on the truth within seconds. Never twice within `interval`. A field a
    report gains later (prefix-cache summaries, the revocation serial) is news whenever it differs, unless it is
    given a threshold here.
    """

    def __init__(self, interval: float, threshold: float, settle: float) -> None:
        self.interval = interval
        self.threshold = threshold
        self.settle = settle
        self._sent: Content | None = None
        self._sent_at = -math.inf
        self._differs_since: float | None = None

    def due(self, now: float, content: Content) -> bool:
        if now - self._sent_at < self.interval:
            return False
        if self._sent is None:
            return True
        change = self._change(content, self._sent)
        if change == "none":
            self._differs_since = None
            return False
        if change == "big":
            return True
        if self._differs_since is None:
            self._differs_since = now
        return now - self._differs_since >= self.settle

    def sent(self, now: float, content: Content) -> None:
        self._sent, self._sent_at, self._differs_since = content, now, None

    def _change(self, new: Content, old: Content) -> str:
        """ "big", "small" (a load difference below the threshold) or "none"."""
        models, labels, leaving = new[:3]
        old_models, old_labels, old_leaving = old[:3]
        if leaving != old_leaving or labels != old_labels or models.keys() != old_models.keys() or new[3:] != old[3:]:
            return "big"
        change = "none"
        for name, m in models.items():
            o = old_models[name]
            if (m.capacity, m.version) != (o.capacity, o.version):
                return "big"
            moved = abs((m.inflight + m.queued) - (o.inflight + o.queued))
            if moved >= max(1.0, self.threshold * m.capacity):
                return "big"
            if (m.rate > 0) != (o.rate > 0) or (m.rate > 0 and max(m.rate, o.rate) >= 2 * min(m.rate, o.rate)):
                return "big"
            if moved:
                change = "small"
        return change
