import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from schemas import Sampling
from specedge.execution.sampling import RowSampling, exp_noise, pick, position_key, probs, sample
from specedge.execution.tree import children_map
from specedge.execution.walk import commit, walk


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
            ref = hf_probs(logits, s)
            assert torch.allclose(probs(logits.double(), s), ref, atol=1e-12)
            p32 = probs(logits, s)  # the serving dtype: same kept set, float32 precision
            assert p32.dtype == torch.float32 and torch.equal(p32 > 0, ref > 0)
            assert torch.allclose(p32.double(), ref, atol=1e-6)


def test_draws_are_seeded_per_position():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    s = Sampling(1.0, 1.0, 0)
    pos = [3, 4, 5, 6, 7]
    a = pick(logits, RowSampling.for_positions(s, 7, pos)).tolist()
    assert a == pick(logits, RowSampling.for_positions(s, 7, pos)).tolist()  # a redelivery
    others = [pick(logits, RowSampling.for_positions(s, 7, [p + k for p in pos])).tolist()
              for k in range(1, 6)]
    assert any(o != a for o in others)
    assert position_key(7, 3) != position_key(7, 4) != position_key(8, 3)
    # siblings fill the same position: the same row of logits draws the same token there
    same = logits[:1].expand(4, 50)
    assert len(set(pick(same, RowSampling.for_positions(s, 7, [9] * 4)).tolist())) == 1
    keys = torch.tensor([[1, 2], [1, 3], [2, 2]])
    e = exp_noise(keys, 1000)
    assert torch.equal(e, exp_noise(keys, 1000)) and (e > 0).all()
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])


def test_exponential_noise_is_exp1():
    """The race is exact only if E ~ Exp(1) independently per (key, token)."""
    from scipy.stats import kstest

    e = exp_noise(torch.tensor([[k, 11 * k] for k in range(40)]), 5000).double()
    assert abs(float(e.mean()) - 1) < 0.01 and abs(float(e.var()) - 1) < 0.03
    assert kstest(e.flatten()[::7].numpy(), "expon").pvalue > 1e-3
    across_keys = torch.corrcoef(e[:2])[0, 1]
    adjacent_ids = torch.corrcoef(torch.stack([e[0, :-1], e[0, 1:]]))[0, 1]
    assert abs(float(across_keys)) < 0.05 and abs(float(adjacent_ids)) < 0.05


def test_batched_draws_follow_the_warped_distribution():
    """Every row of one batched call is a draw from that row's own transform."""
    from scipy.stats import chisquare

    torch.manual_seed(1)
    logits = torch.randn(3, 12) * 2
    params = [Sampling(1.0, 0.9, 0), Sampling(0.7, 1.0, 4), Sampling(1.5, 0.8, 6)]
    n = 4000
    rows = torch.cat([logits[i].expand(n, 12) for i in range(3)])
    rs = RowSampling([p.temperature for p in params for _ in range(n)],
                     [p.top_k for p in params for _ in range(n)],
                     [p.top_p for p in params for _ in range(n)],
                     [(i, 5) for i in range(3 * n)])
    picks = pick(rows, rs).view(3, n)
    for i, p in enumerate(params):
        want = probs(logits[i].double(), p)
        counts = torch.bincount(picks[i], minlength=12).double()
        assert counts[want == 0].sum() == 0  # nothing outside the kept set
        keep = want > 0
        assert chisquare(counts[keep].numpy(), (want[keep] * n).numpy()).pvalue > 1e-4


def test_greedy_rows_are_argmax_and_mixed_batches_work():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    rs = RowSampling([0.0, 1.0, 0.0], [0, 0, 0], [1.0, 1.0, 1.0], [(0, 0)] * 3)
    out = pick(logits, rs).tolist()
    assert out[0] == 1 and out[2] == 2 and out[1] in (0, 1, 2)


def test_walk_follows_picks():
    # root -> 1 (tok 3) -> 3 (tok 4); root -> 2 (tok 5)
    tokens, parents = [3, 5, 4], [0, 0, 1]
    res = walk(tokens, parents, [3, 4, 0, 6])  # root picks 3, node 1 picks 4, node 3: bonus 6
    assert res.accepted == [1, 3] and res.next_token == 6 and res.bonus
    res = walk(tokens, parents, [3, 2, 0, 6])  # node 1 picks 2, not a child: correction
    assert res.accepted == [1] and res.next_token == 2 and not res.bonus
    res = walk([], [], [7])  # plain decoding: the root's pick
    assert res.accepted == [] and res.next_token == 7 and res.bonus


def test_batched_walk_equals_the_per_node_walk():
    """Picking every node in one call, then walking, gives what sampling node by node along
    the walk gives (same keys), greedy and sampled."""
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        parents = [0, 0, 1, 1, 2, 3, 3, 5][: 1 + trial % 8]
        tokens = torch.randint(0, 6, (len(parents),), generator=g).tolist()
        logits = torch.randn(len(parents) + 1, 6, generator=g) * 2
        for s in (Sampling(), Sampling(1.0, 0.95, 0)):
            depth = [0]  # the root's, then node j + 1's below parents[j]
            for p in parents:
                depth.append(depth[p] + 1)
            rs = RowSampling.for_positions(s, trial, [5 + d for d in depth])
            batched = walk(tokens, parents, pick(logits, rs).tolist())
            kids, node, acc = children_map(tokens, parents), 0, []
            while True:  # the per-node walk: one draw where the walk stands
                y = sample(logits[node], s, rs.keys[node])
                if y not in kids[node]:
                    break
                node = kids[node][y]
                acc.append(node)
            assert batched.accepted == acc and batched.next_token == y


def test_commit_cuts_at_eos_and_limit():
    assert commit([1, 2, 3], 0, 10, frozenset({2})) == ([1, 2], True)
    assert commit([1, 2, 3], 8, 10, frozenset()) == ([1, 2], True)
    assert commit([1, 2, 3], 0, 10, frozenset()) == ([1, 2, 3], False)
    assert commit([1, 2], 0, 2, frozenset()) == ([1, 2], True)
