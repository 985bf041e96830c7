"""The sampling transform shared by plain decoding and verification, and its seeded draws.

Verification is lossless only if it samples from exactly the distribution plain decoding
would: `warp` defines that distribution for both (temperature, then top-k, then top-p, as
transformers' warpers).

A draw must depend on (session seed, round, node) alone, so that a redelivered block gets the
same verdict on any worker and `replay --check` can repeat it. Draws use the exponential race
(Gumbel-max): argmax_i(log p_i - log E_i) with E_i ~ Exp(1) independent is an exact draw from
p. The E_i come from a counter-based integer hash of (row key, token id): the same bits on
every device, no generator state, float32 only (cheap on consumer GPUs), and every row of a
batch is drawn in one call. Within a tree each node has its own key, so the draws along any
root-to-leaf path are independent, which is what the walk's losslessness needs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from schemas import Sampling

_M32 = 0xFFFFFFFF
# rows per chunk of the [rows, vocab] integer noise: bounds its memory (int64) on big vocabularies
_NOISE_ELEMS = 1 << 24


def warp(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
         top_p: Sequence[float]) -> torch.Tensor:
    """Log-probabilities up to a per-row constant, -inf outside the kept set, for rows of
    logits [R, V] with per-row parameters (all temperatures > 0). Computed in float32 or the
    logits' dtype if wider (the exactness tests run in float64)."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    dev = logits.device
    x = logits.to(dt) / torch.tensor(temperature, dtype=dt, device=dev)[:, None]
    v = x.shape[-1]
    ks = [k if 0 < k < v else v for k in top_k]
    if all(k == v for k in ks) and all(p >= 1.0 for p in top_p):
        return x
    sx, order = torch.sort(x, dim=-1, descending=True)
    kth = sx.gather(1, torch.tensor(ks, device=dev)[:, None] - 1)
    drop = sx < kth  # top-k keeps ties with the k-th value, as TopKLogitsWarper
    sx = sx.masked_fill(drop, float("-inf"))
    p = sx.softmax(-1)
    before = p.cumsum(-1) - p  # mass strictly before each token in sorted order
    # top_p 1 is off: rounding can make the mass before the last tokens reach 1.0
    cut = [p if p < 1.0 else float("inf") for p in top_p]
    drop_p = before >= torch.tensor(cut, dtype=dt, device=dev)[:, None]
    drop_p[:, 0] = False  # always keep the most likely token
    drop |= drop_p
    return x.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The target distribution for one or more rows of logits under `s` (T > 0)."""
    rows = logits.reshape(-1, logits.shape[-1])
    n = rows.shape[0]
    p = warp(rows, [s.temperature] * n, [s.top_k] * n, [s.top_p] * n).softmax(-1)
    return p.reshape(logits.shape)


def round_key(seed: int, round_no: int) -> tuple[int, int]:
    """Two 32-bit words determined by (session seed, round)."""
    d = hashlib.blake2b(f"{seed}:{round_no}".encode(), digest_size=8).digest()
    return int.from_bytes(d[:4], "little"), int.from_bytes(d[4:], "little")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x < 2**32 held in int64, without signed overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def exp_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """E[r, i] ~ Exp(1), a function of (keys[r], i) only: keys [R, 2] int64 (32-bit words)."""
    dev = keys.device
    ids = torch.arange(vocab, dtype=torch.long, device=dev)
    h = _mix32((ids[None, :] ^ keys[:, :1]) & _M32)
    h = _mix32(h ^ keys[:, 1:])
    # w uniform in (0, 1), fine-grained near 0, where E = -log(1 - w) is small and decides
    # which unlikely token can win; near 1 the float32 grid is coarse, which only affects
    # how badly a token loses.
    w = ((h.to(torch.float32) + 0.5) * 2.0**-32).clamp_(max=1.0 - 2.0**-24)
    return -torch.log1p(-w)


@dataclass(frozen=True)
class RowSampling:
    """How to pick the next token at each of R rows of logits (a row is a tree node)."""

    temperature: list[float]  # <= 0: greedy
    top_k: list[int]
    top_p: list[float]
    keys: list[tuple[int, int]]  # per row; only used where temperature > 0

    @classmethod
    def for_tree(cls, s: Sampling, seed: int, round_no: int, rows: int) -> RowSampling:
        """Rows 0..rows-1 of one tree: node i's key mixes the round's key with i."""
        k0, k1 = round_key(seed, round_no)
        keys = [(k0, (k1 + 0x9E3779B9 * i) & _M32) for i in range(rows)]
        return cls([s.temperature] * rows, [s.top_k] * rows, [s.top_p] * rows, keys)

    @classmethod
    def concat(cls, parts: Sequence[RowSampling]) -> RowSampling:
        return cls(*(sum((getattr(p, f) for p in parts), []) for f in
                     ("temperature", "top_k", "top_p", "keys")))


def pick(logits: torch.Tensor, rs: RowSampling) -> torch.Tensor:
    """The next token at every row, on the logits' device, in one batched call: argmax where
    greedy, an exact seeded draw from warp() where sampled."""
    picks = logits.argmax(-1)
    rows = [i for i, t in enumerate(rs.temperature) if t > 0]
    if not rows:
        return picks
    step = max(1, _NOISE_ELEMS // logits.shape[-1])
    for a in range(0, len(rows), step):
        sel = rows[a : a + step]
        idx = torch.tensor(sel, dtype=torch.long, device=logits.device)
        x = warp(logits.index_select(0, idx), [rs.temperature[i] for i in sel],
                 [rs.top_k[i] for i in sel], [rs.top_p[i] for i in sel])
        keys = torch.tensor([rs.keys[i] for i in sel], dtype=torch.long, device=logits.device)
        e = exp_noise(keys, x.shape[-1])
        picks[idx] = (x - torch.log(e).to(x.dtype)).argmax(-1)
    return picks


def sample(logits: torch.Tensor, s: Sampling, key: tuple[int, int] = (0, 0)) -> int:
    """One token from one row of logits (a convenience over `pick`; one host transfer)."""
    rs = RowSampling([s.temperature], [s.top_k], [s.top_p], [key])
    return int(pick(logits.reshape(1, -1), rs)[0].item())
