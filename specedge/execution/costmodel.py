"""What a forward costs on this machine now: the start-up measurement (costs.forward_costs) as a
prior, updated from the forwards actually run, so that a verifier started on a busy machine
does not keep a collapsed knee for its whole life.

Costs are kept per size bucket (the start-up grid); an observed forward of n tokens counts for
the largest bucket <= n (a conservative reading: its cost is charged to fewer tokens). Each
bucket's estimate is the (lower) median of its last few samples, the start-up one included: one
spike moves it little, and once samples of a new regime (a load gone, or come) are the
majority of the window, the estimate is a sample of that regime.

Real forwards only show the sizes the current budget leads to: once the knee collapsed, the
sizes above it are never run again. So the model also names a probe now and then, a bucket
just above the knee (or the prefill chunk, or the base) whose estimate no recent sample
supports; the worker times one forward of that size when it has nothing else to do."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from specedge.execution.costs import SIZES, knee, prefill_chunk


@dataclass
class _Bucket:
    samples: deque[float]
    fresh: int = 0  # samples seen since the start-up one
    last: int = -1  # the model's observation count at its last sample (-1: none)

    def estimate(self) -> float:
        # the lower median: timing noise only ever adds (a neighbour, a page fault), so of
        # two middle samples the smaller is the better reading
        return sorted(self.samples)[(len(self.samples) - 1) // 2]


@dataclass
class CostModel:
    """Seconds per forward against its tokens: knee() and prefill_chunk() as in costs.py, from
    estimates that follow the forwards observed."""

    prior: dict[int, float]  # the start-up costs (forward_costs)
    sizes: tuple[int, ...] = SIZES  # the bucket grid (probes run these sizes)
    window: int = 5  # samples per bucket's median
    stale_after: int = 64  # observations after which a bucket's last sample is old
    _buckets: dict[int, _Bucket] = field(default_factory=dict, repr=False)
    observations: int = 0

    def __post_init__(self) -> None:
        self.sizes = tuple(sorted(set(self.sizes) | set(self.prior)))
        for n, c in self.prior.items():
            self._buckets[n] = _Bucket(deque([c], maxlen=self.window))

    def bucket_of(self, tokens: int) -> int:
        """The largest grid size <= tokens (the smallest size for fewer)."""
        below = [n for n in self.sizes if n <= tokens]
        return below[-1] if below else self.sizes[0]

    def observe(self, tokens: int, seconds: float) -> None:
        """A forward of `tokens` new tokens took `seconds` (device-synchronised)."""
        if tokens <= 0 or not seconds > 0:
            return
        n = self.bucket_of(tokens)
        b = self._buckets.get(n)
        if b is None:
            b = self._buckets[n] = _Bucket(deque(maxlen=self.window))
        b.samples.append(seconds)
        b.fresh += 1
        b.last = self.observations
        self.observations += 1

    def costs(self) -> dict[int, float]:
        """The current estimate per bucket (the shape costs.py's functions read): those
        measured at start-up, and others once seen twice (one long prompt's forward alone
        does not move the knee)."""
        return {n: b.estimate() for n, b in sorted(self._buckets.items())
                if b.samples and (n in self.prior or len(b.samples) >= 2)}

    def knee(self) -> int:
        return knee(self.costs())

    def prefill_chunk(self) -> int:
        return prefill_chunk(self.costs())

    def _supported(self, n: int) -> bool:
        """Whether recent samples back this bucket's estimate: three of them, so that neither
        the prior nor one spike among them decides its median."""
        b = self._buckets.get(n)
        if b is None or b.fresh < min(3, self.window):
            return False
        return self.observations - b.last <= self.stale_after

    def _above(self, n: int) -> int | None:
        up = [s for s in self.sizes if s > n]
        return up[0] if up else None

    def probe(self, knee_: bool = True, chunk: bool = True) -> int | None:
        """A size worth one timed forward: the base, or the bucket just above the knee or the
        prefill chunk (those the caller follows), when no recent samples support its
        estimate. None: nothing to probe."""
        costs = self.costs()
        if not costs:
            return self.sizes[0]
        wanted = [min(costs)]
        if knee_:
            wanted.append(self._above(knee(costs)))
        if chunk:
            wanted.append(self._above(prefill_chunk(costs, least=1)))
        for n in wanted:
            if n is not None and not self._supported(n):
                return n
        return None
