"""Suffix drafts at the edge (DESIGN section 12): a session's proposals from its own tokens and
its tenant's history (specedge.edge.suffix), as the whole draft (a model-free edge: `--model
suffix`) or merged into the draft model's tree (`--suffix-draft`).

A suffix-drafted node is just a token under a parent: the verifier's token-match rule (sample
y from the target at a node, descend if a child carries y) judges it as any other, exactly,
and needs no draft probability. Merged nodes come after every model node, so the draft model's
KV layout (node i at committed_len + i - 1, `forwarded`) is untouched."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from specedge.config import SuffixConfig, TreeShape
from specedge.edge.copyalign import Aligner
from specedge.edge.drafter import DraftTree
from specedge.edge.suffix import (
    Proposal,
    SuffixIndex,
    SuffixStore,
    accepted_len,
    candidates,
    capped,
    continuation_tree,
)

if TYPE_CHECKING:
    from schemas import Sampling
    from specedge.execution.grammar import Constraint

COPY_WEIGHT = 3.0  # an aligned copy's branches against the suffix matches' (1 in all)
EDIT_DECAY = 0.7  # continuation_tree's decay while an edit is under way
TRUST_RATE = 0.3  # how fast a session's trust in its suffix proposals follows their hits
TRUST_GATE = 0.5  # a merged tree holds budget for suffix branches only while trust is this high
TRUST_START = 0.35  # below the gate: a session holds budget only after one hit (3 tokens held)
HIT_DEPTH = 3  # tokens of a proposal (or all of a shorter one) a round must commit to be a hit
# the prompt's last tokens are a chat template's end of turn and assistant header (5 tokens in
# Qwen's, Llama 3's and Gemma's): an answer never copies them, so drafts never run into them
PROMPT_TAIL = 5


class SuffixSource:
    """One session's suffix proposals: matches of its tail in its own tokens (prompt and answer
    so far) and, read-only, its tenant's earlier sequences in `store`, plus the branches of the
    answer's alignment to its prompt (specedge.edge.copyalign: copies through edits). At the
    end the session's tokens join the tenant's history. Used by one session at a time (its
    executor steps)."""

    def __init__(self, store: SuffixStore | None = None, tenant: str = "", min_match: int = 1,
                 align: bool = True, corpus: SuffixIndex | None = None):
        self.store, self.tenant, self.min_match, self.aligning = store, tenant, min_match, align
        self.corpus = corpus  # read-only public text (specedge.edge.corpus), shared
        self.own = SuffixIndex()
        self._doc = self.own.add([])
        self.align: Aligner | None = None  # over the first context proposed from (the prompt)
        self._prompt_len = 0
        # how often recent proposals held the next HIT_DEPTH tokens (sent or not); a merged tree
        # holds budget for suffix branches while it is at least TRUST_GATE
        self.trust = TRUST_START
        self._last: tuple[tuple[int, int, int], Proposal] | None = None

    def propose(self, committed: list[int], budget: int, depth: int) -> Proposal:
        """A tree continuing committed (cached per context): the suffix matches' continuations
        and the alignment's branches by weight, at most spec_factor nodes per token of the
        longer evidence (match or copy run)."""
        key = (len(committed), budget, depth)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        try:
            self.own.sync(self._doc, committed)
        except ValueError:  # not a continuation of what it indexed: start over from it
            self.own = SuffixIndex()
            self._doc = self.own.add(committed)
            self.align = None
        if self.align is None:  # the first context: the prompt, its chat template's tail fenced
            self.own.fence(self._doc, max(0, len(committed) - PROMPT_TAIL), len(committed))
            self._prompt_len = len(committed)
            self.align = Aligner(committed[:max(0, len(committed) - PROMPT_TAIL)])
        self.align.feed(committed[self._prompt_len + len(self.align.out):])
        ixs = [self.own] if self.corpus is None else [self.own, self.corpus]
        if self.store is None:
            match_len, conts = candidates(ixs, committed, depth, self.min_match)
        else:
            with self.store.lock:
                hist = self.store.index(self.tenant)
                match_len, conts = candidates(ixs if hist is None else [*ixs, hist], committed,
                                              depth, self.min_match)
        weights = [1.0 / len(conts)] * len(conts) if conts else []
        branches = self.align.branches(depth) if self.aligning else []
        for b in branches:
            conts.append(list(b.tokens))
            weights.append(COPY_WEIGHT * b.weight)
        evidence = max([match_len] + [b.run for b in branches])
        # an edit under way: its guesses are rivals of like weight, each gets a few nodes
        decay = EDIT_DECAY if branches and self.align.p is None else 1.0
        out = continuation_tree(conts, capped(budget, evidence), depth, weights=weights,
                                decay=decay)
        out.match_len = evidence if out.size else 0
        self._last = (key, out)
        return out

    def judge(self, context_len: int, tokens: list[int]) -> None:
        """The round that drafted from a context of context_len tokens committed `tokens`:
        did this source's proposal for it hold them (HIT_DEPTH deep)?"""
        if self._last is None or self._last[0][0] != context_len or not self._last[1].size:
            return
        p = self._last[1]
        # a hit: the proposal held a copy, not just the next token (which the model's tree
        # holds as well: a held budget pays only for what the model would not have drafted)
        hit = accepted_len(p, tokens) >= min(HIT_DEPTH, max(p.depths))
        self.trust += TRUST_RATE * (hit - self.trust)

    def finish(self, committed: list[int]) -> None:
        """The session is over: its tokens become history for its tenant's next requests."""
        if self.store is not None:
            self.store.add(self.tenant, committed)


class SuffixDrafter:
    """The model-free edge's drafter: what a session asks of a Drafter (KV upkeep, rollback,
    close) costs nothing here, and its trees come from `source`."""

    def __init__(self, source: SuffixSource, vocab_size: int):
        self.source, self.vocab_size = source, vocab_size
        self.kv_len = 0

    def drafting(self, on: bool) -> None:
        pass

    def reuse(self, prompt: list[int]) -> int:
        return 0

    def catch_up(self, committed: list[int]) -> None:
        return None

    def remember(self, committed: list[int]) -> None:
        pass

    def rollback(self, tree: DraftTree, accepted: list[int]) -> None:
        pass

    def close(self) -> None:
        pass


class SuffixBuilder:
    """A TreeBuilder's interface (step until done, then tree) over a suffix proposal: one
    step, no model."""

    def __init__(self, source: SuffixSource, committed: list[int], shape: TreeShape,
                 sampling: Sampling | None = None, prompt_len: int = 0,
                 constraint: Constraint | None = None):
        self.source, self.committed, self.shape = source, committed, shape.check()
        self.tree = DraftTree(root=committed[-1], committed_len=len(committed),
                              sampling=sampling, prompt_len=prompt_len, constraint=constraint)
        self.done = shape.budget == 0
        self.steps = 0

    def step(self) -> None:
        if self.done:
            return
        self.steps += 1
        p = self.source.propose(self.committed, self.shape.budget, self.shape.depth)
        merge(self.tree, p, self.shape.budget)
        self.done = True

    def run(self) -> DraftTree:
        while not self.done:
            self.step()
        return self.tree


def merge(tree: DraftTree, p: Proposal, budget: int) -> int:
    """Add a proposal's branches to `tree`, at most up to `budget` nodes in all. A proposed
    node whose parent already has a child with its token is that child (free: the model
    proposed it too); new nodes are appended and listed in tree.suffix. Returns how many
    were added. Proposal order is best-first and closed under ancestors, so a node whose
    parent was dropped for room is dropped too."""
    kids = {(par, tok): i for i, (par, tok) in enumerate(zip(tree.parents, tree.tokens,
                                                              strict=True), 1)}
    where = {0: 0}  # proposal node -> tree node
    added = 0
    for i, (tok, par, prob) in enumerate(zip(p.tokens, p.parents, p.prob, strict=True), 1):
        at = where.get(par)
        if at is None:
            continue
        node = kids.get((at, tok))
        if node is None:
            if tree.size >= budget:
                continue
            tree.tokens.append(tok)
            tree.parents.append(at)
            tree.depths.append((tree.depths[at - 1] if at else 0) + 1)
            tree.logp.append(math.log(prob) if prob > 0 else float("-inf"))
            node = kids[(at, tok)] = tree.size
            tree.suffix.append(node)
            added += 1
        where[i] = node
    return added


def model_shape(shape: TreeShape, source: SuffixSource | None, cfg: SuffixConfig,
                committed: list[int], depth: int | None = None) -> TreeShape:
    """The draft model's share of a merged tree: all of it, or none where the suffix branches
    fill the whole tree from a match or copy run of at least cfg.full_run tokens while the
    source's trust (its recent hits) is at least TRUST_GATE: the model's tree would only
    repeat a long copy. Nothing in between: a tree split between the two is shallower on
    both sides, and lost rounds to the model alone (docs/results.md, issue 32); otherwise
    suffix branches join the model's tree where they coincide with its nodes (free) or in
    room it leaves."""
    if source is None or not cfg.on or shape.budget < 2:
        return shape
    p = source.propose(committed, shape.budget, depth or shape.depth)
    if (p.match_len < max(cfg.min_match, cfg.full_run) or p.size < shape.budget
            or source.trust < TRUST_GATE):
        return shape
    return TreeShape(0, shape.depth, shape.width, shape.topk)


def accepted_by_source(tree: DraftTree, accepted: list[int]) -> int:
    """How many of the accepted nodes a suffix match proposed."""
    if not tree.suffix:
        return 0
    mine = set(tree.suffix)
    return sum(i in mine for i in accepted)
