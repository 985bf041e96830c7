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
        # budget 0 is plain decoding: the block carries the root only, the verdict one token
        if self.budget < 0 or min(self.depth, self.width, self.topk) < 1:
            raise ValueError(f"tree shape: budget must be >= 0, the others >= 1: {self}")
        return self

    def with_budget(self, budget: int) -> TreeShape:
        """This shape resized to `budget` nodes (a verifier's load hint): no deeper than the
        budget, and wider when the budget outgrows depth x width, so a bigger tree costs the
        edge more nodes per draft forward rather than more forwards."""
        b = max(0, budget)
        depth = max(1, min(self.depth, b))
        width = max(self.width, -(-b // depth))
        return TreeShape(b, depth, width, max(self.topk, min(width, 4)))


@dataclass(frozen=True)
class AdaptiveBudget:
    """The verifier's load hint: the tree budget it suggests in every verdict.

    The target forward costs about the same up to a knee of batch tokens and then grows with
    them (DESIGN section 7), so the verifier aims each batch at `batch_tokens`: with n sessions
    active, budget = batch_tokens / n - 1 nodes each, clamped to [lo, hi]. Few sessions: big
    trees (verification is nearly free); many: small ones (plain decoding's cost per token).
    batch_tokens 0 means: measure the knee when the verifier starts."""

    batch_tokens: int = 0  # 0: measure this machine's knee at start-up (workers/verifier)
    lo: int = 1
    hi: int = 16
    enabled: bool = True
