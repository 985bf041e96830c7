"""What a forward costs against the tokens in it, measured on this machine: the numbers
behind the verifier's budget hints (the knee) and the prefill chunks of both sides."""

from __future__ import annotations

import time

from specedge.devices import synchronize
from specedge.execution.plan import Segment
from specedge.execution.runner import PackedRunner


def forward_costs(runner: PackedRunner, sizes: tuple[int, ...] = (1, 8, 16, 24, 32, 48, 64, 96,
                                                                  128, 192, 256, 384, 512),
                  context: int = 128, stop_ratio: float = 3.0) -> dict[int, float]:
    """Seconds of one forward of n new tokens over `context` cached ones, for growing n
    (device-synchronised: on a GPU an unsynchronised clock measures launch queueing); stops
    once a forward costs stop_ratio times the single-token one (past the knee)."""
    pool = runner.pool
    if pool.fixed:  # measure inside what the pool can hold (it is empty at start-up)
        room = pool.free_blocks * pool.block_size
        context = min(context, room // 2)
        sizes = tuple(n for n in sizes if context + n <= room) or (1,)
    seq = runner.new_seq()
    ctx = [i % runner.vocab_size for i in range(max(1, context))]
    context = len(ctx)
    try:
        runner.forward([Segment.chain(seq, ctx)])
        costs: dict[int, float] = {}
        for n in sizes:
            best = float("inf")
            for _ in range(2):
                seq.truncate(context)
                seg = Segment.chain(seq, [1] * n)
                synchronize(runner.device)
                t0 = time.perf_counter()
                runner.forward([seg])
                synchronize(runner.device)
                best = min(best, time.perf_counter() - t0)
            costs[n] = best
            if best > stop_ratio * costs[sizes[0]]:
                break
    finally:
        seq.free()
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
    base = costs[min(costs)]
    return max(least, max(n for n, c in costs.items() if c <= ratio * base))
