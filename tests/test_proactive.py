"""Proactive drafting: the hit path, the miss path, interruptibility, and the rollback KV."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from schemas import Sampling
from specedge import broker
from specedge.config import Limits, TreeShape
from specedge.edge.drafter import Drafter, TreeBuilder
from specedge.edge.proactive import Mode
from specedge.edge.session import EdgeSession, SessionParams
from specedge.execution import PackedRunner
from tests.conftest import related_draft, tiny_model
from tests.stack import generate, reference_greedy, running_worker

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8], [1, 6, 1, 8, 0, 3, 3, 9, 8, 8, 7]]


def clone(model):
    return related_draft(model, noise=0.0, seed=0)


def never_agreeing(target):
    """The target with its output rows rotated: the draft's top token after any prefix is
    never the target's, so every guess of the outcome is wrong."""
    d = clone(target)
    with torch.no_grad():
        d.lm_head.weight.copy_(torch.roll(target.lm_head.weight, shifts=1, dims=0))
    return d


def hits(results) -> tuple[int, int]:
    rounds = [r for res in results for r in res.rounds if r.hit is not None]
    return sum(r.hit for r in rounds), len(rounds)


@pytest.mark.parametrize("mode", [Mode.SINGLE, Mode.MULTI])
async def test_hit_path_lossless(nats_server, tiny_pair, mode):
    target, _ = tiny_pair
    draft = clone(target)  # the draft is the target: the best leaf + next token is always right
    async with running_worker(target, nats_server.url):
        results = await generate(nats_server.url, draft, PROMPTS, max_new_tokens=30,
                                 shape=TreeShape(budget=6, depth=4, width=2, topk=2),
                                 proactive=mode)
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 30)
    h, n = hits(results)
    assert n >= 6 and h == n, f"{h}/{n} proactive guesses hit with a perfect draft"
    assert sum(rec.hidden_s for res in results for rec in res.rounds) > 0


async def test_miss_path_lossless(nats_server, tiny_pair):
    target, _ = tiny_pair
    draft = never_agreeing(target)
    async with running_worker(target, nats_server.url):
        results = await generate(nats_server.url, draft, PROMPTS, max_new_tokens=20,
                                 shape=TreeShape(budget=6, depth=3, width=2, topk=2),
                                 proactive=Mode.MULTI)
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 20)
    h, n = hits(results)
    assert n >= 10 and h == 0


async def test_mixed_draft_lossless_all_modes(nats_server, tiny_pair):
    target, draft = tiny_pair
    out = {}
    async with running_worker(target, nats_server.url):
        for mode in Mode:
            out[mode] = await generate(nats_server.url, draft, PROMPTS, max_new_tokens=24,
                                       proactive=mode, sampling=Sampling())
    for mode, results in out.items():
        for p, r in zip(PROMPTS, results, strict=True):
            assert r.token_ids == reference_greedy(target, p, 24), mode
    h, n = hits(out[Mode.SINGLE])
    assert 0 < h < n  # a related draft: some guesses right, some wrong


async def test_verdict_interrupts_long_proactive_draft(nats_server, tiny_pair):
    """A proactive draft of 48 sequential forwards is running when the verdict lands; the edge
    must act on it within about one draft forward, not after the whole draft."""
    target, _ = tiny_pair
    draft = tiny_model(5, layers=4, hidden=384)
    steps: list[float] = []
    runner = PackedRunner(draft)
    fwd = runner.forward

    def timed(segs):
        t0 = time.perf_counter()
        try:
            return fwd(segs)
        finally:
            steps.append(time.perf_counter() - t0)

    runner.forward = timed
    shape = TreeShape(budget=48, depth=48, width=1, topk=1)
    nc = await broker.connect(nats_server.url, "edge")
    ex = ThreadPoolExecutor(1)
    async with running_worker(target, nats_server.url, limits=Limits(max_depth=64)):
        s = EdgeSession(nc, nc.jetstream(), Drafter(runner), ex, SessionParams(
            prompt_ids=PROMPTS[0], max_new_tokens=12, shape=shape, proactive=Mode.SINGLE,
            adaptive=False))  # keep the long draft: budget hints would shrink it
        res = await s.run()
    ex.shutdown()
    await nc.close()
    assert res.token_ids == reference_greedy(target, PROMPTS[0], 12)
    step = sorted(steps)[len(steps) // 2]
    full_draft = sum(steps) / max(1, len(res.rounds)) / 2
    rounds = res.rounds[:-1]
    assert rounds, "need at least two rounds"
    # the verdict came long before a proactive draft could finish (most rounds: a single
    # hiccup of a loaded machine may delay one verdict) ...
    early = [r for r in rounds if r.wait_s < full_draft / 3]
    assert len(early) > len(rounds) / 2, (full_draft, [r.wait_s for r in rounds])
    # ... and was acted on within about one forward step (plus scheduling slack)
    worst = max(r.react_s for r in rounds)
    print(f"react worst {worst * 1000:.1f} ms, draft step median {step * 1000:.1f} ms, "
          f"max {max(steps) * 1000:.1f} ms, full proactive draft ~{full_draft * 1000:.0f} ms")
    assert worst < 2.5 * max(steps) + 0.01, (worst, step, max(steps))
    assert worst < full_draft / 4


def test_rollback_kv_equals_fresh_prefill():
    model = tiny_model(9)
    runner = PackedRunner(model)
    committed = [5, 4, 3, 2, 1, 200, 100]
    d = Drafter(runner)
    d.catch_up(committed[:-1])
    tree = TreeBuilder(d, committed, TreeShape(budget=10, depth=4, width=3, topk=3)).run()
    assert tree.forwarded >= 3
    # accept a path with at least two forwarded nodes, then commit it plus a next token
    deep = max(range(1, tree.forwarded + 1), key=lambda i: tree.depths[i - 1])
    path, n = [], deep
    while n:
        path.append(n)
        n = tree.parents[n - 1]
    path.reverse()
    d.rollback(tree, path)
    after = committed + [tree.tokens[i - 1] for i in path] + [17]
    d.catch_up(after)  # KV recomputation for what the draft KV lacks
    fresh = Drafter(runner)
    fresh.catch_up(after)
    assert d.kv.length == fresh.kv.length == len(after)
    for a, b in zip(d.kv.view(), fresh.kv.view(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


async def test_session_kv_after_misses_equals_fresh_prefill(nats_server, tiny_pair):
    target, draft = tiny_pair
    nc = await broker.connect(nats_server.url, "edge")
    ex = ThreadPoolExecutor(1)
    runner = PackedRunner(draft)
    async with running_worker(target, nats_server.url):
        s = EdgeSession(nc, nc.jetstream(), Drafter(runner), ex, SessionParams(
            prompt_ids=PROMPTS[2], max_new_tokens=25, proactive=Mode.SINGLE),
            keep_draft_kv=True)
        res = await s.run()
    ex.shutdown()
    await nc.close()
    assert any(r.hit is False for r in res.rounds) and any(r.hit for r in res.rounds)
    kv = s.drafter.kv
    # every guess's fork and every replaced drafter gave its blocks back to the pool
    assert runner.pool.used_blocks == len(kv.blocks)
    fresh = Drafter(runner)
    fresh.catch_up(s.committed[: kv.length + 1])
    fresh.kv.truncate(kv.length)
    for a, b in zip(kv.view(), fresh.kv.view(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_event_loop_stays_free():
    """Model steps run in the executor: the loop keeps ticking while a draft runs."""
    model = tiny_model(4, layers=4, hidden=384)
    d = Drafter(PackedRunner(model))
    ex = ThreadPoolExecutor(1)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        b = TreeBuilder(d, list(range(1, 60)), TreeShape(budget=30, depth=30, width=1, topk=1))
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        while not b.done:
            await loop.run_in_executor(ex, b.step)
        dt = time.perf_counter() - t0
        t.cancel()
        return ticks, dt

    ticks, dt = asyncio.run(main())
    ex.shutdown()
    assert ticks > dt / 0.001 / 4  # the loop ran throughout, not only between steps


@pytest.mark.parametrize("fail_at, mode", [("catch_up", Mode.SINGLE), ("_fork", Mode.MULTI),
                                           ("step", Mode.MULTI), ("cancel", Mode.MULTI)])
def test_a_failed_guess_gives_its_forks_back(fail_at, mode):
    """A guess that fails anywhere (its catch-up forward, a second fork, a draft step) or is
    cancelled leaves the pool's references exactly as the main drafter's KV alone needs."""
    from specedge.edge.proactive import Proactive

    model = tiny_model(9)
    runner = PackedRunner(model)
    committed = [5, 4, 3, 2, 1, 200, 100, 7, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41]
    d = Drafter(runner)
    d.catch_up(committed[:-1])
    tree = TreeBuilder(d, committed, TreeShape(budget=8, depth=4, width=2, topk=2)).run()
    pool = runner.pool
    refs, used = list(pool.refs), pool.used_blocks
    forks = 0

    async def main():
        nonlocal forks
        started = asyncio.Event()

        async def run_step(fn, *args):
            nonlocal forks
            name = getattr(fn, "__name__", "")
            forks += name == "_fork"
            if name == fail_at and (name != "_fork" or forks == 2):
                raise RuntimeError(f"injected failure in {name}")
            if name == "step":
                started.set()
                if fail_at == "cancel":
                    await asyncio.sleep(60)  # cancelled here, with its heads drafting
            return fn(*args)

        pro = Proactive(committed, tree, d, TreeShape(budget=6, depth=3, width=2, topk=2), mode,
                        run_step)
        pro.start()
        if fail_at == "cancel":
            await started.wait()
            pro._task.cancel()
        await asyncio.gather(pro._task, return_exceptions=True)
        assert pro._task.done() and not pro.heads and not pro._loose
        assert await pro.resolve(committed) is None

    asyncio.run(main())
    assert forks >= (2 if mode is Mode.MULTI else 1), "the guess never forked"
    assert pool.refs == refs and pool.used_blocks == used == len(d.kv.blocks)


@pytest.mark.parametrize("mode", [Mode.OFF, Mode.SINGLE])
async def test_a_plain_first_round_is_lossless_and_drafts_from_the_second(nats_server,
                                                                         tiny_pair, mode):
    """first_tree=False: the first block carries the prompt alone (one token back after the
    target's prefill), the draft prefills after it (beside the verifier with proactive
    drafting, after the verdict without) and drafts full trees from the second round on."""
    target, _ = tiny_pair
    draft = clone(target)
    shape = TreeShape(budget=6, depth=4, width=2, topk=2)
    async with running_worker(target, nats_server.url):
        results = await generate(nats_server.url, draft, PROMPTS, max_new_tokens=20,
                                 shape=shape, proactive=mode, first_tree=False)
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 20)
        first, *rest = r.rounds
        assert (first.nodes, first.committed) == (0, 1)
        assert rest and all(rec.nodes > 0 for rec in rest)
        # the draft is the target: from the second round on every round takes drafted tokens
        assert all(rec.accepted > 0 and rec.committed > 1 for rec in rest[:-1])


async def test_a_plain_first_round_carries_no_suffix_branches(nats_server, tiny_pair):
    """Suffix matches of the prompt's tail add branches to a first tree: the plain first round
    stays the root alone (the draft KV holds nothing yet to roll back)."""
    from schemas import Sampling as S
    from specedge.config import SuffixConfig
    from specedge.edge.suffixdraft import SuffixSource

    target, draft = tiny_pair
    prompt = [3, 1, 4, 1, 5, 9, 2, 6] * 3  # its tail matches earlier: a copy to propose
    nc = await broker.connect(nats_server.url, "test-edge")
    ex = ThreadPoolExecutor(1)
    runner = PackedRunner(draft)
    out = {}
    try:
        async with running_worker(target, nats_server.url):
            for first_tree in (True, False):
                src = SuffixSource(None, "t", 2)
                src.trust = 1.0  # trusted from the start: its branches join every tree
                out[first_tree] = await EdgeSession(
                    nc, nc.jetstream(), Drafter(runner), ex,
                    SessionParams(prompt_ids=prompt, max_new_tokens=16, sampling=S(),
                                  adaptive=False, verdict_timeout_s=20, proactive=Mode.OFF,
                                  first_tree=first_tree, suffix=SuffixConfig(min_match=2)),
                    suffix=src).run()
    finally:
        ex.shutdown()
        await nc.close()
    for r in out.values():
        assert r.token_ids == reference_greedy(target, prompt, 16)
    assert out[True].rounds[0].suffix_nodes > 0  # a proposal for the first round exists
    assert (out[False].rounds[0].nodes, out[False].rounds[0].suffix_nodes) == (0, 0)


async def test_a_lazy_draft_is_built_after_the_plain_first_round(nats_server, tiny_pair):
    """The demo's late draft (specedge.edge.drafter.LazyDrafter): a plain first round needs no
    draft model, so it is built once the first verdict is in, in the session's draft thread,
    and the output is the target's, as with the draft built beforehand."""
    import threading

    from schemas import Sampling as S
    from specedge.edge.drafter import LazyDrafter

    target, draft = tiny_pair
    prompt = PROMPTS[0]
    built: list[tuple[int, str]] = []  # (tokens streamed by then, thread)
    streamed: list[int] = []

    def build() -> Drafter:
        built.append((len(streamed), threading.current_thread().name))
        return Drafter(PackedRunner(draft))

    nc = await broker.connect(nats_server.url, "test-edge")
    ex = ThreadPoolExecutor(1, thread_name_prefix="draft")
    lazy = LazyDrafter(build, PackedRunner(draft).vocab_size)
    try:
        async with running_worker(target, nats_server.url):
            r = await EdgeSession(
                nc, nc.jetstream(), lazy, ex,
                SessionParams(prompt_ids=prompt, max_new_tokens=16, sampling=S(),
                              adaptive=False, verdict_timeout_s=20, proactive=Mode.OFF,
                              first_tree=False),
                on_tokens=streamed.extend).run()
            # a one-token answer never needs it: nothing is loaded
            unused = LazyDrafter(build, lazy.vocab_size)
            one = await EdgeSession(
                nc, nc.jetstream(), unused, ex,
                SessionParams(prompt_ids=prompt, max_new_tokens=1, sampling=S(),
                              adaptive=False, verdict_timeout_s=20, proactive=Mode.OFF,
                              first_tree=False)).run()
    finally:
        ex.shutdown()
        await nc.close()
    assert r.token_ids == reference_greedy(target, prompt, 16)
    assert one.token_ids == r.token_ids[:1]
    assert len(built) == 1 and built[0][0] == 1 and built[0][1].startswith("draft")
    assert r.rounds[0].nodes == 0 and all(rec.nodes > 0 for rec in r.rounds[1:])
    # a runner that disagrees with the vocabulary the session was opened with is refused
    with pytest.raises(ValueError, match="token rows"):
        LazyDrafter(lambda: Drafter(PackedRunner(draft)), lazy.vocab_size + 1).catch_up([1])
