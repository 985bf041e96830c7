"""FlexAttention straight over the KV pool: no gather, no padding of segments to the longest.

The keys are the whole pool viewed as one sequence of slots. One BlockMask per forward, built
from the block tables (not by evaluating a mask over every block pair): query block i (16
packed rows) visits the pool blocks of the segments its rows belong to, and the mask_mod maps
a (row, slot) pair to the row's segment and the slot's logical position there through an
inverse block table, then applies the row's visibility (all positions < upto, plus its tree
ancestors in the window). Shared by every layer of the forward.

On CUDA flex_attention is compiled; the per-forward sizes (rows, segments, tree width, blocks
per query block) are padded to powers of two so that a handful of compiled variants cover
every batch. On the CPU it runs eagerly (it materialises scores over the pool: for tests).

Per layer: a sliding window or chunk is a BlockMask of its own (same blocks, a mask_mod that
also compares path positions, see plan.py); soft-capping is a score_mod; sinks rescale the
output by sigmoid(lse - sink), which is the softmax with the sink's logit in its denominator.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from specedge.execution.plan import (
    PLAIN,
    PLAIN_LAYER,
    ForwardPlan,
    LayerAttention,
    MaskKind,
    tree_positions,
)

Q_BLOCK = 16
try:  # torch >= 2.9 asks for the log-sum-exp this way; return_lse is deprecated
    from torch.nn.attention.flex_attention import AuxRequest

    _LSE: dict = {"return_aux": AuxRequest(lse=True)}
except ImportError:
    _LSE = {"return_lse": True}
_compiled = None
# eager flex on the CPU is the test path; its "unfused implementation" warning is expected there
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def compiled() -> object:
    """flex_attention compiled for static shapes: every size it sees is a power-of-two bucket,
    so the variants stay few; allow enough of them before dynamo would fall back to eager."""
    global _compiled
    if _compiled is None:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        _compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return _compiled


# compile on CUDA (eager flex materialises scores); tests may compile on the CPU too
COMPILE_ON = {"cuda"}


def _flex(device: torch.device):
    return compiled() if device.type in COMPILE_ON else flex_attention


def _pad(x: torch.Tensor, n: int, value: int = 0) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    pad = torch.full((n - x.shape[0], *x.shape[1:]), value, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def qblock_kv_blocks(rows_per_seg: list[int], tables: list[list[int]], kv_len: list[int],
                     block_size: int, q_blocks: int) -> list[list[int]]:
    """For each query block (Q_BLOCK packed rows), the pool blocks of the segments among its
    rows, deduplicated (on the host: segments are contiguous runs of rows and their tables are
    small)."""
    n = sum(rows_per_seg)
    starts, r = [], 0
    for ln in rows_per_seg:
        starts.append(r)
        r += ln
    out: list[list[int]] = []
    s = 0
    for qb in range(q_blocks):
        lo, hi = qb * Q_BLOCK, min(n, (qb + 1) * Q_BLOCK)
        blocks: dict[int, None] = {}
        if lo < n:
            while s + 1 < len(starts) and starts[s + 1] <= lo:
                s += 1
            t = s
            while t < len(starts) and starts[t] < hi:
                blocks.update(dict.fromkeys(tables[t][: -(-kv_len[t] // block_size)]))
                t += 1
        out.append(list(blocks))
    return out


def fill_p2l(p2l: torch.Tensor, tables: torch.Tensor, kv_len: torch.Tensor,
             block_size: int) -> None:
    """Inverse block tables into p2l [>= S, pool blocks + 1]: p2l[s, physical block] = its
    logical block in segment s, -1 where the block is not segment s's."""
    s, nb = tables.shape
    dev = tables.device
    used = (kv_len + block_size - 1) // block_size
    valid = torch.arange(nb, device=dev)[None, :] < used[:, None]
    logical = torch.arange(nb, dtype=p2l.dtype, device=dev).expand(s, nb)
    p2l.fill_(-1)
    p2l[:s].scatter_(1, torch.where(valid, tables, p2l.shape[1] - 1),
                     torch.where(valid, logical, -1))


def make_mask_mod(p2l: torch.Tensor, seg_of: torch.Tensor, upto: torch.Tensor,
                  window: torch.Tensor, bits: torch.Tensor, block_size: int,
                  kind: MaskKind = PLAIN, pos: torch.Tensor | None = None,
                  tree_pos: torch.Tensor | None = None):
    """(row, slot) -> visible: the slot's logical position in the row's segment is below the
    row's `upto`, or one of its tree ancestors in the window; for a windowed or chunked
    layer also inside the row's window or chunk (pos: the rows' positions, tree_pos: the
    window columns' path positions, see plan.tree_positions). Captures the tensors, so a
    static plan can refill them in place."""
    b, w = block_size, bits.shape[1]
    win, chunk = kind

    def mask_mod(b_, h, q, kv):
        lb = p2l[seg_of[q], kv // b]
        j = lb * b + kv % b
        rel = j - window[q]
        relc = rel.clamp(0, w - 1)
        tree = (rel >= 0) & (rel < w) & bits[q, relc]
        vis = (lb >= 0) & ((j < upto[q]) | tree)
        if kind == PLAIN:
            return vis
        kp = torch.where(tree, tree_pos[q, relc], j)
        if win is not None:
            vis = vis & (kp > pos[q] - win)
        if chunk is not None:
            vis = vis & (kp // chunk == pos[q] // chunk)
        return vis

    return mask_mod


_softcaps: dict[float, object] = {}


def softcap_mod(cap: float):
    """The score_mod of attention-logit soft-capping (one function per value, so compiled
    variants are reused)."""
    if cap not in _softcaps:
        def score_mod(score, b, h, q, kv):
            return torch.tanh(score / cap) * cap

        _softcaps[cap] = score_mod
    return _softcaps[cap]


def _mask_inputs(plan: ForwardPlan) -> dict:
    """What every layer kind's BlockMask of this forward shares, built once per forward: the
    query blocks' pool blocks, the inverse block tables, the rows' metadata padded."""
    if "flex_inputs" in plan.cache:
        return plan.cache["flex_inputs"]
    pool = plan.pool
    dev = plan.ids.device
    b = pool.block_size
    n = plan.ids.numel()
    rows = _bucket(n, Q_BLOCK)
    per_q = qblock_kv_blocks(plan.host_rows, plan.host_tables, plan.host_kv_len, b,
                             rows // Q_BLOCK)
    width = _bucket(max(len(x) for x in per_q), 16)
    if dev.type == "cpu":
        width = max(width, pool.blocks)  # inductor's CPU kernel wants the whole KV axis
    idx = torch.tensor([x + [0] * (width - len(x)) for x in per_q], dtype=torch.int32)
    num = torch.tensor([len(x) for x in per_q], dtype=torch.int32)
    p2l = torch.empty((_bucket(plan.segments, 8), pool.blocks + 1), dtype=torch.int32,
                      device=dev)
    fill_p2l(p2l, plan.tables, plan.kv_len, b)
    # always a tree window (empty for chains), so chains and trees share compiled variants
    bits = plan.bits if plan.bits is not None else torch.zeros(n, 1, dtype=torch.bool, device=dev)
    w = _bucket(bits.shape[1], 16)
    bits = _pad(torch.nn.functional.pad(bits, (0, w - bits.shape[1])), rows, False)
    plan.cache["flex_inputs"] = inputs = dict(
        rows=rows, idx=idx.to(dev, non_blocking=True), num=num.to(dev, non_blocking=True),
        p2l=p2l, bits=bits, window=_pad(plan.window, rows), seg_of=_pad(plan.seg_of, rows),
        upto=_pad(plan.upto, rows), pos=_pad(plan.pos, rows))
    return inputs


def block_mask(plan: ForwardPlan, kind: MaskKind = PLAIN) -> tuple[BlockMask, int]:
    """The forward's BlockMask over (padded rows, pool slots) for layers of mask `kind`, and
    the padded row count."""
    x = _mask_inputs(plan)
    rows, b = x["rows"], plan.pool.block_size
    tree_pos = None if kind == PLAIN else tree_positions(x["window"], x["bits"])
    mask_mod = make_mask_mod(x["p2l"], x["seg_of"], x["upto"], x["window"], x["bits"], b, kind,
                             x["pos"], tree_pos)
    bm = BlockMask.from_kv_blocks(x["num"][None, None], x["idx"][None, None],
                                  BLOCK_SIZE=(Q_BLOCK, b), mask_mod=mask_mod,
                                  seq_lengths=(rows, plan.pool.capacity_tokens),
                                  compute_q_blocks=False)
    return bm, rows


def flex_pool_attention(layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, scale: float | None, plan: ForwardPlan,
                        attn: LayerAttention = PLAIN_LAYER) -> torch.Tensor:
    pool = plan.pool
    pool.write(layer, key[0], value[0], plan.slots)
    ck = ("flex", attn.mask)
    if ck not in plan.cache:
        plan.cache[ck] = block_mask(plan, attn.mask)
    bm, rows = plan.cache[ck]
    n = query.shape[2]
    q = query if rows == n else torch.nn.functional.pad(query, (0, 0, 0, rows - n))
    kv = pool.kv[layer]
    opts = None
    if query.device.type == "cuda":
        opts = {"BLOCK_M": Q_BLOCK, "BLOCK_N": pool.block_size, "FORCE_USE_FLEX_ATTENTION": True}
    score_mod = None if attn.softcap is None else softcap_mod(float(attn.softcap))
    lse = {} if attn.sinks is None else _LSE
    res = _flex(query.device)(q, kv[0].unsqueeze(0), kv[1].unsqueeze(0), score_mod=score_mod,
                              block_mask=bm, scale=scale,
                              enable_gqa=query.shape[1] != key.shape[1], kernel_options=opts,
                              **lse)
    if attn.sinks is None:
        return res[:, :, :n].transpose(1, 2)
    out, aux = res  # softmax over the keys and the sink logit: rescale by sigmoid(lse - sink)
    lse = aux if isinstance(aux, torch.Tensor) else aux.lse
    keep = torch.sigmoid(lse[:, :, :n] - attn.sinks.float().view(1, -1, 1))
    return (out[:, :, :n] * keep[..., None].to(out.dtype)).transpose(1, 2)
