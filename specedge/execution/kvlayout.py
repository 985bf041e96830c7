"""What each layer's KV cache holds: found by watching the model's own attention calls.

Models of 2026 no longer have one KV shape: Gemma 4's global layers have larger heads (and
fewer of them) than its sliding ones, MLA (DeepSeek V3, Kimi K2, MiniCPM3, GLM-MoE-lite)
hands attention keys of qk_nope + qk_rope and values of v_head_dim, some layers hand over
another layer's keys and values (Gemma 3n and Gemma 4 `kv_sharing`), and a config may keep
head sizes per layer (transformers' heterogeneous configs, which refuse a global read).
Rather than reading each family's config, `discover` runs one two-token forward in which
every attention call records the key and value it receives (after RoPE, norms, the MLA
up-projection: what the packed attention will store) and returns zeros. A layer handed the
very tensors an earlier layer was handed reads that layer's KV and stores none.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from specedge.execution.unsupported import refuse

RECORD = "specedge_kv_shapes"  # the attention implementation of the discovery forward


@dataclass(frozen=True)
class LayerKV:
    """One layer's KV per token: heads (keys and values have as many), key and value widths."""

    heads: int
    key_dim: int
    value_dim: int
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        return self.heads * (self.key_dim + self.value_dim) * _element_size(self.dtype)


@dataclass(frozen=True)
class KVLayout:
    """The KV of a model's layers: `shapes` of the layers that store theirs, `shares` of those
    that read an earlier layer's (layer -> that layer, which stores it). A layer in neither
    has no KV (its attention is not through the pool: refused at load, or state of another
    kind)."""

    layers: int
    shapes: Mapping[int, LayerKV]
    shares: Mapping[int, int] = field(default_factory=dict)

    @classmethod
    def uniform(cls, layers: int, heads: int, dim: int, dtype: torch.dtype) -> KVLayout:
        return cls(layers, {i: LayerKV(heads, dim, dim, dtype) for i in range(layers)})

    @property
    def bytes_per_token(self) -> int:
        """The sum of the storing layers' sizes (shared layers add nothing)."""
        return sum(s.bytes_per_token() for s in self.shapes.values())

    def source(self, layer: int) -> int:
        """The layer whose stored KV `layer` reads (itself unless it shares)."""
        return self.shares.get(layer, layer)

    def shape_of(self, layer: int) -> LayerKV | None:
        return self.shapes.get(self.source(layer))

    def groups(self) -> dict[LayerKV, list[int]]:
        """Storing layers by shape, in layer order: one pool tensor per shape."""
        out: dict[LayerKV, list[int]] = {}
        for layer in sorted(self.shapes):
            out.setdefault(self.shapes[layer], []).append(layer)
        return out

    def describe(self) -> str:
        """E.g. '4 x (1 heads, k 32, v 32), 2 shared' (logs and messages)."""
        parts = [f"{len(ls)} x ({s.heads} heads, k {s.key_dim}, v {s.value_dim})"
                 for s, ls in self.groups().items()]
        if self.shares:
            parts.append(f"{len(self.shares)} shared")
        return ", ".join(parts) or "no KV"


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _recording_attention(module, query, key, value, attention_mask, **kw):
    """Note what the call receives; return zeros of the output's shape (the values of the
    discovery forward are never used)."""
    record = kw.get("specedge_record")
    if record is not None:
        record.append((getattr(module, "layer_idx", None), key, value))
    out = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    return out, None


AttentionInterface.register(RECORD, _recording_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(RECORD, sdpa_mask)
_found: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> KVLayout
_lock = threading.Lock()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor handed over again (not equal values: the same memory and view)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def layout_from_calls(layers: int, calls: list) -> KVLayout:
    """The layout from the discovery forward's (layer index, key, value) per attention call
    (the tensors still alive, so equal addresses mean the same tensor). Raises ValueError
    for what the pool cannot hold."""
    shapes: dict[int, LayerKV] = {}
    shares: dict[int, int] = {}
    stored: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for layer, key, value in calls:
        if not isinstance(layer, int):
            raise ValueError("an attention module carries no layer index")
        if layer in shapes or layer in shares:
            raise ValueError(f"layer {layer} calls attention more than once per forward")
        if key.dim() != 4 or value.dim() != 4 or key.shape[1] != value.shape[1]:
            raise ValueError(f"layer {layer} hands attention keys {tuple(key.shape)} and values "
                             f"{tuple(value.shape)}: not [batch, heads, tokens, width] of one "
                             "head count")
        src = next((s for s, k, v in stored if _same(k, key) and _same(v, value)), None)
        if src is not None:
            shares[layer] = src
            continue
        shapes[layer] = LayerKV(key.shape[1], key.shape[3], value.shape[3], key.dtype)
        stored.append((layer, key, value))
        if value.dtype != key.dtype:
            raise ValueError(f"layer {layer}'s keys and values differ in dtype")
    return KVLayout(layers, shapes, shares)


def remember(model, layout: KVLayout) -> None:
    """`layout` as model's, found earlier (checkcache.py): `discover` returns it, no forward."""
    with _lock:
        _found[model] = layout


@torch.no_grad()
def discover(model) -> KVLayout:
    """Each layer's KV as the model's attention calls receive it (cached per model). Raises
    UnsupportedModel when that forward fails (callers check the config first: its refusals
    say more)."""
    with _lock:
        if model in _found:
            return _found[model]
        config = model.config
        before = config._attn_implementation
        calls: list = []
        dev = next(model.parameters()).device
        try:
            model.set_attn_implementation(RECORD)
            model(input_ids=torch.tensor([[0, 1]], device=dev), use_cache=False,
                  logits_to_keep=1, specedge_record=calls)
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            found = layout_from_calls(text.num_hidden_layers, calls)
        except Exception as exc:  # whatever breaks, it is this model on this path
            raise refuse(config, f"the forward that finds its layers' key/value shapes fails "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from exc
        finally:
            model.set_attn_implementation(before)
            calls.clear()
        _found[model] = found
        return found
