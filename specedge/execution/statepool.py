"""Recurrent state beside the KV pool: what a linear-attention (gated delta rule), state-space
(Mamba-2) or short-convolution layer carries from one token to the next.

A sequence's state lives per logical position: `SeqState.states[pos][layer]` is that layer's
state after the token at `pos` (its conv window and, where the layer has one, its recurrent
matrix), keyed by the names the model's own cache calls them ("conv", "rec", with the
model's state index). A forward stores the state after the last row of each segment and after
every tree node (recurrent.py), so a verdict keeps the accepted node's state by renaming a
position, and a fork takes one entry. Between forwards a sequence holds only the state at its
end (length - 1) plus the nodes of the tree it is drafting.

The verbs mirror `KVSeq`'s (pool.py calls them from its own): keep, fork, truncate, clear. A
truncate to a position whose state is not held (inside a chunked prefill, where only the
chunk's end state exists) answers False: the caller then rebuilds the sequence from its
tokens rather than continue from a wrong state.

With the prefix cache on, a sequence also keeps checkpoints (`marks`): its state after the
committed positions at block boundaries (every recurrent.CHECKPOINT_BLOCKS blocks). Publishing
its KV blocks files each checkpoint under its block's hash (`StatePool.checkpoints`, salted
like the block, dropped when the block leaves the cache), and a sequence adopting cached
blocks takes them up to the last one with a checkpoint, whose state it starts from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# one layer's state after one token: {("conv" | "rec", state index): tensor without batch dim}
LayerState = dict[tuple[str, int], torch.Tensor]


class StatePool:
    """Hands out `SeqState`s and counts what they hold (tests and the logs read it)."""

    def __init__(self, layers: Sequence[int]):
        self.layers = list(layers)  # the recurrent layers' indices
        self.rebuilds = 0  # truncations that could not keep a state: rebuilt from tokens
        # block hash -> the state after that block's last token (its KV block is cached)
        self.checkpoints: dict[bytes, dict[int, LayerState]] = {}

    def new(self) -> SeqState:
        return SeqState(self)


class SeqState:
    def __init__(self, pool: StatePool):
        self.pool = pool
        self.states: dict[int, dict[int, LayerState]] = {}
        self.marks: dict[int, dict[int, LayerState]] = {}  # checkpoints of committed tokens
        self.every: int | None = None  # the checkpoints' spacing, set by the forward

    def get(self, pos: int, layer: int) -> LayerState | None:
        """The state after `pos` (None: before the first token, a zero state)."""
        if pos < 0:
            return None
        try:
            return self.states[pos][layer]
        except KeyError:
            raise RuntimeError(f"no recurrent state held at position {pos} (layer {layer}): "
                               "the sequence must be rebuilt from its tokens") from None

    def put(self, pos: int, layer: int, state: LayerState) -> None:
        self.states.setdefault(pos, {})[layer] = state

    def _only(self, end: int) -> None:
        """Hold the state at `end` (the new last position) and nothing else."""
        kept = self.states.get(end)
        self.states = {} if kept is None else {end: kept}

    def keep(self, base: int, keep: Sequence[int]) -> None:
        """Mirror of KVSeq.keep: tail entry base + keep[i] becomes base + i; the state of the
        new last position is held (an accepted node's, or the one before the tail)."""
        end = base + len(keep) - 1
        src = base + keep[-1] if keep else base - 1
        kept = self.states.get(src)
        # accepted nodes at checkpoint positions become checkpoints (now committed)
        self.marks = {p: s for p, s in self.marks.items() if p <= end}
        for i, k in enumerate(keep):
            if self.every and (base + i + 1) % self.every == 0 and base + k in self.states:
                self.marks.setdefault(base + i, self.states[base + k])
        self.states = {} if kept is None else {end: kept}

    def fork(self, base: int, keep: Sequence[int]) -> SeqState:
        """Mirror of KVSeq.fork: a new state holding what the fork's last position needs."""
        new = SeqState(self.pool)
        new.every = self.every
        src = base + keep[-1] if keep else base - 1
        if src in self.states:
            new.states[base + len(keep) - 1] = self.states[src]
        new.marks = {p: s for p, s in self.marks.items() if p < base}
        return new

    def truncate(self, length: int) -> bool:
        """Hold only the state after length - 1; False if it is not held."""
        self.marks = {p: s for p, s in self.marks.items() if p < length}
        if length <= 0:
            self.states = {}
            return True
        if length - 1 not in self.states:
            return False
        self._only(length - 1)
        return True

    def clear(self) -> None:
        self.states, self.marks = {}, {}

    def adopt(self, end: int, state: dict[int, LayerState]) -> None:
        """Start an empty sequence from a checkpoint: the state after position `end`."""
        self.states = {end: state}
        self.marks = {end: state}

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for per_layer in [*self.states.values(), *self.marks.values()]:
            for st in per_layer.values():
                for t in st.values():
                    if id(t) not in seen:
                        seen.add(id(t))
                        total += t.numel() * t.element_size()
        return total
