"""How busy this verifier is, what tree budget it suggests to edges because of it, and how long
a batch may wait for blocks that are about to arrive.

The meter counts the sessions active on this worker: those whose last block came within a
couple of their own round intervals. Batch size alone under-counts when blocks trickle in,
and queue depth alone only sees overload; the number of live sessions is what a steady state
of batches will contain.

Why hold a batch at all: a target forward costs about the same for 1 or 4 sessions' trees
(DESIGN section 7), but once the sessions fall out of phase (one edge's verdict came back in
an earlier forward than another's) a greedy scheduler verifies them in alternating half-full
forwards forever. Knowing each session's round interval, the worker can tell that a block is
due within a fraction of a forward and wait for it; one such wait puts the sessions back in
phase, after which their blocks arrive together and the waits are short."""

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
    interval_s: float = 1.0  # EMA of a session's time between blocks, over all sessions
    verify_s: float = 0.0  # EMA of a batch forward's time
    alpha: float = 0.2
    queued: int = 0  # blocks left waiting after the last batch was taken
    _last: dict[str, float] = field(default_factory=dict)
    _ival: dict[str, float] = field(default_factory=dict)  # per session interval EMA

    def observe(self, sids: list[str], queued: int, now: float) -> None:
        """A batch of these sessions was taken at `now`, with `queued` blocks left waiting."""
        for sid in sids:
            prev = self._last.get(sid)
            if prev is not None and now - prev < 60.0:
                gap = now - prev
                self.interval_s += self.alpha * (gap - self.interval_s)
                old = self._ival.get(sid)
                self._ival[sid] = gap if old is None else old + 0.5 * (gap - old)
            self._last[sid] = now
        self.queued = queued
        horizon = now - 4 * self.interval_s - 1.0
        for sid in [s for s, t in self._last.items() if t < horizon]:
            self.forget(sid)

    def observe_verify(self, seconds: float) -> None:
        self.verify_s = seconds if not self.verify_s else (
            self.verify_s + self.alpha * (seconds - self.verify_s))

    def active(self, now: float, batch: int = 0) -> int:
        """Sessions seen within two round intervals; at least the batch at hand plus the
        blocks waiting behind it (a burst of new sessions counts before it is seen twice)."""
        recent = sum(1 for t in self._last.values() if now - t <= 2 * self.interval_s + 0.05)
        return max(recent, batch + self.queued)

    def budget(self, now: float, batch: int = 0) -> int:
        return suggest_budget(self.active(now, batch), self.policy)

    def hold_until(self, now: float, in_hand: set[str], factor: float,
                   slack: float = 0.02) -> float | None:
        """When to stop waiting for more blocks: the latest expected arrival among sessions
        not in hand that are due within `factor` forwards from now (late ones are not waited
        for). None: nothing worth waiting for."""
        if factor <= 0 or not self.verify_s:
            return None
        horizon = now + factor * self.verify_s
        due = [t + self._ival[s] for s, t in self._last.items()
               if s not in in_hand and s in self._ival]
        due = [d for d in due if now - slack <= d <= horizon]
        return min(horizon, max(due) + slack) if due else None

    def forget(self, sid: str) -> None:
        self._last.pop(sid, None)
        self._ival.pop(sid, None)
