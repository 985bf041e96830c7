"""End to end through a real nats-server: with penalties, logit bias or min-p asked, greedy
output equals transformers' generate() of the target alone with the same logits processors,
for chain and tree drafts, with sessions of different transforms sharing verifier batches."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from schemas import Sampling
from specedge.config import TreeShape
from tests.stack import generate, reference_greedy, running_worker
from tests.test_transforms import processors

pytestmark = pytest.mark.asyncio

NEW = 30


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # short alphabets so that tokens repeat and the penalties have something to count
    return [[rng.randrange(24) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def reference(target, prompt: list[int], s: Sampling) -> list[int]:
    """transformers' greedy generate() with the transforms as logits processors."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                              min_new_tokens=0, do_sample=False, pad_token_id=0,
                              logits_processor=processors(s, len(prompt)))
    return out[0, len(prompt):].tolist()


def cases(target, ps: list[list[int]]) -> dict[str, Sampling]:
    plain = [reference_greedy(target, p, NEW) for p in ps]
    # bias: push away a token plain greedy emits, pull up one it does not
    used = sorted({t for r in plain for t in r})
    unused = next(t for t in range(256) if t not in used)
    bias = tuple(sorted({used[0]: -100.0, used[len(used) // 2]: -3.5, unused: 6.0}.items()))
    return {
        "repetition": Sampling(repetition_penalty=1.8),
        "presence": Sampling(presence_penalty=2.0),
        "frequency": Sampling(frequency_penalty=1.5),
        "bias": Sampling(logit_bias=bias),
        "min_p": Sampling(min_p=0.3),  # greedy: no effect, and none expected
        "all": Sampling(repetition_penalty=1.3, presence_penalty=0.8, frequency_penalty=0.6,
                        logit_bias=bias, min_p=0.1),
    }


@pytest.mark.parametrize("shape", [TreeShape.chain(4), TreeShape(budget=16, depth=5, width=4, topk=3)],
                         ids=["chain", "tree"])
async def test_greedy_with_transforms_equals_generate(nats_server, tiny_pair, shape):
    target, draft = tiny_pair
    ps = prompts(3, seed=11)
    plain = [reference_greedy(target, p, NEW) for p in ps]
    cs = cases(target, ps)
    want = {name: [reference(target, p, s) for p in ps] for name, s in cs.items()}
    for name in cs:
        if name != "min_p":  # not vacuous: the transform changes what greedy decoding emits
            assert want[name] != plain, f"{name} changes nothing on these prompts"
    assert want["min_p"] == plain
    async with running_worker(target, nats_server.url, max_batch=16) as w:
        got = await asyncio.gather(*(generate(nats_server.url, draft, ps, max_new_tokens=NEW,
                                              shape=shape, sampling=s) for s in cs.values()))
    for name, results in zip(cs, got, strict=True):
        assert [r.token_ids for r in results] == want[name], name
    assert max(w.stats.batch_sizes) >= 3, "sessions of different transforms share batches"
    # the draft scores its candidates with the same transforms: drafts keep being accepted
    for name, results in zip(cs, got, strict=True):
        tpr = sum(len(r.token_ids) for r in results) / sum(len(r.rounds) for r in results)
        assert tpr > 1.3, f"{name}: {tpr:.2f} tokens per round"
