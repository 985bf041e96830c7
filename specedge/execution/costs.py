"""What a forward costs against the tokens in it, measured on this machine: the numbers
behind the verifier's budget hints (the knee) and the prefill chunks of both sides."""

from __future__ import annotations

import time

from specedge.devices import synchronize
from specedge.execution.plan import Segment
from specedge.execution.runner import PackedRunner

# forward sizes measured at start-up (and the buckets of costmodel.CostModel)
SIZES = (1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class Probe:
    """Times forwards of n new tokens over a fixed scratch context (device-synchronised: on a
    GPU an unsynchronised clock measures launch queueing). The context's KV is built on the
    first timing and held only until release(): between probes the sessions have the whole
    pool. Runs on the thread that runs the runner's forwards."""

    def __init__(self, runner: PackedRunner, context: int = 128):
        self.runner = runner
        pool = runner.pool
        if pool.fixed:  # measure inside what the pool can hold (it is empty at start-up)
            context = min(context, pool.free_blocks * pool.block_size // 2)
        self.context = max(1, context)
        self.seq = None

    def fits(self, n: int) -> bool:
        pool = self.runner.pool
        if not pool.fixed:
            return True
        if self.seq is None:
            return -(-(self.context + n) // pool.block_size) <= pool.free_blocks
        return self.seq.blocks_needed(self.context + n) <= pool.free_blocks

    def time(self, n: int) -> float:
        """Seconds of one forward of n new tokens (the context built first if released)."""
        r = self.runner
        if self.seq is None:
            self.seq = r.new_seq()
            r.forward([Segment.chain(self.seq, [i % r.vocab_size for i in range(self.context)])])
        self.seq.truncate(self.context)
        seg = Segment.chain(self.seq, [1] * n)
        synchronize(r.device)
        t0 = time.perf_counter()
        r.forward([seg])
        synchronize(r.device)
        took = time.perf_counter() - t0
        self.seq.truncate(self.context)
        return took

    def release(self) -> None:
        """Give the context's KV back to the pool (the next timing rebuilds it)."""
        if self.seq is not None:
            self.seq.free()
            self.seq = None

    close = release


def forward_costs(runner: PackedRunner, sizes: tuple[int, ...] = SIZES,
                  context: int = 128, stop_ratio: float = 3.0,
                  probe: Probe | None = None) -> dict[int, float]:
    """Seconds of one forward of n new tokens over `context` cached ones (the best of two),
    for growing n; stops once a forward costs stop_ratio times the single-token one (past
    the knee). With `probe`, measured through it (its context released at the end)."""
    probe = probe or Probe(runner, context)
    try:
        sizes = tuple(n for n in sizes if probe.fits(n)) or (1,)
        costs: dict[int, float] = {}
        for n in sizes:
            costs[n] = min(probe.time(n), probe.time(n))
            if costs[n] > stop_ratio * costs[sizes[0]]:
                break
    finally:
        probe.release()
    return costs


def knee(costs: dict[int, float], ratio: float = 1.5) -> int:
    """The most tokens a forward takes for at most `ratio` times the cost of one token: where
    verifying more tokens stops being nearly free."""
    base = costs[min(costs)]
    return max(n for n, c in costs.items() if c <= ratio * base)


def prefill_chunk(costs: dict[int, float], ratio: float = 2.5, least: int = 32) -> int:
    """Tokens a session catching up may add to one forward: the most the forward takes for at
    most `ratio` times the cost of one token, so that a long prompt's prefill costs the
    sessions sharing its forwards about one such forward per round (at least `least`)."""
    return max(least, knee(costs, ratio))
