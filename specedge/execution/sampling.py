"""The sampling transform shared by plain decoding and verification, and its seeded draws.

Verification is lossless only if it samples from exactly the distribution plain decoding
would: `warp` defines that distribution for both (temperature, then top-k, top-p and min-p, as
transformers' warpers). Every cut keeps the tokens at or above a value threshold of the
scaled row, so together they keep those above the largest of the thresholds; min-p's is the
row's maximum + log(min_p) (p >= min_p * max p), which the other cuts never remove.
History-dependent transforms (penalties, bias) come before, in `transforms`.

A draw must depend on (session seed, output position) alone, so that a redelivered block gets
the same verdict on any worker, `replay --check` can repeat it, and a seed gives one answer
whatever drafted it (`RowSampling.for_positions`). Draws use the exponential race
(Gumbel-max): argmax_i(log p_i - log E_i) with E_i ~ Exp(1) independent is an exact draw from
p. The E_i come from a counter-based integer hash of (row key, token id): the same bits on
every device, no generator state, float32 only (cheap on consumer GPUs), and every row of a
batch is drawn in one call. Within a tree each node has its own key, so the draws along any
root-to-leaf path are independent, which is what the walk's losslessness needs.

Cost: the kept set of a top-k/top-p row is a value threshold read off its largest values
(`torch.topk` of 64; 2048, then a full sort, for the few rows whose top-p set is longer), so
such a row reads its vocabulary a few times (scale, top-k, the softmax denominator) and races
only among its kept tokens, hashing just their ids. Only a row with neither cut hashes every
token, in row chunks, with 32-bit integer ops (the bits of the former int64 emulation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from schemas import Sampling

_M32 = 0xFFFFFFFF
# lowbias32's multipliers as int32 (two's complement): int32 products wrap mod 2**32 on every
# backend, which is the unsigned 32-bit product's bits
_C1 = 0x7FEB352D
_C2 = 0x846CA68B - (1 << 32)
# elements of a row chunk of full-vocabulary work (16 MB of float32: cache-sized)
_CHUNK = 1 << 22
# prefix lengths tried, in order, before a full sort: most top-p sets fit the first
_CAPS = (64, 2048)
_NEG = float("-inf")
_INF = float("inf")


def _scale(logits: torch.Tensor, temperature: Sequence[float]) -> torch.Tensor:
    """logits / T per row, in float32 or the logits' dtype if wider."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(dt) / torch.tensor(temperature, dtype=dt, device=logits.device)[:, None]


def _prefix(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest values of each row in descending order, and their ids."""
    if n >= x.shape[-1]:
        return torch.sort(x, dim=-1, descending=True)
    return torch.topk(x, n, dim=-1)


def _cut(vals: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, z_all: torch.Tensor,
         vocab: int, log_min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest kept value (keep x >= thr) and whether the prefix `vals` (a row's
    largest values, descending) decides it. k: top-k (vocab: off); top_p: inf when off;
    z_all: sum(exp(x - max)) over the whole row, used where top-k is off; log_min_p: -inf
    when off.

    Top-k keeps ties with the k-th value (TopKLogitsWarper); top-p keeps the longest run of
    the most likely tokens whose mass before each is < top_p, at least one (TopPLogitsWarper).
    A tie straddling the top-p cut is kept whole: the warpers' sort orders ties arbitrarily."""
    n = vals.shape[-1]
    k_on = k < vocab
    kth = vals.gather(1, (k.clamp(max=n) - 1)[:, None])[:, 0]
    kth = torch.where(k_on, kth, _NEG)
    e = torch.exp(vals - vals[:, :1]).masked_fill_(vals < kth[:, None], 0.0)
    z = torch.where(k_on, e.sum(-1), z_all)
    p = e / z[:, None]
    before = p.cumsum(-1) - p  # mass strictly before each token in sorted order
    drop = before >= top_p[:, None]
    drop[:, 0] = False  # always keep the most likely token
    first = torch.where(drop.any(-1), drop.to(torch.int8).argmax(-1), n)
    thr_p = vals.gather(1, (first - 1)[:, None])[:, 0]
    thr = torch.maximum(kth, torch.where(torch.isinf(top_p), _NEG, thr_p))
    thr = torch.maximum(thr, vals[:, 0] + log_min_p)
    # decided unless the kept set (or, with top-k, its tie run) may go on past the prefix
    done = vals[:, -1] < torch.where(k_on, kth, thr)
    return thr, done | (n >= vocab)


def _params(vocab: int, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float],
            dt, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k = torch.tensor([t if 0 < t < vocab else vocab for t in top_k], device=dev)
    # top_p 1 is off: rounding can make the mass before the last tokens reach 1.0
    p = torch.tensor([t if t < 1.0 else float("inf") for t in top_p], dtype=dt, device=dev)
    m = torch.tensor(list(min_p), dtype=dt, device=dev).log()  # 0: -inf, off
    return k, p, m


def _has_cut(vocab: int, top_k: int, top_p: float, min_p: float) -> bool:
    return 0 < top_k < vocab or top_p < 1.0 or min_p > 0.0


def _cap(n: int, top_k: Sequence[int], vocab: int) -> int:
    """A prefix of at least n that holds every row's top-k set and one more value."""
    return min(vocab, max([n] + [t + 1 for t in top_k if 0 < t < vocab]))


def _row_mass(x: torch.Tensor, vmax: torch.Tensor, top_k: Sequence[int],
              top_p: Sequence[float]) -> torch.Tensor:
    """sum(exp(x - max)) per row: the softmax denominator of the rows whose top-p cut needs
    the whole row's mass (top-k off); NaN when no row of x does."""
    if all(0 < k < x.shape[-1] or p >= 1.0 for k, p in zip(top_k, top_p, strict=True)):
        return torch.full_like(vmax, float("nan"))
    return (x - vmax[:, None]).exp_().sum(-1)


def _thresholds(x: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float],
                min_p: Sequence[float]) -> torch.Tensor:
    """Per row of x [R, V] (scaled logits), the smallest kept value; -inf keeps all."""
    rows, vocab = x.shape
    k, p, m = _params(vocab, top_k, top_p, min_p, x.dtype, x.device)
    thr = torch.full((rows,), _NEG, dtype=x.dtype, device=x.device)
    pending = torch.nonzero((k < vocab) | torch.isfinite(p) | torch.isfinite(m))[:, 0]
    for cap in [*_CAPS, vocab]:
        if not len(pending):
            break
        sub = x.index_select(0, pending)
        ks, ps = ([seq[i] for i in pending.tolist()] for seq in (top_k, top_p))
        vals, _ = _prefix(sub, _cap(cap, ks, vocab))
        t, done = _cut(vals, k[pending], p[pending], _row_mass(sub, vals[:, 0], ks, ps), vocab,
                       m[pending])
        thr[pending[done]] = t[done]
        pending = pending[~done]
    return thr


def warp(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
         top_p: Sequence[float], min_p: Sequence[float] | None = None) -> torch.Tensor:
    """Log-probabilities up to a per-row constant, -inf outside the kept set, for rows of
    logits [R, V] with per-row parameters (all temperatures > 0; min_p None: off). Computed
    in float32 or the logits' dtype if wider (the exactness tests run in float64)."""
    x = _scale(logits, temperature)
    thr = _thresholds(x, top_k, top_p, [0.0] * len(top_k) if min_p is None else min_p)
    return x.masked_fill(x < thr[:, None], _NEG)


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The target distribution for one or more rows of logits under `s` (T > 0)."""
    rows = logits.reshape(-1, logits.shape[-1])
    n = rows.shape[0]
    p = warp(rows, [s.temperature] * n, [s.top_k] * n, [s.top_p] * n, [s.min_p] * n).softmax(-1)
    return p.reshape(logits.shape)


def position_key(seed: int, position: int) -> tuple[int, int]:
    """Two 32-bit words determined by (session seed, output position)."""
    d = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(d[:4], "little"), int.from_bytes(d[4:], "little")


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on int32 holding 32-bit words: every input bit affects every output
    bit. >> is arithmetic on int32, so each shift is masked to be logical."""
    x ^= (x >> 16) & 0xFFFF
    x *= _C1
    x ^= (x >> 15) & 0x1FFFF
    x *= _C2
    x ^= (x >> 16) & 0xFFFF
    return x


def _signed32(keys: torch.Tensor) -> torch.Tensor:
    """32-bit words held in int64 as int32 with the same bits."""
    return torch.where(keys >= 1 << 31, keys - (1 << 32), keys).to(torch.int32)


def _exp_noise(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """E[r, j] ~ Exp(1), a function of (keys[r], ids[r, j]) only: keys [R, 2] int64 (32-bit
    words), ids [R or 1, n] (< 2**31)."""
    k = _signed32(keys)
    h = _mix32_(ids.to(torch.int32) ^ k[:, :1])
    h ^= k[:, 1:]
    h = _mix32_(h)
    # the word as float32, rounded once: high half * 2**16 is exact, so the sum rounds as a
    # direct conversion of the unsigned word would
    w = ((h >> 16) & 0xFFFF).to(torch.float32).mul_(65536.0).add_((h & 0xFFFF).to(torch.float32))
    # w uniform in (0, 1), fine-grained near 0, where E = -log(1 - w) is small and decides
    # which unlikely token can win; near 1 the float32 grid is coarse, which only affects
    # how badly a token loses.
    w = w.add_(0.5).mul_(2.0**-32).clamp_(max=1.0 - 2.0**-24)
    return w.neg_().log1p_().neg_()


def exp_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """E[r, i] ~ Exp(1) for token ids i < vocab, a function of (keys[r], i) only: keys [R, 2]
    int64 (32-bit words)."""
    return _exp_noise(keys, torch.arange(vocab, device=keys.device)[None, :])


def _race(x: torch.Tensor, ids: torch.Tensor | None, thr: torch.Tensor | None,
          keys: torch.Tensor) -> torch.Tensor:
    """_race_rows in row chunks, so that its integer temporaries stay cache-sized."""
    step = max(1, _CHUNK // x.shape[-1])
    if x.shape[0] <= step:
        return _race_rows(x, ids, thr, keys)
    return torch.cat([_race_rows(x[a : a + step], None if ids is None else ids[a : a + step],
                                 None if thr is None else thr[a : a + step], keys[a : a + step])
                      for a in range(0, x.shape[0], step)])


def _race_rows(x: torch.Tensor, ids: torch.Tensor | None, thr: torch.Tensor | None,
               keys: torch.Tensor) -> torch.Tensor:
    """Per row, argmax_j(x_j - log E(key, id_j)) over x_j >= thr: an exact draw from
    softmax(x) restricted there. ids None: x is the whole vocabulary (ids 0..V-1). Equal
    scores go to the smallest id, as a whole-row argmax would."""
    if thr is not None and ids is not None:  # a descending prefix: only its kept head races
        n = int((x >= thr[:, None]).sum(-1).max())
        x, ids = x[:, :n], ids[:, :n]
    col = ids if ids is not None else torch.arange(x.shape[-1], device=x.device)[None, :]
    score = x - torch.log(_exp_noise(keys, col)).to(x.dtype)
    if thr is not None:
        score.masked_fill_(x < thr[:, None], _NEG)
    if ids is None:
        return score.argmax(-1)
    best = score.amax(-1, keepdim=True)
    return torch.where(score == best, ids, torch.iinfo(ids.dtype).max).amin(-1)


@dataclass(frozen=True)
class RowSampling:
    """How to pick the next token at each of R rows of logits (a row is a tree node)."""

    temperature: list[float]  # <= 0: greedy
    top_k: list[int]
    top_p: list[float]
    keys: list[tuple[int, int]]  # per row; only used where temperature > 0
    min_p: list[float] | None = None  # None: 0 (off) on every row

    def __post_init__(self):
        if self.min_p is None:
            object.__setattr__(self, "min_p", [0.0] * len(self.temperature))

    @classmethod
    def for_positions(cls, s: Sampling, seed: int, positions: Sequence[int]) -> RowSampling:
        """One row per position of the sequence its pick would fill (a tree's root row fills
        len(C), a node at depth d fills len(C) + d). Keyed by (seed, position) alone, a draw
        never depends on the tree, the round or the drafter that proposed it: every committed
        token is the race at its own position, as plain decoding with the same keys would
        run it, so a seed gives one answer whatever drafts it (a model, suffix matches, a
        proactive guess, another budget). Each position's noise is independent of the
        others', and only one node per position is ever committed: the law is the target's."""
        memo = {p: position_key(seed, p) for p in set(positions)}
        rows = len(positions)
        return cls([s.temperature] * rows, [s.top_k] * rows, [s.top_p] * rows,
                   [memo[p] for p in positions], [s.min_p] * rows)

    @classmethod
    def concat(cls, parts: Sequence[RowSampling]) -> RowSampling:
        return cls(*(sum((getattr(p, f) for p in parts), []) for f in _FIELDS))

    def select(self, rows: Sequence[int]) -> RowSampling:
        return RowSampling(*([getattr(self, f)[i] for i in rows] for f in _FIELDS))


_FIELDS = ("temperature", "top_k", "top_p", "keys", "min_p")


def _keys(rs: RowSampling, dev) -> torch.Tensor:
    return torch.tensor(rs.keys, dtype=torch.long, device=dev).reshape(-1, 2)


def _full_races(logits: torch.Tensor, rows: list[int], rs: RowSampling) -> torch.Tensor:
    """Rows with no cut: every token races, in row chunks that stay in cache."""
    out = []
    step = max(1, _CHUNK // logits.shape[-1])
    for a in range(0, len(rows), step):
        sel = rows[a : a + step]
        x = _scale(logits[sel], [rs.temperature[i] for i in sel])
        out.append(_race(x, None, None, _keys(rs.select(sel), logits.device)))
    return torch.cat(out)


def _cut_level(logits: torch.Tensor, rows: list[int], rs: RowSampling, cap: int,
               out: torch.Tensor) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """One prefix length for rows with a cut (indices into `rs` and `out`): rescale in row
    chunks, take the prefix, and race the rows it decides among their kept tokens only.
    Returns the undecided rows, for each a bound on the mass of any token past the prefix
    (the prefix's mean: none past it is likelier than its last), and its top_p."""
    dev, vocab = logits.device, logits.shape[-1]
    sub = rs.select(rows)
    n = _cap(cap, sub.top_k, vocab)
    step = max(1, _CHUNK // vocab)
    vals, ids, mass = [], [], []
    for a in range(0, len(rows), step):
        x = _scale(logits[rows[a : a + step]], sub.temperature[a : a + step])
        v, i = _prefix(x, n)
        vals.append(v)
        ids.append(i)
        mass.append(_row_mass(x, v[:, 0], sub.top_k[a : a + step], sub.top_p[a : a + step]))
    v, i, z = torch.cat(vals), torch.cat(ids), torch.cat(mass)
    k, p, m = _params(vocab, sub.top_k, sub.top_p, sub.min_p, v.dtype, dev)
    thr, done = _cut(v, k, p, z, vocab, m)
    if done.any():
        idx = torch.tensor(rows, device=dev)[done]
        out[idx] = _race(v[done], i[done], thr[done], _keys(sub, dev)[done])
    left = torch.nonzero(~done)[:, 0]
    if not len(left):
        return [], v.new_empty(0), p[left]
    per_token = torch.exp(v[left] - v[left, :1]).sum(-1) / z[left] / n  # NaN if top-k is on
    # a min-p cut alone (z NaN, p inf) has no mass bound: try the second prefix (inf >= inf)
    per_token = torch.where(torch.isinf(p[left]) & (k[left] >= vocab), _INF, per_token)
    return [rows[j] for j in left.tolist()], per_token, p[left]


def _cut_races(logits: torch.Tensor, rows: list[int], rs: RowSampling,
               out: torch.Tensor) -> None:
    """Rows with top-k or top-p: the first prefix decides almost every row; the rest go to
    the second, or straight to a full sort where the first shows that the second cannot
    hold their top-p set."""
    rest, per_token, p = _cut_level(logits, rows, rs, _CAPS[0], out)
    fits = (per_token * _CAPS[1] >= p).tolist()  # NaN (a top-k tie run): False
    mid = [r for r, f in zip(rest, fits, strict=True) if f]
    rest = [r for r, f in zip(rest, fits, strict=True) if not f]
    if mid:
        rest += _cut_level(logits, mid, rs, _CAPS[1], out)[0]
    if rest:
        _cut_level(logits, sorted(rest), rs, logits.shape[-1], out)


def pick(logits: torch.Tensor, rs: RowSampling) -> torch.Tensor:
    """The next token at every row, on the logits' device, in one batched call: argmax where
    greedy, an exact seeded draw from warp() where sampled."""
    sampled = [i for i, t in enumerate(rs.temperature) if t > 0]
    if not sampled:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    picks = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = [i for i, t in enumerate(rs.temperature) if t <= 0]
    if greedy:
        picks[greedy] = logits[greedy].argmax(-1)
    cut = [i for i in sampled if _has_cut(vocab, rs.top_k[i], rs.top_p[i], rs.min_p[i])]
    free = [i for i in sampled if not _has_cut(vocab, rs.top_k[i], rs.top_p[i], rs.min_p[i])]
    if cut:
        _cut_races(logits, cut, rs, picks)
    if free:
        picks[free] = _full_races(logits, free, rs)
    return picks


def sample(logits: torch.Tensor, s: Sampling, key: tuple[int, int] = (0, 0)) -> int:
    """One token from one row of logits (a convenience over `pick`; one host transfer)."""
    rs = RowSampling([s.temperature], [s.top_k], [s.top_p], [key], [s.min_p])
    return int(pick(logits.reshape(1, -1), rs)[0].item())
