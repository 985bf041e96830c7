"""The acceptance rule (token matching) and the commit rule, as pure functions.

Walk the tree from the root: take the target's pick y at the current node (argmax, or a
seeded draw from its distribution); if a child carries y, descend, else stop. Every y is an
honest sample of the target given the committed prefix, so the output follows the target's
distribution whatever the draft proposed, and no draft probabilities are needed.

The picks of every node are made before the walk, in one batched call for the whole forward
(`sampling.pick`); each node's draw has its own key, so the draws along the walked path are
independent and the walk itself is plain host code with no device round trips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specedge.execution.tree import children_map


@dataclass(frozen=True)
class WalkResult:
    accepted: list[int]  # node indices along the accepted path (root excluded)
    next_token: int  # the last pick: a correction, or a bonus past the tree's end
    bonus: bool


def walk(tokens: Sequence[int], parents: Sequence[int], picks: Sequence[int]) -> WalkResult:
    """`picks[0]` is the target's pick at the root, `picks[i]` at node i."""
    kids = children_map(tokens, parents)
    node, accepted = 0, []
    while True:
        y = int(picks[node])
        child = kids[node].get(y)
        if child is None:
            return WalkResult(accepted, y, bonus=not kids[node])
        accepted.append(child)
        node = child


def commit(
    new_tokens: Sequence[int], generated: int, max_new_tokens: int, eos_ids: Sequence[int]
) -> tuple[list[int], bool]:
    """Cut a round's tokens exactly where plain decoding would stop: after the first EOS or
    at the token limit. Returns (tokens to commit, finished)."""
    room = max_new_tokens - generated
    out: list[int] = []
    for t in new_tokens:
        if len(out) >= room:
            return out, True
        out.append(int(t))
        if int(t) in eos_ids:
            return out, True
    return out, len(out) >= room
