"""Draft-tree math as pure functions.

A tree of n nodes is given by `parents`: node i (1-based) hangs off parents[i-1], where 0 is
the root (the last committed token) and any other value is an earlier node. Index 0 always
means the root in every array below that includes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class TreeError(ValueError):
    """A parent array that does not describe a tree rooted at the root."""


def validate_parents(parents: Sequence[int], max_depth: int | None = None) -> list[int]:
    """Check that parents form a tree (each parent is the root or an earlier node) and return
    the depth of every node (root excluded; children of the root have depth 1)."""
    depths: list[int] = []
    for i, p in enumerate(parents, start=1):
        if not 0 <= p < i:
            raise TreeError(f"node {i} has parent {p}; a parent must be the root (0) or an earlier node")
        d = 1 if p == 0 else depths[p - 1] + 1
        if max_depth is not None and d > max_depth:
            raise TreeError(f"node {i} is at depth {d}, deeper than the limit {max_depth}")
        depths.append(d)
    return depths


def depths_of(parents: Sequence[int]) -> list[int]:
    return validate_parents(parents)


def ancestor_bits(parents: Sequence[int]) -> list[int]:
    """Per node (root excluded), the set of its ancestors and itself as a Python int: bit j-1
    stands for node j. One int operation per node, whatever the tree's size."""
    bits = [0]  # the root: no node of its own
    for i, p in enumerate(parents, start=1):
        bits.append(bits[p] | 1 << (i - 1))
    return bits[1:]


def unpack_rows(masks: Sequence[int], width: int, lead: int = 0) -> np.ndarray:
    """Bool [lead + len(masks), width]: row lead + i has column j set where bit j of masks[i]
    is (each mask below 2**width); the first `lead` rows are all False. One unpack for all."""
    nb = (width + 7) // 8
    if nb == 0:
        return np.zeros((lead + len(masks), 0), dtype=np.bool_)
    raw = bytes(lead * nb) + b"".join(m.to_bytes(nb, "little") for m in masks)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(-1, nb)
    return np.unpackbits(rows, axis=1, count=width, bitorder="little").view(np.bool_)


def ancestor_mask(parents: Sequence[int], *, include_root: bool = True) -> torch.Tensor:
    """Boolean [m, m] matrix, True where column j is row i itself or one of its ancestors.

    With include_root the root is row/column 0 (m = n + 1); otherwise only the n nodes, and
    every node implicitly sees the root through the context."""
    masks = ancestor_bits(parents)
    if include_root:  # the root is bit 0 and every node's ancestor
        masks = [1] + [m << 1 | 1 for m in masks]
    return torch.from_numpy(unpack_rows(masks, len(masks)))


def children_map(tokens: Sequence[int], parents: Sequence[int]) -> list[dict[int, int]]:
    """For each of root + nodes, token -> child index. First child wins on a duplicate token,
    which keeps the walk deterministic (duplicates only waste budget)."""
    kids: list[dict[int, int]] = [dict() for _ in range(len(parents) + 1)]
    for i, (tok, p) in enumerate(zip(tokens, parents, strict=True), start=1):
        kids[p].setdefault(int(tok), i)
    return kids


def path_to(node: int, parents: Sequence[int]) -> list[int]:
    """Node indices from the root's child down to `node` (empty for the root)."""
    path = []
    while node != 0:
        path.append(node)
        node = parents[node - 1]
    return path[::-1]
