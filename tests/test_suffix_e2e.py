"""Suffix drafts end to end through a real nats-server and a verifier: a model-free edge and
suffix branches merged into the draft model's trees. Greedy output must equal the target's own
generate(), token for token; per-source figures must add up."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import structlog

from schemas import Sampling
from specedge import broker
from specedge.config import SuffixConfig, TreeShape
from specedge.edge.drafter import Drafter
from specedge.edge.session import EdgeSession, SessionParams
from specedge.edge.suffix import SuffixStore
from specedge.edge.suffixdraft import SuffixDrafter, SuffixSource
from specedge.execution import PackedRunner
from specedge.replay import view
from specedge.sessionlog import read_session
from tests.conftest import TINY_VOCAB
from tests.stack import reference_greedy, running_worker

pytestmark = pytest.mark.asyncio
ROOT = Path(__file__).resolve().parent.parent
SHAPE = TreeShape(8, 6, 2, 2)


def looping_prompts(target, n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that restate part of what the target says next (as an edit of a given text
    does): a random head, the target's own continuation of it, the head again."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        head = [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(3, 12))]
        out.append(head + reference_greedy(target, head, 16) + [7] + head)
    return out


async def run(url: str, prompts: list[list[int]], mode: str, draft=None, *,
              max_new_tokens: int = 24, shape: TreeShape = SHAPE,
              store: SuffixStore | None = None, min_match: int = 2, full_run: int = 12,
              trust: float | None = None):
    """One session per prompt, one at a time (so history from earlier ones can be used):
    mode "alone" (SuffixDrafter, no model) or "merged" (the draft model plus suffix
    branches) or "model" (the draft alone)."""
    nc = await broker.connect(url, "test-edge")
    runner = PackedRunner(draft) if draft is not None else None
    ex = ThreadPoolExecutor(1)
    results = []
    try:
        for i, p in enumerate(prompts):
            src = SuffixSource(store, "t", 1 if mode == "alone" else min_match)
            if trust is not None:  # trusted from the start: it holds budget at once
                src.trust = trust
            drafter = SuffixDrafter(src, TINY_VOCAB) if mode == "alone" else Drafter(runner)
            params = SessionParams(prompt_ids=p, max_new_tokens=max_new_tokens,
                                   sampling=Sampling(), seed=i, shape=shape, adaptive=False,
                                   verdict_timeout_s=20,
                                   suffix=SuffixConfig(min_match if mode != "model" else 0,
                                                       full_run=full_run))
            results.append(await EdgeSession(nc, nc.jetstream(), drafter, ex, params,
                                             suffix=src).run())
    finally:
        ex.shutdown()
        await nc.close()
    return results


async def test_model_free_edge_is_exact(nats_server, tiny_pair):
    target, _ = tiny_pair
    ps = looping_prompts(target, 4)
    store = SuffixStore()
    async with running_worker(target, nats_server.url):
        results = await run(nats_server.url, ps, "alone", store=store)
        # the tenant's history: the same prompt again drafts its whole answer from it
        again = await run(nats_server.url, ps[:1], "alone", store=store)
    for p, r in zip(ps, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 24)
        assert all(x.suffix_nodes == x.nodes for x in r.rounds)
    s = [r.summary() for r in results]
    drafted = sum(x["draft_tokens_by_source"]["suffix"] for x in s)
    accepted = sum(x["accepted_by_source"]["suffix"] for x in s)
    assert drafted > 0 and accepted > 0 and all(x["accepted_by_source"]["model"] == 0 for x in s)
    assert sum(len(r.token_ids) for r in results) / sum(len(r.rounds) for r in results) > 1.5
    assert again[0].token_ids == results[0].token_ids
    assert len(again[0].rounds) < len(results[0].rounds)
    assert store.tokens == sum(len(p) + 24 for p in ps) + len(ps[0]) + 24
    # the log says which nodes were suffix-drafted: the replay's figures are the edge's
    nc = await broker.connect(nats_server.url, "test-replay")
    try:
        sv = view(await read_session(nc.jetstream(), results[0].session_id))
    finally:
        await nc.close()
    assert sv.speculation["accepted_by_source"] == s[0]["accepted_by_source"]
    assert sv.speculation["draft_tokens_by_source"] == s[0]["draft_tokens_by_source"]


async def test_merged_drafts_are_exact_and_add_accepted_tokens(nats_server, tiny_pair):
    target, draft = tiny_pair
    ps = looping_prompts(target, 4, seed=1)
    async with running_worker(target, nats_server.url):
        with structlog.testing.capture_logs() as logs:
            # trusted from the start (as after hits; tiny random models rarely copy 3 tokens)
            merged = await run(nats_server.url, ps, "merged", draft, trust=1.0)
            # a copy run of 4 takes the whole budget: rounds where the model drafts nothing
            held = await run(nats_server.url, ps, "merged", draft, full_run=4, trust=1.0)
        model = await run(nats_server.url, ps, "model", draft)
    # proactive drafting (on) never forks a draft KV that a suffix-only round left behind
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert any(x.nodes and x.suffix_nodes == x.nodes for r in held for x in r.rounds)
    for p, h in zip(ps, held, strict=True):
        assert h.token_ids == reference_greedy(target, p, 24)
    for p, m, a in zip(ps, merged, model, strict=True):
        ref = reference_greedy(target, p, 24)
        assert m.token_ids == ref and a.token_ids == ref
        assert all(x.nodes <= 8 for x in m.rounds)  # the same budget
        assert all(x.suffix_nodes == 0 for x in a.rounds)
    # the copies of the prompt's head are short: at a full run of 4 the suffix takes them
    by = [r.summary()["accepted_by_source"] for r in held]
    assert sum(b["suffix"] for b in by) > 0 and sum(b["model"] for b in by) > 0
    rounds = sum(len(r.rounds) for r in held)
    assert rounds <= sum(len(r.rounds) for r in model)


@pytest.mark.timeout(300)
async def test_cli_edge_with_model_suffix(nats_server, tiny_pair, model_dirs):
    """`python -m specedge.edge --model suffix`: the target's tokenizer, no draft model;
    exact, and its JSON summary carries the per-source figures."""
    target, _ = tiny_pair
    target_dir, _ = model_dirs
    from specedge.edge.text import prompt_ids
    from specedge.models import load_tokenizer

    text = "abcdefghij klmnop abcdefghij klmnop abcdefghij"
    ids = prompt_ids(load_tokenizer(target_dir), text, False)  # as the edge reads it
    async with running_worker(target, nats_server.url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "specedge.edge", "--nats", nats_server.url, "--model",
            "suffix", "--target", target_dir, "--no-chat", "--prompt", text, "--json",
            "--max-new-tokens", "20", "--no-adaptive", "--threads", "1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["token_ids"] == reference_greedy(target, ids, 20)
    assert summary["draft_tokens_by_source"]["model"] == 0
    assert summary["draft_tokens_by_source"]["suffix"] > 0
