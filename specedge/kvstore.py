"""Per-session KV buffers for the packed forward.

One session's keys and values live in one preallocated tensor [layers, 2, kv_heads, cap, dim].
A forward writes only its new tokens in place and attends over a view of the prefix, so a
step costs the tokens it verifies, never a copy of the whole cache (the buffer grows
geometrically, which amortises to O(1) copies per token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_GROW = 1.5
_ALIGN = 64


class SessionKV:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.shape = (layers, 2, kv_heads, 0, head_dim)
        self.dtype, self.device = dtype, device
        self.buf = torch.empty(self.shape, dtype=dtype, device=device)
        self.length = 0  # valid positions (committed context plus any tentative tail)

    @property
    def capacity(self) -> int:
        return self.buf.shape[3]

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        cap = max(length, int(self.capacity * _GROW))
        cap = (cap + _ALIGN - 1) // _ALIGN * _ALIGN
        layers, two, heads, _, dim = self.shape
        new = torch.empty((layers, two, heads, cap, dim), dtype=self.dtype, device=self.device)
        new[:, :, :, : self.length] = self.buf[:, :, :, : self.length]
        self.buf = new

    def keep(self, base: int, keep: Sequence[int]) -> None:
        """Keep positions base + keep[i] (in that order) right after `base`, drop the rest of
        the tail. This is the rollback after a verdict: rejected branches vanish, the
        accepted path becomes contiguous."""
        if any(not 0 <= k < self.length - base for k in keep):
            raise IndexError(f"keep indices {list(keep)} outside tail of {self.length - base}")
        idx = torch.as_tensor([base + k for k in keep], dtype=torch.long, device=self.device)
        if len(keep) and not torch.equal(idx, torch.arange(base, base + len(keep))):
            self.buf[:, :, :, base : base + len(keep)] = self.buf.index_select(3, idx)
        self.length = base + len(keep)

    def fork(self, base: int, keep: Sequence[int] = ()) -> SessionKV:
        """A new store holding positions [0, base) plus tail entries base + keep[i]. The edge
        forks its draft KV to draft ahead on a guess without touching the real one; the copy
        is of the draft's own prefix once per round, never on the verifier's path."""
        new = SessionKV.__new__(SessionKV)
        new.shape, new.dtype, new.device = self.shape, self.dtype, self.device
        n = base + len(keep)
        new.buf = torch.empty((*self.shape[:3], max(n, 1) + _ALIGN, self.shape[4]),
                              dtype=self.dtype, device=self.device)
        new.buf[:, :, :, :base] = self.buf[:, :, :, :base]
        if keep:
            idx = torch.as_tensor([base + k for k in keep], dtype=torch.long, device=self.device)
            new.buf[:, :, :, base:n] = self.buf.index_select(3, idx)
        new.length = n
        return new

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the valid prefix: [layers, kv_heads, length, dim] each."""
        return self.buf[:, 0, :, : self.length], self.buf[:, 1, :, : self.length]


def new_store(model) -> SessionKV:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    p = next(model.parameters())
    return SessionKV(cfg.num_hidden_layers, kv_heads, head_dim, p.dtype, p.device)
