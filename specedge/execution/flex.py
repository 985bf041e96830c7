"""FlexAttention straight over the KV pool: no gather, no padding of segments to the longest.

The keys are the whole pool viewed as one sequence of slots. One BlockMask per forward and
layer kind, built from the block tables (not by evaluating a mask over every block pair):
each segment's rows start their own query blocks (qblocks.py), which list only that
segment's pool blocks, split into full blocks (no mask evaluated) and partial ones, trimmed
causally. The mask_mod maps a (row, slot) pair to the slot's logical position in the row's
segment through an inverse block table, then applies the row's visibility (all positions <
upto, plus its tree ancestors in the window).

On CUDA flex_attention is compiled, for a fixed ladder of padded row counts (qblocks.LADDER)
with every other shape fixed (the whole pool, MAX_SEGMENTS + 1 inverse tables, BITS tree
columns), all compiled at start-up (runner.warm_compile). On the CPU it runs eagerly (it
materialises scores over the pool: for tests), or compiled where tests ask for it.

Per layer: a sliding window or chunk is a BlockMask of its own (same blocks, a mask_mod that
also compares path positions, see plan.py); soft-capping is a score_mod; sinks rescale the
output by sigmoid(lse - sink), which is the softmax with the sink's logit in its denominator.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from specedge.execution.compiling import configure, limit_error, strict
from specedge.execution.plan import (
    PLAIN,
    PLAIN_LAYER,
    ForwardPlan,
    LayerAttention,
    MaskKind,
    tree_positions,
)
from specedge.execution.qblocks import MAX_SEGMENTS, Q_BLOCK, layout

BITS = 64  # tree-window columns of the mask inputs (the verifier's --max-nodes)
try:  # torch >= 2.9 asks for the log-sum-exp this way; return_lse is deprecated
    from torch.nn.attention.flex_attention import AuxRequest

    _LSE: dict = {"return_aux": AuxRequest(lse=True)}
except ImportError:
    _LSE = {"return_lse": True}
_compiled = None
# eager flex on the CPU is the test path; its "unfused implementation" warning is expected there
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def compiled() -> object:
    """flex_attention compiled for static shapes: every size it sees is a rung of the ladder
    (qblocks.LADDER), compiled at start-up; see compiling.py for the cache and the limit."""
    global _compiled
    if _compiled is None:
        configure()
        _compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    return _compiled


# compile on CUDA (eager flex materialises scores); tests may compile on the CPU too
COMPILE_ON = {"cuda"}


def _flex(device: torch.device):
    return compiled() if device.type in COMPILE_ON else flex_attention


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


def _device_idx(lists: list[list[int]], width: int, dev: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A query block's block lists as (count [qb], indices [qb, width]); only each row's
    prefix is written on the host and copied (entries past a count are never read)."""
    num = torch.tensor([len(x) for x in lists], dtype=torch.int32)
    w = max(1, max(len(x) for x in lists))
    small = torch.tensor([x + [0] * (w - len(x)) for x in lists], dtype=torch.int32)
    idx = torch.zeros(len(lists), width, dtype=torch.int32, device=dev)
    idx[:, :w] = small.to(dev, non_blocking=True)
    return num.to(dev, non_blocking=True), idx


def bits_width(w: int) -> int:
    """Tree-window columns of the mask inputs: BITS (a verifier's largest tree) or, for a
    wider edge tree, the next power of two (one more compiled shape)."""
    return max(BITS, 1 << max(0, w - 1).bit_length())


def _mask_inputs(plan: ForwardPlan) -> dict:
    """What every layer kind's BlockMask of this forward shares, built once per forward: the
    query layout (one segment per query block, see qblocks), the inverse block tables, the
    padded rows' metadata."""
    if "flex_inputs" in plan.cache:
        return plan.cache["flex_inputs"]
    pool = plan.pool
    dev = plan.ids.device
    kinds = sorted(plan.cache.get("kinds") or {PLAIN}, key=str)
    lay = layout(plan.cache["segments"], kinds, pool.block_size)
    src = torch.tensor(lay.src, dtype=torch.long).to(dev, non_blocking=True)
    qpos = torch.tensor(lay.qpos, dtype=torch.long).to(dev, non_blocking=True)
    p2l = torch.empty((MAX_SEGMENTS + 1, pool.blocks + 1), dtype=torch.int32, device=dev)
    fill_p2l(p2l, plan.tables, plan.kv_len, pool.block_size)
    n = plan.ids.numel()
    # always a tree window (empty for chains), so chains and trees share compiled shapes
    bits = plan.bits if plan.bits is not None else torch.zeros(n, 1, dtype=torch.bool, device=dev)
    bits = torch.nn.functional.pad(bits, (0, bits_width(bits.shape[1]) - bits.shape[1]))
    plan.cache["flex_inputs"] = inputs = dict(
        layout=lay, src=src, qpos=qpos, p2l=p2l, bits=bits.index_select(0, src),
        window=plan.window.index_select(0, src), seg_of=plan.seg_of.index_select(0, src),
        upto=plan.upto.index_select(0, src), pos=plan.pos.index_select(0, src))
    return inputs


def block_mask(plan: ForwardPlan, kind: MaskKind = PLAIN) -> BlockMask:
    """The forward's BlockMask over (padded query rows, pool slots) for layers of `kind`."""
    x = _mask_inputs(plan)
    lay, pool, dev = x["layout"], plan.pool, plan.ids.device
    if kind not in lay.partial:  # a kind the runner did not announce: lay it out too
        extra = layout(plan.cache["segments"], [kind], pool.block_size)
        lay.partial[kind], lay.full[kind] = extra.partial[kind], extra.full[kind]
    tree_pos = None if kind == PLAIN else tree_positions(x["window"], x["bits"])
    mask_mod = make_mask_mod(x["p2l"], x["seg_of"], x["upto"], x["window"], x["bits"],
                             pool.block_size, kind, x["pos"], tree_pos)
    num, idx = _device_idx(lay.partial[kind], pool.blocks, dev)
    fnum, fidx = _device_idx(lay.full[kind], pool.blocks, dev)
    return BlockMask.from_kv_blocks(num[None, None], idx[None, None], fnum[None, None],
                                    fidx[None, None], BLOCK_SIZE=(Q_BLOCK, pool.block_size),
                                    mask_mod=mask_mod,
                                    seq_lengths=(lay.rows, pool.capacity_tokens),
                                    compute_q_blocks=False)


def flex_pool_attention(layer: int, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, scale: float | None, plan: ForwardPlan,
                        attn: LayerAttention = PLAIN_LAYER) -> torch.Tensor:
    pool = plan.pool
    pool.write(layer, key[0], value[0], plan.slots)
    ck = ("flex", attn.mask)
    if ck not in plan.cache:
        plan.cache[ck] = block_mask(plan, attn.mask)
    bm = plan.cache[ck]
    if "src" not in plan.cache:  # a static plan brings its own
        x = _mask_inputs(plan)
        plan.cache["src"], plan.cache["qpos"] = x["src"], x["qpos"]
    src, qpos = plan.cache["src"], plan.cache["qpos"]
    q = query.index_select(2, src)  # one segment per query block (see qblocks)
    keys, values = pool.keys(layer), pool.values(layer)  # the layer's own shapes
    opts = None
    if query.device.type == "cuda":
        opts = {"BLOCK_M": Q_BLOCK, "BLOCK_N": pool.block_size, "FORCE_USE_FLEX_ATTENTION": True}
    score_mod = None if attn.softcap is None else softcap_mod(float(attn.softcap))
    lse = {} if attn.sinks is None else _LSE
    compile_ = query.device.type in COMPILE_ON
    try:
        with strict() if compile_ else contextlib.nullcontext():
            res = _flex(query.device)(q, keys.unsqueeze(0), values.unsqueeze(0),
                                      score_mod=score_mod, block_mask=bm, scale=scale,
                                      enable_gqa=query.shape[1] != key.shape[1],
                                      kernel_options=opts, **lse)
    except Exception as exc:
        err = limit_error(exc) if compile_ else None
        if err is not None:
            raise err from exc
        raise
    if attn.sinks is None:
        return res.index_select(2, qpos).transpose(1, 2)
    out, aux = res  # softmax over the keys and the sink logit: rescale by sigmoid(lse - sink)
    lse = aux if isinstance(aux, torch.Tensor) else aux.lse
    keep = torch.sigmoid(lse.index_select(2, qpos) - attn.sinks.float().view(1, -1, 1))
    return (out.index_select(2, qpos) * keep[..., None].to(out.dtype)).transpose(1, 2)
