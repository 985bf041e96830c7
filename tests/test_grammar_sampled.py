"""Sampled output under a grammar follows the target's own masked distribution: a chi-square
test over the joint law of the first two tokens, through the verifier engine and the edge
drafter (masked drafts, forced tokens), as tests/test_sampled_lossless.py does unmasked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from schemas import Sampling
from schemas.wire import GrammarSpec
from specedge.execution.grammar import GrammarError, Grammars
from specedge.execution.sampling import probs
from tests.test_sampled_lossless import PROMPT, V, chi2_p, make_pair
from tests.test_sampled_lossless import run_trials as sampled_trials
from workers.verifier import engine as engine_mod
from workers.verifier.engine import Engine

VOCAB = list("abcdefgh")  # id 7 ('h') is the stop token
STOP = 7
# first token a, b or c; the second d, e or f after a, anything but h otherwise
SPEC = GrammarSpec("ebnf", 'root ::= ("a" [def] | [bc] [a-g]) [a-g]*')
S = Sampling(temperature=1.0, top_p=0.95)
TRIALS = 1500


def first_allowed() -> list[int]:
    return [0, 1, 2]


def second_allowed(t1: int) -> list[int]:
    return [3, 4, 5] if t1 == 0 else list(range(7))


def masked_probs(logits: torch.Tensor, ok: list[int]) -> torch.Tensor:
    keep = torch.full_like(logits, float("-inf"))
    keep[..., ok] = 0.0
    return probs((logits + keep)[None], S)[0]


def target_joint(target) -> np.ndarray:
    with torch.no_grad():
        p1 = masked_probs(target(torch.tensor([PROMPT])).logits[0, -1], first_allowed())
        out = np.zeros((V, V))
        for t1 in first_allowed():
            row = target(torch.tensor([PROMPT + [t1]])).logits[0, -1]
            out[t1] = (p1[t1] * masked_probs(row, second_allowed(t1))).double().numpy()
    return out


def run_trials(target, draft) -> np.ndarray:
    grammars = Grammars(VOCAB, V)
    eng = Engine(target)
    eng.grammars = grammars
    return sampled_trials(target, draft, S, trials=TRIALS, eng=eng, eos=frozenset({STOP}),
                          grammar=SPEC, constraint=lambda: grammars.constraint(SPEC, [STOP]))


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def test_sampled_output_under_a_grammar_follows_the_masked_target(pair):
    target, draft = pair
    joint = target_joint(target)
    counts = run_trials(target, draft)
    p = chi2_p(counts, joint)  # also asserts no pair outside the grammar was drawn
    assert p > 1e-3, f"chi-square p={p:.2e}: generated tokens do not follow the target"


def test_an_unmasked_verifier_is_detected(pair, monkeypatch):
    """A verifier that skipped the grammar (the edge still masking its drafts) would be caught:
    it draws pairs the grammar forbids."""
    target, draft = pair
    monkeypatch.setattr(engine_mod.grammars, "masked", lambda x, _m: _Same(x))
    try:
        counts = run_trials(target, draft)
    except GrammarError:  # the edge's matcher refused a committed token: caught there
        return
    assert counts[target_joint(target) == 0].sum() > 0


class _Same:
    def __init__(self, x):
        self.x = x

    def __enter__(self):
        return self.x

    def __exit__(self, *exc):
        return False
