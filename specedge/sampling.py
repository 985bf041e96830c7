"""The sampling transform shared by plain decoding and verification, and its seeded RNG.

Verification is lossless only if it samples from exactly the distribution plain decoding
would: one function defines that distribution for both.
"""

from __future__ import annotations

import hashlib

import torch

from schemas import Sampling


def probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Target distribution over the vocabulary for one or more rows of logits (T > 0).

    Order as in transformers' warpers: temperature, then top-k, then top-p (the smallest set
    of most likely tokens whose mass reaches top_p is kept, always at least one)."""
    x = logits.double() / s.temperature
    if s.top_k and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        p_sorted = sorted_x.softmax(-1)
        before = p_sorted.cumsum(-1) - p_sorted  # mass strictly before each token
        drop_sorted = before >= s.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x.softmax(-1)


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One token from one row of logits: argmax at temperature 0, else a draw from probs()."""
    if s.temperature <= 0:
        return int(torch.argmax(logits).item())
    p = probs(logits, s)
    return int(torch.multinomial(p, 1, generator=gen).item())


def round_generator(seed: int, round_no: int) -> torch.Generator:
    """A generator determined by (session seed, round), so a redelivered block gets the same
    verdict on any worker."""
    digest = hashlib.blake2b(f"{seed}:{round_no}".encode(), digest_size=8).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g
