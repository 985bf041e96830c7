"""Layers with recurrent state (gated delta rule, Mamba-2, short convolutions) in the packed
forward, exact on chains and trees, by running the model's own layer code.

In transformers 5.25 every such layer (Qwen3.5 and Qwen3-Next's GatedDeltaNet, OLMo hybrid,
Kimi Linear's delta attention, the Mamba-2 mixers of Nemotron-H, Falcon-H1, Bamba and Granite 4,
LFM2's ShortConv) takes `(hidden_states, cache=..., attention_mask=...)` and reads and writes
its state through the same cache calls (get/update_conv_state, get/update_recurrent_state). So
the packed forward replaces nothing of their math: `install` wraps each such module's forward,
and in a packed forward the wrapper calls the original on groups of the packed rows with a
small cache of its own (`StateCache`) holding each group row's starting state:

- a causal run of two or more rows at the start of a segment (a prefill, a prefill chunk, a
  catch-up) is one call of batch 1 from the sequence's state: the model's chunked kernel,
  carrying the state across chunks;
- every other row (a tree node, a one-token chain) starts from its predecessor's state (its
  tree parent, or the row before it): the rows are taken level by level, all segments' rows of
  one level in one call of batch n and length 1 (the model's one-step kernel).

Each row's successor reads the state the call left in the cache, so a node's state is its
parent's advanced by its own token; the states after tree nodes and after each segment's last
row are kept in the sequence's `SeqState` (statepool.py) for the verdict and the next forward.
Fast kernels the model may pick (flash-linear-attention, causal-conv1d) are used the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from specedge.execution.statepool import LayerState, SeqState

# source fragments of a layer forward that keeps state through the cache
_STATE_CALLS = ("get_conv_state", "get_recurrent_state", "causal_conv1d_forward")
# config layer types that carry recurrent or convolution state ("hybrid": Falcon-H1's layers
# run attention and a Mamba-2 mixer side by side), and those that carry none and call no
# attention
RECURRENT_TYPES = frozenset({"linear_attention", "conv", "hybrid"})
STATELESS_TYPES = frozenset({"mlp", "moe"})
# the prefix cache's state checkpoints: one every this many KV blocks of committed tokens (a
# causal run is cut there, one more kernel call each; a follow-up adopts up to the last one)
CHECKPOINT_BLOCKS = 4


def checkpoint_every(pool) -> int | None:
    """Positions between the state checkpoints a pool with a prefix cache keeps (every
    CHECKPOINT_BLOCKS blocks), or None when it caches nothing."""
    return pool.block_size * CHECKPOINT_BLOCKS if pool.caching else None


def keeps_state(module: torch.nn.Module) -> bool:
    """Whether `module`'s own forward reads recurrent state from the cache."""
    if not hasattr(module, "layer_idx"):
        return False
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return any(call in src for call in _STATE_CALLS)


def install(model) -> list[int]:
    """Wrap every stateful layer module of `model` (once); their layer indices, sorted."""
    layers = []
    for module in model.modules():
        if keeps_state(module):
            if not getattr(module, "_specedge_wrapped", False):
                orig = module.forward
                module.forward = _wrapped(module, orig)
                module._specedge_wrapped = True
            layers.append(int(module.layer_idx))
    return sorted(set(layers))


def _wrapped(module, orig):
    def forward(hidden_states, cache=None, attention_mask=None, **kw):
        plan = kw.pop("specedge_plan", None)
        if plan is None:  # the model's own forward (generate(), the probe's reference)
            return orig(hidden_states, cache=cache, attention_mask=attention_mask, **kw)
        return packed_state_forward(module, orig, hidden_states, plan, kw)

    return forward


class StateCache:
    """The cache calls a stateful layer makes, for one call over a group of rows: row i of
    the batch starts from `starts[i]` (None: a zero state, before a sequence's first token).
    After the call, `state(i)` is row i's state after its last token."""

    def __init__(self, layer: int, starts: list[LayerState | None]):
        self.layer = layer
        self.conv: dict[int, torch.Tensor] = {}
        self.rec: dict[int, torch.Tensor] = {}
        keys = next((s for s in starts if s is not None), None)
        if keys is not None:  # rows without a state start from zeros of the others' shape
            for (kind, idx), like in keys.items():
                t = torch.stack([like.new_zeros(like.shape) if s is None else s[(kind, idx)]
                                 for s in starts])
                (self.conv if kind == "conv" else self.rec)[idx] = t

    # -- what the model's layer calls (transformers.cache_utils.Cache, per layer) ------------

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.conv.get(state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        return self.rec.get(state_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None
                           ) -> bool:
        return bool(self.conv or self.rec)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kw) -> torch.Tensor:
        """As transformers' LinearAttentionLayer: the inputs with the state before them (or
        zero-padded to the kernel on a fresh sequence); the state keeps the last kernel's."""
        prev = self.conv.get(state_idx)
        if prev is None:
            k = conv_kernel_size or conv_states.shape[-1]
            full = conv_states
            if full.shape[-1] < k:
                full = torch.nn.functional.pad(full, (k - full.shape[-1], 0), value=0)
        else:
            k = prev.shape[-1]
            full = torch.cat([prev, conv_states], dim=-1)
        self.conv[state_idx] = full[..., -k:].clone()
        return full

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0,
                               **kw) -> torch.Tensor:
        if not isinstance(recurrent_states, torch.Tensor):
            recurrent_states = recurrent_states[-1]
        self.rec[state_idx] = recurrent_states
        return recurrent_states

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def increase_count(self, layer_idx: int, state_idx: int) -> None:
        pass

    # -- ours --------------------------------------------------------------------------------

    def state(self, i: int) -> LayerState:
        out = {("conv", k): v[i] for k, v in self.conv.items()}
        out.update({("rec", k): v[i] for k, v in self.rec.items()})
        return out


# where a row's starting state comes from: ("row", r) a row of this forward, ("pos", seq, p)
# the state a sequence holds after position p (p = -1: none yet)
Source = tuple


@dataclass
class RecurrentPlan:
    """Per packed forward, shared by the stateful layers: the causal runs (each from the
    sequence's state or the run before it), the other rows by level with their predecessors,
    which rows' states the sequences keep, and which are checkpoints of committed tokens at
    block boundaries (for the prefix cache)."""

    runs: list[tuple[int, int, Source]] = field(default_factory=list)  # first, end, start
    levels: list[list[tuple[int, Source]]] = field(default_factory=list)
    save: list[tuple[int, SeqState, int]] = field(default_factory=list)  # row, seq, position
    marks: list[tuple[int, SeqState, int]] = field(default_factory=list)


def _tree_pred(bits, r: int, col: int, window: int) -> int | None:
    """The logical position of row r's parent (its nearest ancestor column) if row r is a
    tree node (its own bit at `col`), else None."""
    if bits is None or not 0 <= col < bits.shape[1] or not bits[r, col]:
        return None
    above = bits[r, :col].nonzero()[0]
    return window + int(above[-1]) if len(above) else window - 1


def build(segments, every: int | None = None) -> RecurrentPlan:
    """every: checkpoint the state after each committed position p with (p + 1) % every == 0
    (causal runs are cut there); None: no checkpoints."""
    plan = RecurrentPlan()
    level_of: dict[int, int] = {}  # level rows' level; causal runs' rows: -1
    first = 0
    for seg in segments:
        st: SeqState = seg.seq.rec
        st.every = every
        n, m = seg.seq.length, len(seg.tokens)
        bits = seg.bits.numpy() if seg.bits is not None else None
        preds = [_tree_pred(bits, r, n + r - seg.window, seg.window) for r in range(m)]
        k = 0  # the causal rows before the tree's nodes (committed tokens)
        while k < m and preds[k] is None:
            k += 1
        if any(p is None for p in preds[k:]):
            raise ValueError("a segment's causal rows must come before its tree nodes")
        if k >= 2:
            cuts = [r + 1 for r in range(k - 1) if every and (n + r + 1) % every == 0]
            src: Source = ("pos", st, n - 1)
            for a, b in zip([0, *cuts], [*cuts, k], strict=True):
                plan.runs.append((first + a, first + b, src))
                src = ("row", first + b - 1)
            for r in range(first, first + k):
                level_of[r] = -1
        elif k == 1:
            _add_level(plan, level_of, first, ("pos", st, n - 1), 0)
        for r in range(k, m):
            q = preds[r]
            if q >= n:
                parent = first + q - n
                if level_of[parent] == -1 and parent != first + k - 1:
                    raise ValueError("a tree node's parent inside a causal run")
                _add_level(plan, level_of, first + r, ("row", parent), level_of[parent] + 1)
            else:
                _add_level(plan, level_of, first + r, ("pos", st, q), 0)
        # kept: the last causal row (the tree's root, or the sequence's new end) and every
        # tree node; checkpoints: the causal rows at block boundaries (ends of cut runs)
        for r in range(max(0, k - 1), m):
            plan.save.append((first + r, st, n + r))
        if every:
            plan.marks += [(first + r, st, n + r) for r in range(k) if (n + r + 1) % every == 0]
        first += m
    return plan


def _add_level(plan: RecurrentPlan, level_of: dict[int, int], row: int, src: Source,
               level: int) -> None:
    level_of[row] = level
    while len(plan.levels) <= level:
        plan.levels.append([])
    plan.levels[level].append((row, src))


def packed_state_forward(module, orig, hidden_states: torch.Tensor, plan, kw: dict
                         ) -> torch.Tensor:
    """`module`'s output for the packed rows [1, N, H], each row from its path's state."""
    rp = plan.cache.get("recurrent")
    if rp is None:
        rp = plan.cache["recurrent"] = build(plan.cache["segments"],
                                             checkpoint_every(plan.pool))
    layer = int(module.layer_idx)
    # per-row keywords of the packed batch (positions, ...) do not fit the groups' shapes
    kw = {k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)}
    h = hidden_states[0]
    out: torch.Tensor | None = None
    after: dict[int, LayerState] = {}  # row -> its state after this layer's call

    def place(rows, y):
        nonlocal out
        if out is None:
            out = y.new_empty((h.shape[0], y.shape[-1]))
        out[rows] = y

    for a, b, src in rp.runs:
        start = after[src[1]] if src[0] == "row" else src[1].get(src[2], layer)
        cache = StateCache(layer, [start])
        y = orig(h[a:b].unsqueeze(0), cache=cache, attention_mask=None, **kw)
        place(slice(a, b), y[0])
        after[b - 1] = cache.state(0)
    for level in rp.levels:
        rows = [r for r, _ in level]
        starts = [after[s[1]] if s[0] == "row" else s[1].get(s[2], layer) for _, s in level]
        cache = StateCache(layer, starts)
        idx = torch.tensor(rows, device=h.device)
        y = orig(h.index_select(0, idx).unsqueeze(1), cache=cache, attention_mask=None, **kw)
        place(idx, y[:, 0])
        for i, r in enumerate(rows):
            after[r] = cache.state(i)
    for r, st, pos in rp.save:
        st.put(pos, layer, after[r])
    for r, st, pos in rp.marks:
        st.marks.setdefault(pos, {})[layer] = after[r]
    return out.unsqueeze(0)
