"""Attention over the KV pool: one call per layer for every segment of a packed forward.

Each backend takes one layer's query [1, q_heads, N, dim] and the new tokens' key and value
[1, kv_heads, N, dim] (after RoPE), writes the new K/V into the pool with one scatter, and
returns the attention output [1, N, q_heads, dim] for the N packed rows.

- `sdpa` (the reference and the fallback, every device): gather each segment's keys and values
  into a padded batch [S, kv_heads, L, dim] and make one SDPA call. The query heads that share
  a KV head are folded into the query rows, so K/V are never repeated per query head and SDPA
  gets no `enable_gqa` (whose masked path is its math kernel, with fp32 scores materialised);
  the mask is one additive tensor built per forward, which SDPA's efficient kernels take. A
  single long causal run (a prefill alone in its forward) uses a lower-right causal bias and
  no mask at all.
- `flex` (CUDA): FlexAttention straight over the pool (no gather), with one BlockMask per
  forward built from the block tables; see `specedge/execution/flex.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from specedge.execution.plan import ForwardPlan

Backend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float | None, ForwardPlan],
                   torch.Tensor]

# A causal run longer than this, alone in its forward, skips the folded mask (whose size grows
# with rows x keys x query heads per KV head) for SDPA's lower-right causal bias.
PREFILL_ROWS = 32


def _folded_mask(plan: ForwardPlan, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[S, 1, group * M, L] additive mask for the folded queries (row g * M + r is query head
    g of the KV head, token r); padding rows see key 0 so that no row is all -inf."""
    key = ("mask", group, dtype)
    if key not in plan.cache:
        s, m, n_keys = plan.segments, plan.max_rows, plan.max_keys
        vis = plan.visible()
        padded = torch.zeros(s * m, n_keys, dtype=torch.bool, device=vis.device)
        padded[:, 0] = True
        padded[plan.out_index] = vis
        folded = padded.view(s, 1, m, n_keys).expand(s, group, m, n_keys)
        folded = folded.reshape(s, 1, group * m, n_keys)
        add = torch.zeros(folded.shape, dtype=dtype, device=vis.device)
        plan.cache[key] = add.masked_fill_(~folded, float("-inf"))
    return plan.cache[key]


def gather_sdpa(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float | None, plan: ForwardPlan) -> torch.Tensor:
    plan.pool.write(layer, key[0], value[0], plan.slots)
    s, m, n_keys = plan.segments, plan.max_rows, plan.max_keys
    hq, dim = query.shape[1], query.shape[3]
    hkv = key.shape[1]
    group = hq // hkv
    kidx = plan.key_index().reshape(-1)
    kv = plan.pool.kv[layer]
    k = kv[0].index_select(1, kidx).view(hkv, s, n_keys, dim).transpose(0, 1)
    v = kv[1].index_select(1, kidx).view(hkv, s, n_keys, dim).transpose(0, 1)
    if s == 1 and plan.chain_only and m > PREFILL_ROWS:
        if group > 1:
            k = k[:, :, None].expand(1, hkv, group, n_keys, dim).reshape(1, hq, n_keys, dim)
            v = v[:, :, None].expand(1, hkv, group, n_keys, dim).reshape(1, hq, n_keys, dim)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=causal_lower_right(m, n_keys),
                                             scale=scale)
        return out.transpose(1, 2)
    q = query[0].index_select(1, plan.q_index)  # [hq, s * m, dim], padding rows repeat row 0
    q = q.view(hkv, group, s, m, dim).permute(2, 0, 1, 3, 4).reshape(s, hkv, group * m, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=_folded_mask(plan, group, q.dtype),
                                         scale=scale)
    out = out.view(s, hkv, group, m, dim).permute(0, 3, 1, 2, 4).reshape(s * m, hq, dim)
    return out.index_select(0, plan.out_index).unsqueeze(0)


def backend_for(name: str, device: torch.device) -> tuple[str, Backend]:
    """'auto': flex on CUDA when this torch has it, else sdpa."""
    if name == "auto":
        name = "flex" if device.type == "cuda" and _has_flex() else "sdpa"
    if name == "sdpa":
        return name, gather_sdpa
    if name == "flex":
        from specedge.execution.flex import flex_pool_attention

        return name, flex_pool_attention
    raise ValueError(f"unknown attention backend {name!r}: use auto, sdpa or flex")


def _has_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True
