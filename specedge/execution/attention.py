"""Attention over the KV pool: one call per layer for every segment of a packed forward.

Each backend takes one layer's query [1, q_heads, N, dim] and the new tokens' key and value
[1, kv_heads, N, dim] and [1, kv_heads, N, value_dim] (after RoPE; MLA's values are narrower
than its keys), writes the new K/V into the pool with one scatter, and returns the attention
output [1, N, q_heads, value_dim] for the N packed rows.

- `sdpa` (the reference and the fallback, every device): gather the short segments' (draft
  trees, catch-ups) keys and values into a padded batch [S, kv_heads, L, dim] and make one
  SDPA call. The query heads that share a KV head are folded into the query rows, so K/V are
  never repeated per query head and SDPA gets no `enable_gqa` (whose masked path is its math
  kernel, with fp32 scores materialised); the mask is one additive tensor built per forward,
  which SDPA's efficient kernels take. A long segment (a prefill) is not padded into that
  batch: it gets a call of its own, with a lower-right causal bias (no mask at all) when it
  is a plain causal run.
- `flex` (CUDA): FlexAttention straight over the pool (no gather), with one BlockMask per
  forward built from the block tables; see `specedge/execution/flex.py`.

Per layer (`LayerAttention`): sliding windows and chunks narrow the mask (one mask per kind
and forward, shared by the layers of that kind); soft-capping and attention sinks change the
scores, which SDPA cannot express, so the gathered backend computes those layers' attention
explicitly (the same gather and mask, scores materialised), and says so once in the log.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from specedge.execution.plan import PLAIN, PLAIN_LAYER, ForwardPlan, LayerAttention, MaskKind

Backend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float | None, ForwardPlan,
                    LayerAttention], torch.Tensor]
log = structlog.get_logger(__name__)
_said: set[str] = set()


def once(event: str, **kw) -> None:
    """Log `event` the first time only (per process)."""
    if event not in _said:
        _said.add(event)
        log.info(event, **kw)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float | None,
           layer: LayerAttention, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA, or for a layer with soft-capped scores or sinks the same attention computed
    explicitly (softmax in float32, as transformers' eager attention): `mask` additive
    (broadcast over heads) or SDPA's causal bias; `sinks` broadcast to [..., rows, 1]."""
    if layer.plain_scores:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    once("attention computed explicitly for soft-capped or sink layers (SDPA has neither)",
         softcap=layer.softcap, sinks=layer.sinks is not None)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5
                                                                if scale is None else scale)
    if layer.softcap is not None:
        s = torch.tanh(s / layer.softcap) * layer.softcap
    if mask is not None:
        s = s + mask
    if sinks is not None:
        lse = torch.logsumexp(torch.cat([s, sinks.float().expand(*s.shape[:-1], 1)], -1), -1,
                              keepdim=True)
    else:
        lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.matmul(torch.exp(s - lse), v.float()).to(v.dtype)


def _short_mask(plan: ForwardPlan, n_keys: int, group: int, dtype: torch.dtype,
                kind: MaskKind) -> torch.Tensor:
    """[Ss, 1, group * M, L] additive mask for the short segments' folded queries (row
    g * M + r is query head g of the KV head, token r); padding rows see key 0 so that no
    row is all -inf."""
    key = ("mask", group, dtype, kind)
    if key not in plan.cache:
        s, m = plan.short_segs.numel(), plan.short_max_rows
        vis = plan.visible(plan.short_rows, n_keys, kind)
        padded = torch.zeros(s * m, n_keys, dtype=torch.bool, device=vis.device)
        padded[:, 0] = True
        padded[plan.out_index] = vis
        folded = padded.view(s, 1, m, n_keys).expand(s, group, m, n_keys)
        folded = folded.reshape(s, 1, group * m, n_keys)
        add = torch.zeros(folded.shape, dtype=dtype, device=vis.device)
        plan.cache[key] = add.masked_fill_(~folded, float("-inf"))
    return plan.cache[key]


def _attend_short(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor,
                  scale: float | None, plan: ForwardPlan, layer: LayerAttention,
                  out: torch.Tensor) -> None:
    """Every short segment in one SDPA call: queries padded to M rows, the query heads of a
    KV head folded into the rows, keys gathered and padded to the longest short segment."""
    s, m = plan.short_segs.numel(), plan.short_max_rows
    hq, dim, vdim = query.shape[1], query.shape[3], values.shape[2]
    hkv = keys.shape[0]
    group = hq // hkv
    n_keys = max(plan.host_kv_len[i] for i in range(plan.segments)
                 if plan.host_rows[i] <= plan.short_max_rows)
    if "short_keys" not in plan.cache:
        plan.cache["short_keys"] = plan.key_index(plan.short_segs, n_keys).reshape(-1)
    kidx = plan.cache["short_keys"]
    k = keys.index_select(1, kidx).view(hkv, s, n_keys, dim).transpose(0, 1)
    v = values.index_select(1, kidx).view(hkv, s, n_keys, vdim).transpose(0, 1)
    q = query[0].index_select(1, plan.q_index)  # [hq, s * m, dim]
    q = q.view(hkv, group, s, m, dim).permute(2, 0, 1, 3, 4).reshape(s, hkv, group * m, dim)
    sinks = None
    if layer.sinks is not None:  # folded like the queries: row g * M + r is head kv * group + g
        sinks = layer.sinks.view(1, hkv, group, 1, 1).expand(1, hkv, group, m, 1)
        sinks = sinks.reshape(1, hkv, group * m, 1)
    mask = _short_mask(plan, n_keys, group, q.dtype if layer.plain_scores else torch.float32,
                       layer.mask)
    o = attend(q, k, v, mask, scale, layer, sinks)
    o = o.view(s, hkv, group, m, vdim).permute(0, 3, 1, 2, 4).reshape(s * m, hq, vdim)
    out.index_copy_(0, plan.short_rows, o.index_select(0, plan.out_index))


def _attend_long(keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor,
                 scale: float | None, plan: ForwardPlan, seg: int, first: int, m: int,
                 layer: LayerAttention, out: torch.Tensor) -> None:
    """One long segment (a prefill) alone: K/V repeated per query head (small next to the
    quadratic attention), and no mask at all for a pure causal run of a plain layer (a
    lower-right causal bias), else one [m, L] mask shared by the heads."""
    hq, dim, vdim = query.shape[1], query.shape[3], values.shape[2]
    hkv = keys.shape[0]
    group = hq // hkv
    n_keys = plan.host_kv_len[seg]
    bias = plan.chain_only[seg] and layer.mask == PLAIN and layer.plain_scores
    dtype = query.dtype if layer.plain_scores else torch.float32
    key = ("long", seg, layer.mask, bias, dtype)
    if key not in plan.cache:
        segs = torch.tensor([seg], device=query.device)
        kidx = plan.key_index(segs, n_keys).reshape(-1)
        if bias:
            mask = causal_lower_right(m, n_keys)
        else:
            rows = torch.arange(first, first + m, device=query.device)
            vis = plan.visible(rows, n_keys, layer.mask)
            mask = torch.zeros(vis.shape, dtype=dtype, device=query.device)
            mask = mask.masked_fill_(~vis, float("-inf"))[None, None]
        plan.cache[key] = (kidx, mask)
    kidx, mask = plan.cache[key]
    k = keys.index_select(1, kidx)  # [hkv, L, dim]
    v = values.index_select(1, kidx)
    if group > 1:
        k = k[:, None].expand(hkv, group, n_keys, dim).reshape(hq, n_keys, dim)
        v = v[:, None].expand(hkv, group, n_keys, vdim).reshape(hq, n_keys, vdim)
    sinks = None if layer.sinks is None else layer.sinks.view(1, hq, 1, 1)
    o = attend(query[:, :, first : first + m], k[None], v[None], mask, scale, layer, sinks)
    out[first : first + m] = o[0].transpose(0, 1)


def gather_sdpa(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float | None, plan: ForwardPlan,
                attn: LayerAttention = PLAIN_LAYER) -> torch.Tensor:
    pool = plan.pool
    pool.write(layer, key[0], value[0], plan.slots)
    keys, values = pool.keys(layer), pool.values(layer)
    out = torch.empty(query.shape[2], query.shape[1], values.shape[2], dtype=query.dtype,
                      device=query.device)
    if plan.short_max_rows:
        _attend_short(keys, values, query, scale, plan, attn, out)
    for seg, first, m in plan.long:
        _attend_long(keys, values, query, scale, plan, seg, first, m, attn, out)
    return out.unsqueeze(0)


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
