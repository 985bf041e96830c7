"""One forward of a causal LM over many sessions' new tokens, packed without padding.

Every session contributes a segment: its new tokens (committed tokens the cache lacks, then
draft-tree nodes), their positions, and a mask over the segment (the cached prefix is always
visible). The segments are concatenated into one row, so the weights run once for the whole
batch; attention is computed per segment against that session's own KV buffer. This is what
varlen attention kernels do; on the CPU a short loop over segments per layer is enough.

It plugs into transformers through `AttentionInterface`, so the model code is stock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from specedge.kvstore import SessionKV

ATTN_NAME = "specedge_packed"


@dataclass
class Segment:
    store: SessionKV
    tokens: torch.Tensor  # [m] long
    positions: torch.Tensor  # [m] long
    mask: torch.Tensor  # [m, tail + m] bool; tail = store.length - base at forward time
    base: int  # everything before this position is visible to every new token
    logits_at: list[int]  # indices into tokens whose next-token logits are wanted
    # filled in by the runner
    _start: int = field(default=0, repr=False)
    _full_mask: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class _Plan:
    segments: list[Segment]


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    plan: _Plan | None = kw.pop("specedge_plan", None)
    if plan is None:  # a plain forward (e.g. generate() on the same model): behave like sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw
        )
    layer = module.layer_idx
    out = torch.empty_like(query)
    for seg in plan.segments:
        s, m = seg._start, seg.tokens.numel()
        buf = seg.store.buf
        end = seg.store.length + m
        buf[layer, 0, :, seg.store.length : end] = key[0, :, s : s + m]
        buf[layer, 1, :, seg.store.length : end] = value[0, :, s : s + m]
        k = buf[layer, 0, :, :end].unsqueeze(0)
        v = buf[layer, 1, :, :end].unsqueeze(0)
        out[:, :, s : s + m] = F.scaled_dot_product_attention(
            query[:, :, s : s + m], k, v, attn_mask=seg._full_mask, scale=scaling,
            enable_gqa=k.shape[1] != query.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, _packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


class PackedRunner:
    """Owns a model; `forward` runs one packed step. Not re-entrant: one step at a time."""

    def __init__(self, model):
        self.model = model
        model.set_attn_implementation(ATTN_NAME)
        self.layer_types = sorted(set(getattr(model.config, "layer_types", None) or ["full_attention"]))
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.forward_calls = 0  # one per forward(); tests assert batching with it
        self._lock = threading.Lock()

    @torch.no_grad()
    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """Run one forward over all segments; returns per-segment logits [len(logits_at), V]
        (float32 or the model's dtype if wider). New tokens' KV is appended to each store."""
        if not segments:
            return []
        if len({id(s.store) for s in segments}) != len(segments):
            raise ValueError("a session may appear only once per packed forward")
        with self._lock:
            start, want = 0, []
            for seg in segments:
                m = seg.tokens.numel()
                tail = seg.store.length - seg.base
                if tail < 0 or seg.mask.shape != (m, tail + m):
                    raise ValueError(f"mask shape {tuple(seg.mask.shape)} != ({m}, {tail + m})")
                seg.store.reserve(seg.store.length + m)
                full = torch.ones(m, seg.store.length + m, dtype=torch.bool)
                full[:, seg.base :] = seg.mask
                seg._full_mask = full.to(seg.store.device)
                seg._start = start
                want.extend(start + i for i in seg.logits_at)
                start += m
            ids = torch.cat([s.tokens for s in segments]).unsqueeze(0)
            pos = torch.cat([s.positions for s in segments]).unsqueeze(0)
            device = segments[0].store.device
            out = self.model(
                input_ids=ids.to(device),
                position_ids=pos.to(device),
                attention_mask={t: None for t in self.layer_types},
                use_cache=False,
                logits_to_keep=torch.as_tensor(want, dtype=torch.long, device=device),
                specedge_plan=_Plan(segments),
            )
            self.forward_calls += 1
            for seg in segments:
                seg.store.length += seg.tokens.numel()
                seg._full_mask = None
            logits = out.logits[0]
            if logits.dtype in (torch.bfloat16, torch.float16):
                logits = logits.float()
            res, i = [], 0
            for seg in segments:
                res.append(logits[i : i + len(seg.logits_at)])
                i += len(seg.logits_at)
            return res
