"""Load-adaptive speculation: the verifier's budget hint (pure policy and meter), edges that
follow it, and plain decoding (budget 0) through the same path. Lossless throughout."""

from __future__ import annotations

import pytest

from specedge.config import AdaptiveBudget, TreeShape
from tests.stack import generate, reference_greedy, running_worker
from tests.test_e2e_tiny import prompts
from workers.verifier.load import LoadMeter, suggest_budget


def test_budget_shrinks_with_load_and_respects_bounds():
    pol = AdaptiveBudget(batch_tokens=40, lo=1, hi=16)
    got = [suggest_budget(n, pol) for n in (1, 2, 4, 8, 16, 64)]
    assert got == [16, 16, 9, 4, 1, 1]
    assert got == sorted(got, reverse=True)
    assert suggest_budget(4, AdaptiveBudget(enabled=False)) == 0  # no opinion


def test_meter_counts_live_sessions_not_just_the_batch():
    m = LoadMeter(AdaptiveBudget(batch_tokens=40))
    t = 0.0
    for _ in range(5):  # 8 sessions whose blocks trickle in one per batch, every 0.1 s
        for i in range(8):
            t += 0.1
            m.observe([f"s{i}"], 0, t)
    assert m.active(t, batch=1) == 8
    assert m.budget(t, batch=1) == 4
    t += 30  # they went quiet: only the batch at hand and its queue count
    m.observe(["s0"], 2, t)
    assert m.active(t, batch=1) == 3
    for i in range(8):
        m.forget(f"s{i}")
    assert m.active(t) == 2


def test_shape_with_budget():
    base = TreeShape(budget=8, depth=6, width=2, topk=2)
    assert base.with_budget(3) == TreeShape(3, 3, 2, 2)
    big = base.with_budget(16)
    assert (big.budget, big.depth) == (16, 6) and big.width * big.depth >= 16
    assert base.with_budget(0).budget == 0
    with pytest.raises(ValueError):
        TreeShape(budget=-1).check()


@pytest.mark.asyncio
async def test_edges_follow_the_hint_and_stay_lossless(nats_server, tiny_pair):
    target, draft = tiny_pair
    ps = prompts(2, seed=3)
    pol = AdaptiveBudget(batch_tokens=4, lo=1, hi=16)  # one session -> 3 nodes
    async with running_worker(target, nats_server.url, adaptive=pol):
        follow = await generate(nats_server.url, draft, ps[:1], max_new_tokens=30,
                                adaptive=True)
        fixed = await generate(nats_server.url, draft, ps[1:], max_new_tokens=30,
                               adaptive=False)
    r = follow[0]
    assert r.rounds[0].nodes == 8  # the first round uses the edge's own shape
    assert all(rec.nodes <= 3 for rec in r.rounds[1:]) and len(r.rounds) > 2
    assert all(rec.nodes == 8 for rec in fixed[0].rounds[:-1])
    for p, res in zip(ps, follow + fixed, strict=True):
        assert res.token_ids == reference_greedy(target, p, 30)


@pytest.mark.asyncio
async def test_budget_zero_is_plain_decoding(nats_server, tiny_pair):
    target, draft = tiny_pair
    ps = prompts(3, seed=5)
    async with running_worker(target, nats_server.url) as w:
        res = await generate(nats_server.url, draft, ps, max_new_tokens=12,
                             shape=TreeShape(budget=0))
    for p, r in zip(ps, res, strict=True):
        assert r.token_ids == reference_greedy(target, p, 12)
        assert len(r.rounds) == 12 and all(rec.nodes == 0 for rec in r.rounds)
    assert w.stats.tokens == 36


def test_hold_waits_only_for_sessions_due_within_a_forward():
    m = LoadMeter()
    m.observe_verify(0.5)
    for t in (0.0, 1.0, 2.0):  # a and b every second, b 0.3 s behind a; c is overdue
        m.observe(["a"], 0, t)
        m.observe(["b"], 0, t + 0.3)
    m.observe(["c"], 0, 1.2)
    now = 3.0  # a's block is in hand; b is due at 3.3, within one forward (0.5 s)
    until = m.hold_until(now, {"a"}, factor=1.0)
    assert until == pytest.approx(3.32)
    assert m.hold_until(now, {"a"}, factor=0.5) is None  # b is due beyond half a forward
    assert m.hold_until(now, {"a", "b"}, factor=1.0) is None  # nobody else is due
    assert m.hold_until(now, {"a"}, factor=0) is None  # disabled


def test_knee_is_the_last_nearly_free_size():
    from specedge.execution.costs import knee

    assert knee({1: 0.39, 8: 0.41, 16: 0.51, 24: 0.65, 32: 0.79}) == 16
    assert knee({1: 1.0, 8: 2.0}) == 1
    assert knee({1: 0.01, 64: 0.011, 128: 0.012, 256: 0.014}) == 256  # a GPU-like curve


@pytest.mark.asyncio
async def test_worker_calibrates_its_batch_target(nats_server, tiny_pair):
    target, _ = tiny_pair
    async with running_worker(target, nats_server.url) as w:  # batch_tokens 0: measure
        assert w.cfg.adaptive.batch_tokens >= 1
        assert w.load.policy.batch_tokens == w.cfg.adaptive.batch_tokens
