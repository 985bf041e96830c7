"""Compile discipline of the flex path, with FlexAttention compiled on the CPU (inductor's C++
kernel) as it is on CUDA: every rung of the ladder is compiled at start-up, after which an
arrival pattern like gpu-check's (32 sessions joining over time, prefill chunks beside draft
trees of every size, sessions leaving) compiles nothing; the output equals sdpa's; and a
shape past the recompile limit is an error, never a silent eager fallback."""

from __future__ import annotations

import random

import pytest
import torch

from specedge.execution import PackedRunner, Segment, compiling, flex
from specedge.execution.qblocks import LADDER, padded, rung
from specedge.execution.tree import depths_of
from tests.conftest import tiny_model

PREFILL_CHUNK = 128


def arrivals(sessions: int = 32, seed: int = 0) -> list[list[tuple]]:
    """The forwards a verifier runs for `sessions` edges that join a few at a time (prompts of
    16-400 tokens, prefilled in chunks beside the others' trees), each sending a draft tree
    of 1-8 nodes per round when its last verdict is back (not every round: edges are not in
    step), accepting a random path, and leaving after 24-48 tokens. One forward is a list of
    (session, chain tokens, parents of the tree nodes; empty: a prefill chunk only)."""
    rng = random.Random(seed)
    state: dict[int, dict] = {}
    forwards: list[list[tuple]] = []
    step = 0
    while step < 400 and (len(state) < sessions or any(not s["done"] for s in state.values())):
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            if len(state) < sessions:
                state[len(state)] = {"todo": rng.randint(16, 400), "left": rng.randint(24, 48),
                                     "done": False}
        batch = []
        for sid, s in state.items():
            if s["done"] or rng.random() < 0.25:
                continue
            if s["todo"] > PREFILL_CHUNK:
                batch.append((sid, PREFILL_CHUNK, []))
                s["todo"] -= PREFILL_CHUNK
                continue
            n = rng.randint(1, 8)
            batch.append((sid, s["todo"], [rng.randint(0, i) for i in range(n)]))
            s["todo"] = 1  # the root of the next round: the bonus token
            s["left"] -= 1 + rng.randint(0, 3)
            s["done"] = s["left"] <= 0
        if batch:
            forwards.append(batch)
        step += 1
    return forwards


def replay(runner: PackedRunner, forwards: list[list[tuple]]) -> list[torch.Tensor]:
    """Run the pattern's forwards: chains of token ids, trees with random tokens, and after a
    tree the rollback to the chain plus one random root-to-node path."""
    rng = random.Random(1)
    seqs: dict[int, object] = {}
    outs = []
    for batch in forwards:
        segs, trees = [], []
        for sid, chain_len, parents in batch:
            seq = seqs.setdefault(sid, runner.new_seq())
            chain = [rng.randrange(256) for _ in range(chain_len)]
            if not parents:
                segs.append(Segment.chain(seq, chain, logits_at=[]))
                continue
            nodes = [rng.randrange(256) for _ in parents]
            segs.append(Segment.tree(seq, chain, nodes, parents, depths_of(parents)))
            trees.append((seq, seq.length, chain_len, parents))
        logits, _ = runner.forward_flat(segs)
        outs.append(logits.float())
        for seq, have, chain_len, parents in trees:
            node = rng.randint(0, len(parents))
            path = []
            while node:
                path.append(node)
                node = parents[node - 1]
            seq.keep(have, list(range(chain_len)) + [chain_len + i - 1 for i in path[::-1]])
    for seq in seqs.values():
        seq.free()
    return outs


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    monkeypatch.setattr(flex, "COMPILE_ON", {"cpu", "cuda"})


def test_every_rung_compiles_at_start_up_and_nothing_after(compiled_on_cpu):
    forwards = arrivals()
    reached = {rung(sum(padded(c + len(p)) for _, c, p in b)) for b in forwards}
    assert len(forwards) > 40 and len(reached) >= 6  # not one shape: the compiles matter
    model = tiny_model(31, dtype=torch.float32)
    runner = PackedRunner(model, attention="flex", kv_budget_tokens=32 * 512, warm=True)
    assert runner.compiled
    at_start = compiling.compiles()
    outs = replay(runner, forwards)
    assert compiling.compiles() == at_start and runner.late_compiles == 0
    ref = replay(PackedRunner(model, attention="sdpa"), forwards)
    for a, b in zip(outs, ref, strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_a_shape_past_the_recompile_limit_is_an_error(compiled_on_cpu, monkeypatch):
    """Dynamo's own behaviour there is to run flex eagerly, materialising scores over the
    whole pool; the runner says so instead."""
    monkeypatch.setattr(flex, "_compiled", None)  # a fresh compiled function
    runner = PackedRunner(tiny_model(32, dtype=torch.float32), attention="flex",
                          kv_budget_tokens=4096, warm=False)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(
            compiling.CompileLimitError, match="outside the compiled ladder"):
        for rows in LADDER[:4]:
            seqs = [runner.new_seq() for _ in range(rows // 16)]
            runner.forward_flat([Segment.chain(s, [1]) for s in seqs])
