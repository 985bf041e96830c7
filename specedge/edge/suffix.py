"""Suffix drafts: continuations of the longest match of a context's tail in earlier token
sequences, as a tree of branches weighted by how often each continuation followed the match.

Pure Python over token ids, no model and no torch (DESIGN section 12). A SuffixIndex maps every
n-gram (n <= MAX_MATCH) of its documents to the positions it ends at, so the longest match of a
context's tail is found in at most MAX_MATCH dict lookups (prompt lookup and suffix decoding do
the same with an n-gram table and a suffix tree). A SuffixStore keeps, per tenant and never
across tenants, the sequences this edge served, least recently used evicted first under one
token bound.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_MATCH = 8  # longest n-gram indexed: a match this long is as good as it gets here
MAX_OCCURRENCES = 64  # most recent occurrences of a match whose continuations are counted
MIN_PROB = 0.1  # a branch this unlikely (product of count ratios) is not proposed
SPEC_FACTOR = 2.0  # at most this many nodes per matched token (a short match proposes little)


@dataclass
class Proposal:
    """A draft tree from counts: node i (1-based) carries tokens[i-1] under parents[i-1]
    (0: the root), with the product of its count ratios along the path (`prob`)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    prob: list[float] = field(default_factory=list)
    match_len: int = 0  # tokens of the context's tail matched (0: no match)
    occurrences: int = 0  # continuations counted

    @property
    def size(self) -> int:
        return len(self.tokens)


def continuation_tree(conts: Sequence[Sequence[int]], budget: int, depth: int,
                      min_prob: float = MIN_PROB,
                      weights: Sequence[float] | None = None, decay: float = 1.0) -> Proposal:
    """The best `budget` nodes of the trie of `conts` (each at most `depth` deep), best-first by
    path probability, where a child's probability given its parent is the share of the
    continuations (by weight, 1 each unless `weights`) through the parent that go on with the
    child's token. Children are never likelier than their parent, so the result is closed under
    ancestors. decay < 1 ranks a node by its probability times decay**depth: rival branches
    get their first nodes before one branch gets all (for guesses of like weight)."""
    out = Proposal(occurrences=len(conts))
    if budget <= 0 or depth <= 0 or not conts:
        return out
    weights = [1.0] * len(conts) if weights is None else weights
    # trie: node -> {token: [child node, weight]}; node 0 is the root (every continuation)
    kids: list[dict[int, list]] = [{}]
    through: list[float] = [float(sum(weights))]
    for c, w in zip(conts, weights, strict=True):
        node = 0
        for tok in c[:depth]:
            slot = kids[node].get(tok)
            if slot is None:
                kids.append({})
                through.append(0.0)
                slot = kids[node][tok] = [len(kids) - 1, 0.0]
            slot[1] += w
            node = slot[0]
            through[node] += w
    # best-first over (-rank, -prob, trie node, parent in the proposal, token, depth)
    heap: list[tuple[float, float, int, int, int, int]] = []

    def push(trie_node: int, prop_node: int, base: float, d: int) -> None:
        total = through[trie_node]
        for tok, (child, weight) in kids[trie_node].items():
            p = base * weight / total
            if p >= min_prob:
                heapq.heappush(heap, (-p * decay ** d, -p, child, prop_node, tok, d + 1))

    push(0, 0, 1.0, 0)
    while heap and out.size < budget:
        _, neg, child, parent, tok, d = heapq.heappop(heap)
        out.tokens.append(tok)
        out.parents.append(parent)
        out.depths.append(d)
        out.prob.append(-neg)
        if d < depth:
            push(child, out.size, -neg, d)
    return out


def accepted_len(p: Proposal, tokens: Sequence[int]) -> int:
    """How many of `tokens` (what was committed after the root) the proposal's tree held, as
    a path from its root: what its branches would have added to the round."""
    kids = {(par, tok): i for i, (tok, par) in enumerate(zip(p.tokens, p.parents, strict=True), 1)}
    node = n = 0
    while n < len(tokens) and (node, tokens[n]) in kids:
        node = kids[(node, tokens[n])]
        n += 1
    return n


class SuffixIndex:
    """N-gram (n <= max_match) end positions over documents that may grow (a session's
    committed tokens) or be dropped (evicted history). Keys are the n-grams' hashes; a hit is
    checked against the tokens, so a hash collision costs a lookup, never a wrong match."""

    def __init__(self, max_match: int = MAX_MATCH):
        self.max_match = max_match
        self.docs: dict[int, list[int]] = {}
        self._ends: dict[int, list[tuple[int, int]]] = {}  # hash(n-gram) -> [(doc, end)]
        self._dead = 0  # entries of dropped documents still in _ends
        self._live = 0
        self._next = 0
        self.fences: dict[int, tuple[int, int]] = {}  # doc -> positions never proposed

    @property
    def tokens(self) -> int:
        return sum(len(d) for d in self.docs.values())

    def add(self, tokens: Iterable[int]) -> int:
        """A new document; returns its id."""
        doc = self._next
        self._next += 1
        self.docs[doc] = []
        self.extend(doc, tokens)
        return doc

    def extend(self, doc: int, tokens: Iterable[int]) -> None:
        """Append tokens to a document, indexing the n-grams that end in them."""
        seq = self.docs[doc]
        for tok in tokens:
            seq.append(tok)
            end = len(seq)
            for n in range(1, min(self.max_match, end) + 1):
                self._ends.setdefault(hash(tuple(seq[end - n:])), []).append((doc, end))
                self._live += 1

    def sync(self, doc: int, tokens: Sequence[int]) -> None:
        """Make a document equal `tokens`, which extend it (a session's committed tokens)."""
        seq = self.docs[doc]
        if list(tokens[: len(seq)]) != seq:
            raise ValueError("sync: the document is not a prefix of the tokens")
        self.extend(doc, tokens[len(seq):])

    def fence(self, doc: int, start: int, stop: int) -> None:
        """Never propose a document's tokens [start, stop): a continuation is cut where it
        would enter them (one that starts inside is none)."""
        self.fences[doc] = (start, stop)

    def continuation(self, doc: int, end: int, depth: int) -> list[int]:
        """Up to `depth` tokens of a document after position `end`, short of its fence."""
        seq = self.docs[doc]
        start, stop = self.fences.get(doc, (0, 0))
        if end < stop:
            if end >= start:
                return []
            return seq[end:min(end + depth, start)]
        return seq[end:end + depth]

    def drop(self, doc: int) -> None:
        """Forget a document; its index entries go at the next compaction."""
        seq = self.docs.pop(doc, None)
        self.fences.pop(doc, None)
        if seq is None:
            return
        n = sum(min(self.max_match, e) for e in range(1, len(seq) + 1))
        self._dead += n
        self._live -= n
        if self._dead > max(1024, self._live):
            self._compact()

    def _compact(self) -> None:
        self._ends = {k: kept for k, v in self._ends.items()
                      if (kept := [p for p in v if p[0] in self.docs])}
        self._dead = 0

    def occurrences(self, context: Sequence[int], n: int,
                    limit: int = MAX_OCCURRENCES) -> list[tuple[int, int]]:
        """Where the context's last n tokens occur with at least one token after them (the
        most recent `limit`, as (doc, end))."""
        if n < 1 or n > min(self.max_match, len(context)):
            return []
        tail = list(context[-n:])
        out = []
        for doc, end in reversed(self._ends.get(hash(tuple(tail)), ())):
            seq = self.docs.get(doc)
            if seq is not None and end < len(seq) and seq[end - n:end] == tail:
                out.append((doc, end))
                if len(out) >= limit:
                    break
        return out


def longest_match(indexes: Sequence[SuffixIndex], context: Sequence[int], min_match: int = 1
                  ) -> tuple[int, list[tuple[SuffixIndex, int, int]]]:
    """The longest n >= min_match for which the context's last n tokens occur in one of the
    indexes with a continuation; returns n and the occurrences' (index, doc, end) so a caller
    can read the continuations. (0, []) when nothing matches."""
    top = min(max((ix.max_match for ix in indexes), default=0), len(context))
    for n in range(top, max(1, min_match) - 1, -1):
        found = [(ix, doc, end) for ix in indexes for doc, end in ix.occurrences(context, n)]
        if found:
            return n, found[:MAX_OCCURRENCES]
    return 0, []


def candidates(indexes: Sequence[SuffixIndex], context: Sequence[int], depth: int,
               min_match: int = 1) -> tuple[int, list[list[int]]]:
    """The continuations (at most `depth` tokens) of the longest match of the context's tail in
    `indexes`, and the match's true length (it may run past MAX_MATCH); (0, []) for none."""
    n, found = longest_match(indexes, context, min_match)
    found = [(ix, doc, end, c) for ix, doc, end in found if (c := ix.continuation(doc, end, depth))]
    if not found:
        return 0, []
    return (max(_extend_back(ix.docs[doc], end, context, n) for ix, doc, end, _ in found),
            [c for *_, c in found])


def propose(indexes: Sequence[SuffixIndex], context: Sequence[int], budget: int, depth: int,
            *, min_match: int = 1, min_prob: float = MIN_PROB,
            spec_factor: float = SPEC_FACTOR) -> Proposal:
    """A draft tree continuing `context` from the longest match of its tail in `indexes`: at
    most `budget` nodes (and spec_factor per matched token), `depth` deep."""
    match_len, conts = candidates(indexes, context, depth, min_match)
    if not match_len:
        return Proposal()
    out = continuation_tree(conts, capped(budget, match_len, spec_factor), depth, min_prob)
    out.match_len = match_len
    return out


def capped(budget: int, evidence: int, spec_factor: float = SPEC_FACTOR) -> int:
    """A tree's size: the budget, but at most spec_factor nodes per token of evidence (a
    short match proposes little)."""
    return min(budget, max(1, math.ceil(spec_factor * evidence)))


def _extend_back(seq: list[int], end: int, context: Sequence[int], n: int,
                 limit: int = 64) -> int:
    """How far back from `end` `seq` keeps agreeing with the context's tail (>= n)."""
    while n < limit and n < end and n < len(context) and seq[end - n - 1] == context[-n - 1]:
        n += 1
    return n


class SuffixStore:
    """Per tenant, the token sequences (prompt + answer) this edge served, for later requests
    of the same tenant to draft from. One bound on the tokens kept across tenants; the least
    recently added or used sequence goes first. Thread-safe: sessions draft in threads."""

    def __init__(self, max_tokens: int = 65536, max_match: int = MAX_MATCH):
        self.max_tokens, self.max_match = max_tokens, max_match
        self._tenants: dict[str, SuffixIndex] = {}
        self._lru: OrderedDict[tuple[str, int], int] = OrderedDict()  # (tenant, doc) -> len
        self._held = 0
        self.lock = threading.Lock()

    @property
    def tokens(self) -> int:
        return self._held

    def index(self, tenant: str) -> SuffixIndex | None:
        """The tenant's index (read it under `lock`); None if it has nothing."""
        return self._tenants.get(tenant)

    def add(self, tenant: str, tokens: Sequence[int]) -> None:
        """Remember a finished sequence for `tenant` (longer than the bound: its tail)."""
        if self.max_tokens <= 0 or not tokens:
            return
        tokens = list(tokens[-self.max_tokens:])
        with self.lock:
            ix = self._tenants.get(tenant)
            if ix is None:
                ix = self._tenants[tenant] = SuffixIndex(self.max_match)
            doc = ix.add(tokens)
            self._lru[(tenant, doc)] = len(tokens)
            self._held += len(tokens)
            while self._held > self.max_tokens and self._lru:
                (t, d), n = self._lru.popitem(last=False)
                self._held -= n
                owner = self._tenants[t]
                owner.drop(d)
                if not owner.docs:
                    del self._tenants[t]

    def touch(self, tenant: str) -> None:
        """A tenant's sequences were used: they move to the recent end."""
        with self.lock:
            for key in [k for k in self._lru if k[0] == tenant]:
                self._lru.move_to_end(key)
