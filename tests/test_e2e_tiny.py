"""End to end through a real nats-server: edge sessions, one verifier, tiny float64 models.
Greedy output must equal the target's own generate(), token for token."""

from __future__ import annotations

import asyncio
import random

import pytest

from specedge.config import TreeShape
from tests.stack import generate, reference_greedy, running_worker, wait_queued

pytestmark = pytest.mark.asyncio


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(1, 40))] for _ in range(n)]


async def test_lossless_greedy_concurrent(nats_server, tiny_pair):
    target, draft = tiny_pair
    ps = prompts(20)
    results, sizes = [], []
    for i in range(0, 20, 5):  # 4 waves of 5 concurrent sessions of different lengths
        # Start the worker once the wave's first blocks are queued, so they share a batch.
        gen = asyncio.create_task(generate(nats_server.url, draft, ps[i:i + 5], max_new_tokens=24))
        await wait_queued(nats_server.url, 5)
        async with running_worker(target, nats_server.url, max_batch=8) as w:
            results += await gen
        sizes += w.stats.batch_sizes
    for p, r in zip(ps, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 24)
    assert max(sizes) >= 3, "concurrent sessions should share verifier batches"
    assert sum(len(r.token_ids) for r in results) / sum(len(r.rounds) for r in results) > 1.2


@pytest.mark.parametrize("shape", [TreeShape.chain(4), TreeShape(budget=16, depth=5, width=4, topk=3)])
async def test_lossless_shapes_and_eos(nats_server, tiny_pair, shape):
    target, draft = tiny_pair
    ps = prompts(4, seed=7)
    eos = (reference_greedy(target, ps[0], 12)[5],)  # a token the target really emits
    async with running_worker(target, nats_server.url):
        results = await generate(nats_server.url, draft, ps, max_new_tokens=30, shape=shape,
                                 eos_ids=eos)
    for p, r in zip(ps, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 30, eos)
    assert results[0].token_ids[-1] == eos[0] and len(results[0].token_ids) <= 6
