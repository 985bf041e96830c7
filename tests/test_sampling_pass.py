"""`pick` and `warp` read the kept set off a short top-k prefix and race only the kept tokens;
these tests hold them to the sort-based transform they replaced (kept here as the reference,
with its full-row race and int64 hash): same kept sets, same noise bits, same picks."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from specedge.execution import sampling
from specedge.execution.sampling import RowSampling, exp_noise, pick, warp

M32 = 0xFFFFFFFF


def ref_warp(logits, temperature, top_k, top_p):
    """The full-sort transform (the code before the prefix cut)."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(dt) / torch.tensor(temperature, dtype=dt)[:, None]
    v = x.shape[-1]
    ks = [k if 0 < k < v else v for k in top_k]
    sx, order = torch.sort(x, dim=-1, descending=True)
    kth = sx.gather(1, torch.tensor(ks)[:, None] - 1)
    drop = sx < kth
    sx = sx.masked_fill(drop, float("-inf"))
    p = sx.softmax(-1)
    before = p.cumsum(-1) - p
    cut = [p if p < 1.0 else float("inf") for p in top_p]
    drop_p = before >= torch.tensor(cut, dtype=dt)[:, None]
    drop_p[:, 0] = False
    drop |= drop_p
    return x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def ref_tie_closed(logits, temperature, top_k, top_p):
    """ref_warp plus the rest of any tie it cut through: its sort orders ties arbitrarily,
    the prefix cut keeps such a tie whole (a value threshold)."""
    ref = ref_warp(logits, temperature, top_k, top_p)
    dt = ref.dtype
    x = logits.to(dt) / torch.tensor(temperature, dtype=dt)[:, None]
    low = ref.masked_fill(ref.isinf(), float("inf")).amin(-1, keepdim=True)
    return x.masked_fill(x < low, float("-inf"))


def assert_kept_like_reference(got, logits, temperature, top_k, top_p):
    """got == the tie-closed reference, except that a token whose top-p verdict is within
    rounding (its float64 mass of strictly likelier kept tokens within 1e-5 of top_p) may go
    either way: the reference's float32 sums differ from any other order's by ulps."""
    want = ref_tie_closed(logits, temperature, top_k, top_p)
    diff = got.isfinite() != want.isfinite()
    assert torch.equal(got[~diff], want[~diff])
    if not diff.any():
        return
    x = ref_warp(logits.double(), temperature, top_k, [1.0] * len(top_k))  # top-k only
    asc, order = torch.sort(x, dim=-1)
    p = asc.softmax(-1)
    above = p.flip(-1).cumsum(-1).flip(-1)  # mass at or after each ascending position
    at = torch.searchsorted(asc, x, right=True).clamp(max=x.shape[-1] - 1)
    greater = torch.where(at < x.shape[-1] - 1, above.gather(1, at), 0.0)
    greater = torch.where(asc.gather(1, at) > x, greater, 0.0)  # nothing strictly likelier
    cut = torch.tensor(top_p, dtype=torch.float64)[:, None].expand_as(x)
    assert ((greater - cut).abs()[diff] < 1e-5).all()
    assert diff.sum(-1).max() <= 1


def ref_noise(keys, vocab):
    """The int64 hash with emulated 32-bit products."""
    def mul32(x, c):
        return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32

    def mix32(x):
        x = x ^ (x >> 16)
        x = mul32(x, 0x7FEB352D)
        x = x ^ (x >> 15)
        x = mul32(x, 0x846CA68B)
        return x ^ (x >> 16)

    ids = torch.arange(vocab, dtype=torch.long)
    h = mix32(mix32((ids[None, :] ^ keys[:, :1]) & M32) ^ keys[:, 1:])
    w = ((h.to(torch.float32) + 0.5) * 2.0**-32).clamp_(max=1.0 - 2.0**-24)
    return -torch.log1p(-w)


def ref_pick(logits, rs: RowSampling):
    """Warp every row, add the noise of every token, argmax."""
    picks = logits.argmax(-1)
    for i, t in enumerate(rs.temperature):
        if t > 0:
            x = ref_warp(logits[i : i + 1], [t], [rs.top_k[i]], [rs.top_p[i]])
            e = ref_noise(torch.tensor([rs.keys[i]]), x.shape[-1])
            picks[i] = (x - torch.log(e).to(x.dtype)).argmax(-1)[0]
    return picks


def llm_rows(rows, vocab, g, spread=8.0):
    """A Gaussian bulk with a few dozen boosted tokens: top-p sets of 1 to thousands."""
    x = torch.randn(rows, vocab, generator=g) * 1.5
    ids = torch.randint(0, vocab, (rows, 40), generator=g)
    top = 7 + spread * torch.rand(rows, 1, generator=g)
    boost = top - 2 * torch.rand(rows, 1, generator=g) * torch.arange(40)[None] ** 0.7
    return x.scatter_(1, ids, boost + torch.randn(rows, 40, generator=g))


PARAMS = [  # (temperature, top_k, top_p): top-k only, top-p only, both, extreme temperatures
    (1.0, 1, 1.0), (1.0, 5, 1.0), (0.7, 50, 1.0), (1.0, 63, 1.0), (1.0, 64, 1.0),
    (1.0, 0, 0.5), (0.7, 0, 0.9), (1.3, 0, 0.99), (1.0, 0, 0.999), (1.0, 0, 1e-6),
    (0.7, 50, 0.9), (1.0, 5, 0.3), (1.0, 200, 0.95), (0.05, 0, 0.9), (0.01, 20, 0.9),
    (20.0, 0, 0.9), (100.0, 40, 0.5), (1e4, 0, 0.99),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kept_set_equals_the_sort_reference(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.cat([llm_rows(6, 3000, g), torch.randn(2, 3000, generator=g) * 3,
                        torch.randn(2, 3000, generator=g) * 0.2]).to(dtype)
    for t, k, p in PARAMS:
        n = logits.shape[0]
        got = warp(logits, [t] * n, [k] * n, [p] * n)
        assert_kept_like_reference(got, logits, [t] * n, [k] * n, [p] * n)


def test_top_k_keeps_ties_and_top_p_keeps_a_straddling_tie_whole():
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 6, (40, 300), generator=g).float()  # every value tied
    n = logits.shape[0]
    for k in (1, 3, 64, 100, 299):  # top-k alone: exactly the reference's set
        got = warp(logits, [1.0] * n, [k] * n, [1.0] * n)
        assert torch.equal(got, ref_warp(logits, [1.0] * n, [k] * n, [1.0] * n))
    for k, p in ((0, 0.3), (0, 0.9), (10, 0.5)):
        got = warp(logits, [1.0] * n, [k] * n, [p] * n)
        ref = ref_warp(logits, [1.0] * n, [k] * n, [p] * n)
        closed = ref_tie_closed(logits, [1.0] * n, [k] * n, [p] * n)
        assert not torch.equal(closed, ref)  # some cut does fall inside a tie
        assert torch.equal(got, closed)


def test_top_p_sets_longer_than_every_prefix():
    """Rows whose top-p set outgrows the first prefix (64) and the second (2048): the sort
    decides them, and their picks are still the reference's."""
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(6, 20000, generator=g)  # top-p 0.9: ~15k tokens
    mid = torch.randn(6, 20000, generator=g) * 1.5
    mid[:, :300] += 9  # ~300 tokens
    logits = torch.cat([flat, mid])
    n = logits.shape[0]
    kept = warp(logits, [1.0] * n, [0] * n, [0.9] * n).isfinite().sum(-1)
    assert (kept[:6] > 2048).all() and ((kept[6:] > 64) & (kept[6:] < 2048)).all()
    for k, p in ((0, 0.9), (5000, 0.95), (0, 0.5)):
        assert torch.equal(warp(logits, [1.0] * n, [k] * n, [p] * n),
                           ref_warp(logits, [1.0] * n, [k] * n, [p] * n))
        rs = RowSampling([1.0] * n, [k] * n, [p] * n, [(5, i) for i in range(n)])
        assert torch.equal(pick(logits, rs), ref_pick(logits, rs))


def test_noise_bits_equal_the_int64_hash():
    g = torch.Generator().manual_seed(4)
    keys = torch.randint(0, 1 << 32, (16, 2), generator=g)
    keys[0] = torch.tensor([0, 0])
    keys[1] = torch.tensor([M32, M32])
    assert torch.equal(exp_noise(keys, 70000), ref_noise(keys, 70000))


def mixed_batch(g, vocab=4000, rows=48):
    logits = llm_rows(rows, vocab, g)
    params = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 0.9), (0.7, 50, 0.9), (1.0, 20, 1.0),
              (0.5, 0, 0.999), (2.0, 0, 0.95)]
    ps = [params[i % len(params)] for i in range(rows)]
    keys = [tuple(int(v) for v in torch.randint(0, 1 << 32, (2,), generator=g))
            for _ in range(rows)]
    return logits, RowSampling([p[0] for p in ps], [p[1] for p in ps], [p[2] for p in ps], keys)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picks_equal_the_full_row_race(dtype):
    """Greedy rows, rows with no cut, top-k, top-p, both: the reference's picks."""
    logits, rs = mixed_batch(torch.Generator().manual_seed(5))
    logits = logits.to(dtype)
    got = pick(logits, rs)
    assert torch.equal(got, ref_pick(logits, rs))
    greedy = [i for i, t in enumerate(rs.temperature) if t <= 0]
    assert torch.equal(got[greedy], logits[greedy].argmax(-1))


def test_picks_do_not_depend_on_batch_order_or_chunking(monkeypatch):
    logits, rs = mixed_batch(torch.Generator().manual_seed(6))
    whole = pick(logits, rs)
    perm = torch.randperm(len(rs.keys), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = pick(logits[perm], rs.select(perm))
    assert torch.equal(shuffled, whole[perm])
    one_by_one = torch.cat([pick(logits[i : i + 1], rs.select([i])) for i in range(len(perm))])
    assert torch.equal(one_by_one, whole)
    monkeypatch.setattr(sampling, "_CHUNK", 3 * logits.shape[-1])  # row chunks of three
    monkeypatch.setattr(sampling, "_CAPS", (8, 16))  # most rows take the longer prefixes
    assert torch.equal(pick(logits, rs), whole)
    both = pick(torch.cat([logits, logits]), RowSampling.concat([rs, rs]))
    assert torch.equal(both, torch.cat([whole, whole]))


def test_picks_follow_the_warped_distribution():
    """Frequencies of many keys' picks on one row, for sets inside the first prefix and past
    it (here the sort), top-k, and no cut."""
    g = torch.Generator().manual_seed(7)
    vocab, n = 1500, 4000
    row = torch.randn(vocab, generator=g)
    row[:12] += torch.linspace(6, 3, 12)  # a short head
    row[12:200] += 2.5  # then a long shoulder
    for t, k, p in ((0.7, 0, 0.6), (1.0, 0, 0.9), (1.0, 40, 1.0), (1.0, 0, 0.99), (0.8, 0, 1.0)):
        rs = RowSampling([t] * n, [k] * n, [p] * n, [(9, i) for i in range(n)])
        picks = pick(row.expand(n, vocab), rs)
        want = warp(row[None].double(), [t], [k], [p]).softmax(-1)[0]
        counts = torch.bincount(picks, minlength=vocab).double()
        assert counts[want == 0].sum() == 0  # nothing outside the kept set
        exp = want * n
        order = torch.argsort(exp)
        e, o = exp[order], counts[order]
        small = int(torch.searchsorted(e.cumsum(0), 25.0))  # pool the cells too small for chi2
        e = torch.cat([e[: small + 1].sum()[None], e[small + 1 :]])
        o = torch.cat([o[: small + 1].sum()[None], o[small + 1 :]])
        assert chisquare(o.numpy(), e.numpy()).pvalue > 1e-4, (t, k, p)


@pytest.mark.cuda
def test_device_draws_equal_the_cpu_draws(test_device):
    """Same keys, same bits: the int32 hash wraps alike on the device, and the device's picks
    are the CPU's (float32 and bf16 logits, every kind of row)."""
    keys = torch.randint(0, 1 << 32, (8, 2), generator=torch.Generator().manual_seed(8))
    assert torch.equal(exp_noise(keys.to(test_device), 50000).cpu(), ref_noise(keys, 50000))
    logits, rs = mixed_batch(torch.Generator().manual_seed(9))
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        assert torch.equal(pick(x.to(test_device), rs).cpu(), pick(x, rs))
