import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from schemas import Sampling
from specedge.sampling import probs, round_generator, sample
from specedge.verify import commit, walk


def hf_probs(logits, s: Sampling):
    x = logits.double().unsqueeze(0)
    x = TemperatureLogitsWarper(s.temperature)(None, x)
    if s.top_k:
        x = TopKLogitsWarper(s.top_k)(None, x)
    if s.top_p < 1:
        x = TopPLogitsWarper(s.top_p)(None, x)
    return x.softmax(-1)[0]


def test_transform_matches_transformers_warpers():
    torch.manual_seed(0)
    for _ in range(50):
        logits = torch.randn(40) * 3
        for s in [Sampling(1.0, 0.9, 0), Sampling(0.7, 0.5, 10), Sampling(1.3, 1.0, 5),
                  Sampling(0.5, 0.95, 0)]:
            assert torch.allclose(probs(logits, s), hf_probs(logits, s), atol=1e-12)


def test_seeded_per_round():
    a = [torch.rand(3, generator=round_generator(7, r)) for r in range(3)]
    b = [torch.rand(3, generator=round_generator(7, r)) for r in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], torch.rand(3, generator=round_generator(8, 0)))


def test_walk_greedy():
    # root -> 1 (tok 3) -> 3 (tok 4); root -> 2 (tok 5)
    tokens, parents = [3, 5, 4], [0, 0, 1]
    logits = torch.full((4, 8), -5.0)
    logits[0, 3] = 1  # root: target says 3 -> node 1
    logits[1, 4] = 1  # node 1: target says 4 -> node 3
    logits[3, 6] = 1  # node 3 (leaf): bonus 6
    res = walk(tokens, parents, logits, Sampling(), None)
    assert res.accepted == [1, 3] and res.next_token == 6 and res.bonus
    logits[1, 4], logits[1, 2] = -5, 1  # node 1: target says 2, not a child -> correction
    res = walk(tokens, parents, logits, Sampling(), None)
    assert res.accepted == [1] and res.next_token == 2 and not res.bonus


def test_sample_greedy_is_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0])
    assert sample(logits, Sampling(), None) == 1


def test_commit_cuts_at_eos_and_limit():
    assert commit([1, 2, 3], 0, 10, frozenset({2})) == ([1, 2], True)
    assert commit([1, 2, 3], 8, 10, frozenset()) == ([1, 2], True)
    assert commit([1, 2, 3], 0, 10, frozenset()) == ([1, 2, 3], False)
    assert commit([1, 2], 0, 2, frozenset()) == ([1, 2], True)
