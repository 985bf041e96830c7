"""Limits and tree shapes: configuration, not constants scattered in code."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What a verifier accepts from an edge. Anything beyond is rejected with a reason."""

    max_nodes: int = 64
    max_depth: int = 16
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    max_block_age_s: float = 300.0  # older drafts (e.g. left in the stream) are terminated


@dataclass(frozen=True)
class TreeShape:
    """How the edge grows its draft tree (best-first by draft log-probability, SpecExec-style).

    budget: nodes in the tree; depth: deepest node; width: nodes added per draft forward;
    topk: children considered per node. A chain of length g is budget=g, depth=g, width=1,
    topk=1."""

    budget: int = 8
    depth: int = 6
    width: int = 2
    topk: int = 2

    @classmethod
    def chain(cls, length: int) -> TreeShape:
        return cls(budget=length, depth=length, width=1, topk=1)

    def check(self) -> TreeShape:
        if min(self.budget, self.depth, self.width, self.topk) < 1:
            raise ValueError(f"tree shape values must be >= 1: {self}")
        return self
