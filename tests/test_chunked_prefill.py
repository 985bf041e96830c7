"""Long prompts are prefilled in chunks on the verifier: a session catching up adds at most one
chunk to each forward it shares with others, gets no verdict until it has caught up, and its
output is still the target's own. A session closed mid-prefill stops costing anything."""

from __future__ import annotations

import asyncio
import random

from specedge.config import TreeShape
from tests.stack import generate, reference_greedy, running_worker

CHUNK = 48


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def record_forwards(worker) -> list[list[int]]:
    """Tokens per segment of every forward the worker's engine runs."""
    seen: list[list[int]] = []
    runner = worker.engine.runner
    inner = runner.forward_flat

    def spy(segments):
        seen.append([len(s.tokens) for s in segments])
        return inner(segments)

    runner.forward_flat = spy
    return seen


async def test_long_prompt_joins_running_sessions_in_chunks(nats_server, tiny_pair):
    target, draft = tiny_pair
    shape = TreeShape(budget=6, depth=4, width=2, topk=2)
    short = [prompt(8, i) for i in range(4)]
    long = prompt(400, 99)
    # probe_every=0: the cost model's idle probes are scratch forwards of any size
    async with running_worker(target, nats_server.url, prefill_chunk=CHUNK,
                              max_batch=8, probe_every=0) as w:
        forwards = record_forwards(w)
        running = asyncio.create_task(generate(nats_server.url, draft, short, max_new_tokens=40,
                                               shape=shape))
        await asyncio.sleep(0.3)  # the four are under way when the long one arrives
        (late,) = await generate(nats_server.url, draft, [long], max_new_tokens=16, shape=shape)
        results = await running
    for p, r in zip(short, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 40)
    assert late.token_ids == reference_greedy(target, long, 16)
    # 399 tokens the cache lacked (all but the root) in chunks of 48, then the verdict round
    assert w.stats.prefill_chunks == 399 // CHUNK
    assert max(max(f) for f in forwards) <= CHUNK + 1 + shape.budget
    shared = [CHUNK in f and len(f) > 1 for f in forwards]
    assert any(shared), "the chunks should share forwards with the running sessions"
    # ... every other forward at most: a running session pays for one chunk per round
    assert not any(a and b for a, b in zip(shared, shared[1:], strict=False))


async def test_session_closed_mid_prefill_stops_its_chunks(nats_server, tiny_pair):
    target, draft = tiny_pair
    async with running_worker(target, nats_server.url, prefill_chunk=16, probe_every=0) as w:
        forwards = record_forwards(w)
        task = asyncio.create_task(generate(nats_server.url, draft, [prompt(900, 7)],
                                            max_new_tokens=8, prefill_chunk=4096))
        for _ in range(400):  # wait until the verifier is prefilling it
            await asyncio.sleep(0.05)
            if w.stats.prefill_chunks >= 3:
                break
        assert w.stats.prefill_chunks >= 3
        task.cancel()  # the edge gives up: its session is closed
        try:
            await task
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(1.0)
        done = w.stats.prefill_chunks
        await asyncio.sleep(1.0)
        assert w.stats.prefill_chunks == done < 900 // 16 - 5
        assert w.stats.blocks == 0  # no verdict was made for it
    assert len(forwards) == done
