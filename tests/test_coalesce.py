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
    shared = CoalescingRunner(PackedRunner(draft))
    with ThreadPoolExecutor(len(prompts)) as ex:
        together = list(ex.map(lambda p: TreeBuilder(Drafter(shared), p, shape).run(), prompts))
    for a, b in zip(alone, together, strict=True):
        assert (a.tokens, a.parents, a.depths) == (b.tokens, b.parents, b.depths)
    assert shared.forwards < shared.requests / 2, (shared.forwards, shared.requests)


def test_a_lone_session_never_waits(tiny_pair):
    """No fixed wait per draft forward: with a cap long enough to stall the test were it
    ever taken, one session drafting alone runs every forward at once, one model forward per
    call, and drafts the tree it drafts without the coalescer."""
    _, draft = tiny_pair
    shape = TreeShape(budget=10, depth=5, width=2, topk=2)
    prompt = list(range(3, 20))
    alone = TreeBuilder(Drafter(PackedRunner(draft)), prompt, shape).run()
    runner = PackedRunner(draft)
    shared = CoalescingRunner(runner, window_s=60.0)
    before = runner.forward_calls
    d = Drafter(shared)
    for _ in range(2):  # two rounds: the hold of the first is released when its tree is done
        b = TreeBuilder(d, prompt, shape)
        tree = b.run()
        assert (tree.tokens, tree.parents) == (alone.tokens, alone.parents)
        d.rollback(tree, [])
    assert shared.waits == 0 and shared.late == 0
    assert shared.forwards == shared.requests == runner.forward_calls - before == 2 * b.steps


def test_a_session_that_stops_mid_tree_costs_one_capped_wait(tiny_pair):
    """A held session that never submits again (cancelled between steps) delays the next
    forward by at most the cap, once; after that nobody waits for it."""
    _, draft = tiny_pair
    shared = CoalescingRunner(PackedRunner(draft), window_s=0.05)
    stuck, live = Drafter(shared), Drafter(shared)
    stuck.drafting(True)
    live.catch_up(list(range(3, 12)))
    live.catch_up(list(range(3, 14)))
    assert (shared.waits, shared.late, shared.forwards) == (1, 1, 2)
    stuck.close()


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
