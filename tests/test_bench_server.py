"""The benchmark's server-only baselines are real decoders: lossless, and reported in job order."""

from __future__ import annotations

import pytest

from bench.server import run_batched
from schemas import Sampling
from tests.stack import reference_greedy
from tests.test_e2e_tiny import prompts


@pytest.mark.parametrize("kind", ["ar", "server-spec"])
def test_server_baselines_are_lossless_and_ordered(tiny_pair, kind):
    target, draft = tiny_pair
    ps = prompts(5, seed=9)
    jobs = [({"category": f"c{i}"}, p) for i, p in enumerate(ps)]
    run = run_batched(kind, target, draft, jobs, edges=3, sampling=Sampling(),
                      max_new_tokens=14, eos=(), chain=3)
    assert [s["category"] for s in run.sessions] == [f"c{i}" for i in range(5)]
    for p, s in zip(ps, run.sessions, strict=True):
        assert s["token_ids"] == reference_greedy(target, p, 14)
    assert max(run.batch_sizes) == 3  # continuous batching: three live sessions per step
    rounds = sum(s["rounds"] for s in run.sessions)
    assert (rounds == 5 * 14) if kind == "ar" else (rounds < 5 * 14)
