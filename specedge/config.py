"""Limits and tree shapes: configuration, not constants scattered in code."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Limits:
    """What a verifier accepts from an edge. Anything beyond is rejected with a reason.
    Every field is also a verifier flag (--max-nodes ...) of the same name."""

    max_nodes: int = 64
    max_depth: int = 16
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    # context positions a session may use (prompt + generated + draft tree): 0 means the target
    # model's max_position_embeddings; a lower value caps the context (and the KV it needs)
    max_positions: int = 0
    max_block_age_s: float = 300.0  # older drafts (e.g. left in the stream) are terminated
    # bodies larger than this are refused before decoding (the broker's max_payload is the
    # outer bound; a 64-node block is well under 1 KiB, an 8k-token prompt 32 KiB)
    max_message_bytes: int = 64 * 1024
    max_eos_ids: int = 64
    max_model_name_chars: int = 256
    min_temperature: float = 1e-3  # 0 (greedy) or at least this: 1e-300 overflows the logits
    max_temperature: float = 100.0
    # Per edge (the first token of the session id, i.e. one set of credentials). Sessions are
    # counted fleet-wide (every verifier sees every open and close); rounds per second are a
    # token bucket per verifier. Generous defaults: an operator tightens them per deployment.
    max_sessions_per_edge: int = 256
    edge_rounds_per_s: float = 1000.0
    edge_rounds_burst: int = 2000
    session_idle_s: float = 600.0  # an open session silent this long stops counting

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Limits:
        return cls(**{f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)})


_LIMIT_HELP = {
    "max_nodes": "draft tree nodes per block",
    "max_depth": "draft tree depth",
    "max_prompt_tokens": "prompt length at session open",
    "max_new_tokens": "max_new_tokens a session may ask for",
    "max_positions": "context positions per session (0: the target model's own)",
    "max_block_age_s": "seconds after which a queued block is terminated unverified",
    "max_message_bytes": "largest message body accepted (refused before decoding)",
    "max_eos_ids": "stop tokens per session",
    "max_model_name_chars": "length of the model names in a session opening",
    "min_temperature": "smallest non-zero sampling temperature",
    "max_temperature": "largest sampling temperature",
    "max_sessions_per_edge": "sessions one edge may have open at once (fleet-wide)",
    "edge_rounds_per_s": "rounds per second one edge may send to this verifier",
    "edge_rounds_burst": "burst size of the per-edge round rate",
    "session_idle_s": "an open session silent this long no longer counts against its edge",
}


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """One flag per Limits field (--max-nodes, ...), dest = the field name."""
    for f in fields(Limits):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                       default=f.default, help=f"{_LIMIT_HELP[f.name]} (default {f.default})")


def positions_needed(prompt_tokens: int, new_tokens: int, depth: int) -> int:
    """Context positions a session can touch: its prompt, every generated token but the last
    (no forward ever sees it) and, hanging off the last committed token, a draft tree `depth`
    deep. The edge admits a session only if this fits the models' positions; the verifier
    refuses a block whose deepest node lies beyond them."""
    return prompt_tokens + new_tokens - 1 + depth


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


# -- suffix drafts (specedge/edge/suffixdraft.py): the names the flags need, importable
# without the model code

SUFFIX = "suffix"  # the draft "model" name of a model-free edge
SUFFIX_DEPTH = 16  # a model-free edge's deepest node by default (the verifiers' max_depth)


def is_suffix(ref: str | None) -> bool:
    return ref == SUFFIX


@dataclass(frozen=True)
class SuffixConfig:
    """How suffix branches join a model's tree. min_match: the shortest match (tokens of the
    context's tail) that adds branches, 0: off; full_run: a match or copy run this long whose
    branches fill the whole budget takes it (the model's tree would only repeat it); max_depth:
    how deep they may reach."""

    min_match: int = 4
    full_run: int = 12
    # the deepest suffix node (a copied span runs past the model's depth; at most the
    # verifiers' max_depth, which callers pass when they know it)
    max_depth: int = SUFFIX_DEPTH

    @property
    def on(self) -> bool:
        return self.min_match > 0


def suffix_shape(shape: TreeShape, max_budget: int) -> TreeShape:
    """A model-free edge's shape: as deep as its budget allows (a copied span is a chain; the
    verifiers' default max_depth is 16), width and topk do not apply."""
    return TreeShape(shape.budget, max(shape.depth, min(SUFFIX_DEPTH, max_budget)),
                     shape.width, shape.topk).check()
