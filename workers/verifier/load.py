"""How busy this verifier is, and the tree budget it suggests to edges because of it.

The meter counts the sessions that are active on this worker: those whose last block came
within a couple of their own round intervals. Batch size alone under-counts when edges are
slow to draft (their blocks trickle in) and queue depth alone only sees overload; the number
of live sessions is what a steady state of batches will contain."""

from __future__ import annotations

from dataclasses import dataclass, field

from specedge.config import AdaptiveBudget


def suggest_budget(active: int, policy: AdaptiveBudget) -> int:
    """Tree nodes per session that fill a batch of `policy.batch_tokens` (root included)."""
    if not policy.enabled:
        return 0
    per_session = policy.batch_tokens / max(1, active)
    return int(min(policy.hi, max(policy.lo, round(per_session) - 1)))


@dataclass
class LoadMeter:
    policy: AdaptiveBudget = field(default_factory=AdaptiveBudget)
    interval_s: float = 1.0  # EMA of a session's time between blocks
    alpha: float = 0.2
    queued: int = 0  # blocks left waiting after the last batch was taken
    _last: dict[str, float] = field(default_factory=dict)

    def observe(self, sids: list[str], queued: int, now: float) -> None:
        """A batch of these sessions was taken at `now`, with `queued` blocks left waiting."""
        for sid in sids:
            prev = self._last.get(sid)
            if prev is not None and now - prev < 60.0:
                self.interval_s += self.alpha * ((now - prev) - self.interval_s)
            self._last[sid] = now
        self.queued = queued
        horizon = now - 4 * self.interval_s - 1.0
        for sid in [s for s, t in self._last.items() if t < horizon]:
            del self._last[sid]

    def active(self, now: float, batch: int = 0) -> int:
        """Sessions seen within two round intervals; at least the batch at hand plus the
        blocks waiting behind it (a burst of new sessions counts before it is seen twice)."""
        recent = sum(1 for t in self._last.values() if now - t <= 2 * self.interval_s + 0.05)
        return max(recent, batch + self.queued)

    def budget(self, now: float, batch: int = 0) -> int:
        return suggest_budget(self.active(now, batch), self.policy)

    def forget(self, sid: str) -> None:
        self._last.pop(sid, None)
