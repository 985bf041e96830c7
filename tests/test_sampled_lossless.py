"""Lossless at T=1 with top-p < 1: the distribution of generated tokens must be the target's
own sampling distribution. A chi-square test over the joint law of the first two tokens, run
through the verifier engine and the edge drafter (no broker needed for the math), and the
same test must fail when the acceptance rule is deliberately broken."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from schemas import Sampling
from specedge.config import TreeShape
from specedge.edge.drafter import Drafter, TreeBuilder
from specedge.edge.suffix import SuffixStore
from specedge.edge.suffixdraft import (
    SuffixBuilder,
    SuffixSource,
    accepted_by_source,
    merge,
)
from specedge.execution import PackedRunner
from specedge.execution.sampling import probs
from specedge.execution.walk import WalkResult, commit
from tests.conftest import related_draft, tiny_model
from tests.test_transforms import processors
from workers.verifier import engine as engine_mod
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock

V = 8
# a tenant's history for suffix drafts: every short context has continuations, by counts
SUFFIX_HISTORY = SuffixStore()
SUFFIX_HISTORY.add("t", np.random.default_rng(5).integers(0, V, 400).tolist())
# merged: the model drafts half the budget (as a tree narrower than the budget leaves room),
# suffix branches fill the rest: trees of both kinds of node
MODEL_HALF = TreeShape(budget=2, depth=2, width=2, topk=2)
S = Sampling(temperature=1.0, top_p=0.9, top_k=0)
PROMPT = [1, 5, 2]
TRIALS = 2000


def target_joint(target, s: Sampling = S) -> np.ndarray:
    """P(t1, t2) of plain sampling from the target with the same transform (penalties and
    bias: transformers' processors on each step's history)."""
    dev = next(target.parameters()).device
    procs = processors(s, len(PROMPT))
    with torch.no_grad():
        seqs = torch.tensor([PROMPT], device=dev)
        p1 = probs(procs(seqs, target(seqs).logits[:, -1])[0], s)
        seqs = torch.tensor([PROMPT + [t] for t in range(V)], device=dev)
        p2 = probs(procs(seqs, target(seqs).logits[:, -1]), s)
    return (p1[:, None] * p2).double().cpu().numpy()


def run_trials(target, draft, s: Sampling = S, *, trials: int = TRIALS, eng: Engine | None = None,
               eos: frozenset[int] = frozenset(), grammar=None, constraint=None,
               suffix: str = "", stats: dict | None = None) -> np.ndarray:
    """Counts of the first two generated tokens over `trials` seeds, each session run round by
    round through the verifier engine and the edge drafter. With a grammar: `constraint()`
    gives each session's edge matcher (the engine's own `grammars` masks the target). suffix
    "alone": trees from suffix matches only (no draft probabilities at all); "merged": the
    draft's tree at half the budget, suffix branches merged into the rest
    (specedge.edge.suffixdraft.merge, as a session does); the suffix nodes sent and accepted
    are added up in `stats`."""
    eng = eng or Engine(target)
    drunner = PackedRunner(draft)
    counts = np.zeros((V, V))
    shape = TreeShape(budget=4, depth=2, width=2, topk=2)
    for seed in range(trials):
        st = SessionState("s", s, seed, 2, eos, len(PROMPT), list(PROMPT), grammar=grammar)
        c = constraint() if constraint else None
        dr = Drafter(drunner)
        dr.catch_up(st.committed[:-1])
        src = SuffixSource(SUFFIX_HISTORY, "t") if suffix else None
        while not st.finished:
            if suffix == "alone":
                tree = SuffixBuilder(src, st.committed, shape).run()
            else:
                tree = TreeBuilder(dr, st.committed, MODEL_HALF if src else shape, s,
                                   len(PROMPT), c).run()
                if src:
                    merge(tree, src.propose(st.committed, shape.budget, shape.depth),
                          shape.budget)
            blk = CheckedBlock(st.round, tree.tokens, tree.parents, tree.depths)
            (out,) = eng.verify([(st, blk)])
            new = [tree.tokens[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
            toks, st.finished = commit(new, st.generated, 2, eos)
            dr.rollback(tree, out.walk.accepted)
            if stats is not None:
                stats["nodes"] = stats.get("nodes", 0) + len(tree.suffix)
                stats["accepted"] = stats.get("accepted", 0) + accepted_by_source(
                    tree, out.walk.accepted)
            st.committed += toks
            st.round += 1
        counts[st.committed[3], st.committed[4]] += 1
        st.kv.free()
        dr.close()
    return counts


def chi2_p(counts: np.ndarray, joint: np.ndarray) -> float:
    exp = joint.ravel() * counts.sum()
    keep = exp > 0
    assert counts.ravel()[~keep].sum() == 0, "a token outside the top-p set was generated"
    # merge tiny cells so the chi-square approximation holds
    order = np.argsort(exp[keep])
    e, o = exp[keep][order], counts.ravel()[keep][order]
    cut = np.searchsorted(np.cumsum(e), 25.0)
    e = np.concatenate([[e[: cut + 1].sum()], e[cut + 1:]])
    o = np.concatenate([[o[: cut + 1].sum()], o[cut + 1:]])
    return float(chisquare(o, e).pvalue)


def make_pair(device: str = "cpu"):
    target = tiny_model(21, vocab=V, hidden=32)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.15)  # soften: several tokens carry real mass
    draft = related_draft(target, noise=0.5, seed=3)
    return target.to(device), draft.to(device)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def test_sampled_output_follows_target_distribution(pair):
    target, draft = pair
    counts = run_trials(target, draft)
    p = chi2_p(counts, target_joint(target))
    assert p > 1e-3, f"chi-square p={p:.2e}: generated tokens do not follow the target"


@pytest.mark.parametrize("suffix", ["alone", "merged"])
def test_suffix_drafted_output_follows_target_distribution(pair, suffix):
    """Suffix nodes carry no draft probability: the token-match rule judges them as a
    deterministic proposal (a point mass), and the law stays the target's."""
    target, draft = pair
    stats: dict = {}
    trials = TRIALS * 2 // 5  # the law of the same joint; fewer draws keep the suite short
    counts = run_trials(target, draft, suffix=suffix, stats=stats, trials=trials)
    p = chi2_p(counts, target_joint(target))
    assert p > 1e-3, f"chi-square p={p:.2e}: generated tokens do not follow the target"
    assert stats["nodes"] > trials and stats["accepted"] > trials // 10, stats


@pytest.mark.cuda
def test_sampled_output_follows_target_distribution_on_the_device(test_device):
    """The same law on $SPECEDGE_TEST_DEVICE (the GPU in `make gpu-check`): the seeded draws
    are made on the device, one batched call per forward."""
    target, draft = make_pair(test_device)
    counts = run_trials(target, draft)
    p = chi2_p(counts, target_joint(target))
    assert p > 1e-3, f"chi-square p={p:.2e}: generated tokens do not follow the target"


def broken_walk(tokens, parents, picks):
    """Accept the first child whenever the target's pick merely has the same parity:
    a plausible-looking bug that biases the output towards the draft."""
    from specedge.execution.tree import children_map

    kids = children_map(tokens, parents)
    node, acc = 0, []
    while True:
        y = picks[node]
        child = kids[node].get(y)
        if child is None:
            child = next((c for t, c in kids[node].items() if t % 2 == y % 2), None)
        if child is None:
            return WalkResult(acc, y, not kids[node])
        acc.append(child)
        node = child


def test_broken_rule_is_detected(pair, monkeypatch):
    target, draft = pair
    monkeypatch.setattr(engine_mod, "walk", broken_walk)
    counts = run_trials(target, draft)
    p = chi2_p(counts, target_joint(target))
    assert p < 1e-6, f"a broken acceptance rule went unnoticed (p={p:.2e})"



# each logit transform at T=1 (penalties: a prompt token, or the first token for the second)
TRANSFORMED = {
    "repetition": Sampling(temperature=1.0, top_p=0.9, repetition_penalty=2.0),
    "presence": Sampling(temperature=1.0, presence_penalty=1.5),
    "frequency": Sampling(temperature=1.0, top_k=6, frequency_penalty=-1.0),
    "bias": Sampling(temperature=1.0, top_p=0.95, logit_bias=((0, 1.5), (3, -2.0), (6, 0.75))),
    "min_p": Sampling(temperature=1.0, min_p=0.7),  # this pair's rows are flat
}


@pytest.mark.parametrize("name", TRANSFORMED)
def test_sampled_output_with_a_transform_follows_target(pair, name):
    target, draft = pair
    s = TRANSFORMED[name]
    joint = target_joint(target, s)
    # not vacuous: the transform moves the law away from plain T=1 sampling
    plain = target_joint(target, Sampling(temperature=1.0))
    assert np.abs(joint - plain).sum() > 0.05
    p = chi2_p(run_trials(target, draft, s), joint)
    assert p > 1e-3, f"{name}: chi-square p={p:.2e}: generated tokens do not follow the target"


def test_ignored_transforms_are_detected(pair, monkeypatch):
    """A verifier that skipped the penalties and bias would be caught."""
    target, draft = pair
    s = Sampling(temperature=1.0, repetition_penalty=1.5, presence_penalty=1.0,
                 frequency_penalty=0.5, logit_bias=((0, 1.0), (3, -1.0)))
    monkeypatch.setattr(engine_mod, "wanted", lambda _: False)
    p = chi2_p(run_trials(target, draft, s), target_joint(target, s))
    assert p < 1e-6, f"a verifier ignoring the transforms went unnoticed (p={p:.2e})"


def test_a_seed_gives_one_answer_whatever_drafts_it(pair):
    """Draws are keyed by (seed, output position): the same seeds give the very same tokens
    whether a draft model, suffix matches alone or both propose the trees (different trees,
    depths and rounds), as plain decoding with those keys would."""
    target, draft = pair
    runs = [run_trials(target, draft, suffix=suffix, trials=150)
            for suffix in ("", "alone", "merged")]
    assert runs[0].sum() == 150
    assert (runs[0] == runs[1]).all() and (runs[0] == runs[2]).all()
