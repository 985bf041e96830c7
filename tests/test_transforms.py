"""The logit transforms against transformers' own processors: every row of a random tree must
equal the processors applied to the target's row with history = committed + the row's path
(penalties, bias), and min-p must keep what MinPLogitsWarper keeps. The verifier refuses
out-of-range values before any state is built."""

from __future__ import annotations

import random

import msgspec
import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from schemas import SCHEMA_VERSION, Sampling, SessionOpened, pack_ids
from specedge.config import Limits
from specedge.execution.sampling import RowSampling, exp_noise, pick, warp
from specedge.execution.transforms import History, Rows, applied, apply, apply_
from tests.test_sampling_pass import ref_warp
from workers.verifier.validate import BlockError, check_opened


class PresenceFrequency(LogitsProcessor):
    """OpenAI's presence and frequency penalties (transformers has none): generated tokens
    only, i.e. input_ids past the prompt."""

    def __init__(self, presence: float, frequency: float, prompt_len: int):
        self.presence, self.frequency, self.prompt_len = presence, frequency, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len :]
        counts = torch.zeros_like(scores).scatter_add_(1, gen, torch.ones_like(gen, dtype=scores.dtype))
        return scores - (self.frequency * counts + self.presence * (counts > 0).to(scores.dtype))


def processors(s: Sampling, prompt_len: int) -> LogitsProcessorList:
    """transformers' processors for `s`'s transforms, in the order the verifier applies them."""
    out = LogitsProcessorList()
    if s.logit_bias:
        out.append(SequenceBiasLogitsProcessor([[[i], b] for i, b in s.logit_bias]))
    if s.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if s.presence_penalty or s.frequency_penalty:
        out.append(PresenceFrequency(s.presence_penalty, s.frequency_penalty, prompt_len))
    return out


def random_tree(rng: random.Random, n: int, vocab: int) -> tuple[list[int], list[int]]:
    parents = [rng.randrange(i + 1) for i in range(n)]  # node i+1 hangs off the root or an earlier node
    return [rng.randrange(vocab) for _ in range(n)], parents


V = 97
BIAS = ((3, 5.0), (10, -100.0), (40, 0.25), (96, 100.0))  # float32-exact values
CASES = {
    "repetition": Sampling(repetition_penalty=1.3),
    "repetition<1": Sampling(repetition_penalty=0.7),
    "presence": Sampling(presence_penalty=1.5),
    "frequency": Sampling(frequency_penalty=0.75),
    "negative": Sampling(presence_penalty=-1.0, frequency_penalty=-0.5),
    "bias": Sampling(logit_bias=BIAS),
    "all": Sampling(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5,
                    logit_bias=BIAS),
}


@pytest.mark.parametrize("name", CASES)
def test_tree_rows_equal_transformers_processors(name):
    s = CASES[name]
    rng = random.Random(name)
    g = torch.Generator().manual_seed(len(name))
    sessions = []  # (sampling, committed, prompt_len, tokens, parents, start)
    start = 0
    for j in range(4):  # sessions with and without the transform share the batch
        prompt_len = rng.randint(1, 12)
        committed = [rng.randrange(V) for _ in range(prompt_len + rng.randint(0, 20))]
        n = rng.randint(0, 12)
        tokens, parents = random_tree(rng, n, V)
        sessions.append((s if j % 2 == 0 else Sampling(), committed, prompt_len, tokens,
                         parents, start))
        start += n + 1
    logits = torch.randn(start, V, generator=g, dtype=torch.float64) * 4
    groups = [Rows(a, sp, History.of(c, pl), t, p) for sp, c, pl, t, p, a in sessions]
    got = apply(logits, groups)
    changed = 0
    for sp, c, pl, t, p, a in sessions:
        path = {0: []}
        for i in range(1, len(t) + 1):
            path[i] = path[p[i - 1]] + [t[i - 1]]
        for i in range(len(t) + 1):
            row = logits[a + i][None]
            want = processors(sp, pl)(torch.tensor([c + path[i]]), row.clone())[0]
            torch.testing.assert_close(got[a + i], want, rtol=0, atol=1e-12)
            changed += int(not torch.equal(got[a + i], logits[a + i]))
            if sp == Sampling():
                assert torch.equal(got[a + i], logits[a + i])  # untouched, bit for bit
    assert changed > 0


def test_applied_restores_raw_logits_bit_for_bit():
    rng = random.Random(5)
    tokens, parents = random_tree(rng, 9, V)
    logits = torch.randn(10, V, dtype=torch.float64)
    raw = logits.clone()
    groups = [Rows(0, CASES["all"], History.of([1, 2, 3, 3, 4], 2), tokens, parents)]
    with applied(logits, groups) as x:
        assert x is logits and torch.equal(x, apply(raw, groups))
        assert not torch.equal(x, raw)
    assert torch.equal(logits, raw)
    touched, _ = apply_(logits, [Rows(0, Sampling(), History.of([1, 2], 1), tokens, parents)])
    assert len(touched) == 0 and torch.equal(logits, raw)  # no transform asked: none touched


def test_a_subset_of_nodes_gets_its_own_paths():
    """The drafter transforms the rows of the nodes it expands (any subset, in any order)."""
    rng = random.Random(9)
    tokens, parents = random_tree(rng, 15, V)
    logits = torch.randn(16, V, dtype=torch.float64)
    h = History.of([4, 5, 6, 7], 2)
    s = CASES["all"]
    full = apply(logits, [Rows(0, s, h, tokens, parents)])
    nodes = [12, 3, 15]
    sub = apply(logits[nodes], [Rows(0, s, h, tokens, parents, nodes)])
    assert torch.equal(sub, full[nodes])


MINP = [  # (temperature, top_k, top_p, min_p): alone, with each cut, sets of ~1 to thousands
    (1.0, 0, 1.0, 0.1), (0.7, 0, 1.0, 0.5), (1.0, 0, 1.0, 1e-3), (1.0, 0, 1.0, 1e-6),
    (1.0, 0, 0.9, 0.05), (1.0, 20, 1.0, 0.05), (1.0, 100, 0.95, 1e-3), (2.0, 0, 1.0, 1.0),
]


def ref_min_p(logits, t, k, p, m):
    x = ref_warp(logits, [t], [k], [p])
    return MinPLogitsWarper(m)(None, x) if m > 0 else x


@pytest.mark.parametrize("vocab", [300, 5000])
def test_min_p_keeps_what_transformers_keeps(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(MINP), vocab, generator=g, dtype=torch.float64) * 3
    cols = list(zip(*MINP, strict=True))
    got = warp(logits, *cols)
    for i, (t, k, p, m) in enumerate(MINP):
        want = ref_min_p(logits[i : i + 1], t, k, p, m)[0]
        assert torch.equal(got[i].isfinite(), want.isfinite()), MINP[i]
        assert torch.equal(got[i][want.isfinite()], want[want.isfinite()])
    # the seeded pick draws from exactly that set: the race over warp's row
    n = len(MINP)
    rs = RowSampling(list(cols[0]), list(cols[1]), list(cols[2]), [(3, i) for i in range(n)],
                     list(cols[3]))
    keys = torch.tensor(rs.keys, dtype=torch.long)
    want = (got - torch.log(exp_noise(keys, vocab)).to(got.dtype)).argmax(-1)
    assert torch.equal(pick(logits, rs), want)
    # greedy rows ignore min-p
    greedy = RowSampling([0.0] * n, [0] * n, [1.0] * n, [(0, 0)] * n, [0.5] * n)
    assert torch.equal(pick(logits, greedy), logits.argmax(-1))


VC = 1000  # the vocabulary of the opening checks


def opened(**sampling) -> SessionOpened:
    return SessionOpened(v=SCHEMA_VERSION, prompt=pack_ids([1, 2]), sampling=Sampling(**sampling),
                         seed=0, max_new_tokens=4, eos_ids=pack_ids([]), target="t", draft="d",
                         vocab_size=VC)


@pytest.mark.parametrize("bad", [
    {"presence_penalty": 2.5}, {"frequency_penalty": -2.01}, {"presence_penalty": float("nan")},
    {"repetition_penalty": 0.0}, {"repetition_penalty": 50.0}, {"min_p": 1.5},
    {"min_p": -0.1}, {"logit_bias": ((VC, 1.0),)}, {"logit_bias": ((-1, 1.0),)},
    {"logit_bias": ((3, 101.0),)}, {"logit_bias": ((3, 1.0), (3, 2.0))},
    {"logit_bias": ((5, 1.0), (3, 2.0))}, {"logit_bias": tuple((i, 1.0) for i in range(301))},
])
def test_out_of_range_transforms_are_refused(bad):
    with pytest.raises(BlockError) as e:
        check_opened(opened(**bad), Limits(), VC)
    assert e.value.code == "invalid_session"


def test_in_range_transforms_pass():
    check_opened(opened(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1.5,
                        min_p=1.0, logit_bias=tuple((i, 100.0 - i * 200 / 299) for i in range(300))),
                 Limits(), VC)


def test_the_drafter_scores_candidates_on_transformed_logits(tiny_pair):
    """The edge drafts what the transformed target will pick: a draft chain (greedy on the
    draft) equals the draft model's own generate() with the same processors, and a +100 bias
    puts its token at every step."""
    from specedge.config import TreeShape
    from specedge.edge.drafter import Drafter, TreeBuilder
    from specedge.execution import PackedRunner

    draft = tiny_pair[1]
    runner = PackedRunner(draft)
    s = Sampling(repetition_penalty=3.0, presence_penalty=2.0, frequency_penalty=2.0)
    changed = 0
    for seed in range(8):
        rng = random.Random(seed)
        prompt = [rng.randrange(24) for _ in range(6)]
        # the draft's own continuation as the generated part: its favourites are counted
        committed = prompt + TreeBuilder(Drafter(runner), prompt, TreeShape.chain(6)).run().tokens
        plain = TreeBuilder(Drafter(runner), committed, TreeShape.chain(6)).run().tokens
        x = torch.tensor([committed])
        with torch.no_grad():
            want = draft.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6,
                                  min_new_tokens=0, do_sample=False, pad_token_id=0,
                                  logits_processor=processors(s, len(prompt)))
        got = TreeBuilder(Drafter(runner), committed, TreeShape.chain(6), s, len(prompt)).run()
        assert got.tokens == want[0, len(committed):].tolist()
        changed += got.tokens != plain
    assert changed  # not vacuous
    y = next(t for t in range(256) if t not in plain)
    biased = TreeBuilder(Drafter(runner), committed, TreeShape.chain(4),
                         Sampling(logit_bias=((y, 100.0),)), len(prompt)).run()
    assert biased.tokens == [y] * 4


@pytest.mark.parametrize("k", [-2, 21])
def test_out_of_range_logprobs_are_refused(k):
    """A hostile edge cannot make every verdict carry huge top-k lists."""
    o = msgspec.structs.replace(opened(), logprobs=k)
    with pytest.raises(BlockError) as e:
        check_opened(o, Limits(), VC)
    assert e.value.code == "invalid_session"
    check_opened(msgspec.structs.replace(opened(), logprobs=20), Limits(), VC)
