"""Sessions drafting at once on one edge share packed draft forwards, and draft exactly the
trees they would draft alone."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from specedge.config import TreeShape
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.drafter import Drafter, TreeBuilder
from specedge.execution import PackedRunner


def test_concurrent_drafting_is_packed_and_identical(tiny_pair):
    _, draft = tiny_pair
    rng = random.Random(4)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 30))] for _ in range(6)]
    shape = TreeShape(budget=10, depth=5, width=2, topk=2)
    alone = [TreeBuilder(Drafter(PackedRunner(draft)), p, shape).run() for p in prompts]
    shared = CoalescingRunner(PackedRunner(draft), window_s=0.01)
    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(lambda p: TreeBuilder(Drafter(shared), p, shape).run(), prompts))
    for a, b in zip(alone, together, strict=True):
        assert (a.tokens, a.parents, a.depths) == (b.tokens, b.parents, b.depths)
    assert shared.forwards < shared.requests / 2, (shared.forwards, shared.requests)


async def test_coalesced_edges_stay_lossless(nats_server, tiny_pair):
    from specedge.edge.proactive import Mode
    from tests.stack import generate, reference_greedy, running_worker
    from tests.test_e2e_tiny import prompts

    target, draft = tiny_pair
    ps = prompts(4, seed=11)
    async with running_worker(target, nats_server.url):
        res = await generate(nats_server.url, draft, ps, max_new_tokens=24, coalesce=True,
                             proactive=Mode.MULTI)
    for p, r in zip(ps, res, strict=True):
        assert r.token_ids == reference_greedy(target, p, 24)
