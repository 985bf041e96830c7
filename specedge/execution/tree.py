"""Draft-tree math as pure functions.

A tree of n nodes is given by `parents`: node i (1-based) hangs off parents[i-1], where 0 is
the root (the last committed token) and any other value is an earlier node. Index 0 always
means the root in every array below that includes it.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def ancestor_mask(parents: Sequence[int], *, include_root: bool = True) -> torch.Tensor:
    """Boolean [m, m] matrix, True where column j is row i itself or one of its ancestors.

    With include_root the root is row/column 0 (m = n + 1); otherwise only the n nodes, and
    every node implicitly sees the root through the context."""
    n = len(parents)
    m = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    m[0, 0] = True
    for i, p in enumerate(parents, start=1):
        m[i] = m[p]
        m[i, i] = True
    return m if include_root else m[1:, 1:]


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
