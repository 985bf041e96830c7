"""Suffix drafts, the pure parts: the n-gram index, the continuation tree from counts, the
per-tenant store, and merging a proposal into a model's tree under its budget."""

from __future__ import annotations

import math

import pytest

from specedge.config import SuffixConfig, TreeShape, suffix_shape
from specedge.edge.drafter import DraftTree
from specedge.edge.suffix import (
    SuffixIndex,
    SuffixStore,
    continuation_tree,
    longest_match,
    propose,
)
from specedge.edge.suffixdraft import (
    SuffixBuilder,
    SuffixSource,
    accepted_by_source,
    merge,
    model_shape,
)
from specedge.execution.tree import validate_parents


def test_continuation_tree_counts_and_budget():
    # after the match: "1 2 3" three times, "1 2 4" once, "5" once
    conts = [[1, 2, 3]] * 3 + [[1, 2, 4], [5]]
    p = continuation_tree(conts, budget=10, depth=3, min_prob=0.0)
    assert p.tokens[:3] == [1, 2, 3]  # the favourite chain first
    assert p.prob[:3] == pytest.approx([0.8, 0.8, 0.6])
    assert sorted(p.tokens) == [1, 2, 3, 4, 5]
    assert dict(zip(p.tokens, p.prob, strict=True)) == pytest.approx(
        {1: .8, 2: .8, 3: .6, 4: .2, 5: .2})
    assert validate_parents(p.parents) == p.depths
    # the budget keeps the best nodes, closed under ancestors
    q = continuation_tree(conts, budget=2, depth=3, min_prob=0.0)
    assert q.tokens == [1, 2] and q.parents == [0, 1]
    # unlikely branches are not proposed
    r = continuation_tree(conts, budget=10, depth=3, min_prob=0.5)
    assert r.tokens == [1, 2, 3]
    assert continuation_tree(conts, budget=0, depth=3).size == 0
    assert continuation_tree([], budget=4, depth=3).size == 0


def test_index_longest_match_and_growth():
    ix = SuffixIndex(max_match=4)
    doc = ix.add([7, 1, 2, 3, 9, 1, 2, 3, 4])
    # the tail "1 2 3" occurs twice with a continuation: 9 then 4 (most recent first)
    n, found = longest_match([ix], [5, 1, 2, 3])
    assert n == 3 and [ix.docs[d][e] for _, d, e in found] == [4, 9]
    # a longer tail that occurs once wins over the shorter one
    n, found = longest_match([ix], [9, 1, 2, 3])
    assert n == 4 and [ix.docs[d][e] for _, d, e in found] == [4]
    assert longest_match([ix], [42]) == (0, [])
    # a growing document: its own end has no continuation, earlier copies do
    ix.extend(doc, [7, 1])
    n, found = longest_match([ix], ix.docs[doc])
    assert n == 2 and {ix.docs[d][e] for _, d, e in found} == {2}
    with pytest.raises(ValueError):
        ix.sync(doc, [8, 8])


def test_propose_copies_a_span_and_reports_the_true_match():
    text = list(range(100, 140))
    ix = SuffixIndex()
    ix.add(text)
    ctx = [1, 2] + text[:20]  # the context restates the first 20 tokens
    p = propose([ix], ctx, budget=8, depth=8)
    assert p.tokens == text[20:28] and p.parents == list(range(8))
    assert p.match_len == 20  # past MAX_MATCH: measured backwards
    # a one-token match proposes little (spec_factor per matched token)
    ix2 = SuffixIndex()
    ix2.add([5, 6, 5, 7])
    assert propose([ix2], [1, 5], budget=16, depth=8).size <= 2


def test_drop_and_compact_forget_a_document():
    ix = SuffixIndex(max_match=3)
    a = ix.add([1, 2, 3] * 200)
    b = ix.add([4, 5, 6])
    ix.drop(a)  # big enough to compact at once
    assert longest_match([ix], [1, 2]) == (0, [])
    assert longest_match([ix], [4, 5])[0] == 2
    ix.drop(b)
    ix.drop(b)  # twice is harmless
    assert ix.docs == {}


def test_store_keeps_tenants_apart_and_evicts_least_recent():
    store = SuffixStore(max_tokens=50)
    store.add("alice", list(range(1000, 1030)))
    store.add("bob", list(range(2000, 2030)))  # over the bound: alice's goes
    assert store.index("alice") is None and store.tokens == 30
    store.add("alice", [1, 2, 3, 4])
    alice = SuffixSource(store, "alice")
    bob = SuffixSource(store, "bob")
    # bob's history continues his context; alice never sees bob's tokens
    assert bob.propose([9, 2000, 2001, 2002], 4, 4).tokens == [2003, 2004, 2005, 2006]
    assert alice.propose([9, 2000, 2001, 2002], 4, 4).size == 0
    assert alice.propose([1, 2], 4, 4).tokens[:2] == [3, 4]
    # a finished session joins its tenant's history
    alice.finish([50, 51, 52, 53])
    assert SuffixSource(store, "alice").propose([50, 51], 2, 2).tokens == [52, 53]
    assert store.add("x", []) is None and SuffixStore(0).tokens == 0


def _model_tree() -> DraftTree:
    # root -> 10 -> 11 -> 12 ; root -> 20
    t = DraftTree(root=5, committed_len=3, tokens=[10, 20, 11, 12], parents=[0, 0, 1, 3],
                  depths=[1, 1, 2, 3], logp=[-0.1, -2.0, -0.2, -0.3], forwarded=3)
    return t


def test_merge_dedupes_the_shared_prefix_and_keeps_the_budget():
    ix = SuffixIndex()
    ix.add([1, 2, 5, 10, 11, 13, 14])  # agrees with the model on 10 11, then goes its own way
    p = propose([ix], [1, 2, 5], budget=8, depth=6)
    assert p.tokens == [10, 11, 13, 14]
    t = _model_tree()
    added = merge(t, p, budget=6)
    assert added == 2 and t.size == 6  # 10 and 11 cost nothing
    assert t.tokens[4:] == [13, 14] and t.parents[4:] == [3, 5] and t.suffix == [5, 6]
    assert validate_parents(t.parents) == t.depths and t.forwarded == 3
    # the budget stops it: nothing added, nothing dangling
    t2 = _model_tree()
    assert merge(t2, p, budget=4) == 0 and t2.suffix == []
    assert accepted_by_source(t, [1, 3, 5, 6]) == 2
    assert accepted_by_source(_model_tree(), [1, 3]) == 0


def test_model_shape_gives_the_tree_only_to_a_long_match_that_fills_it():
    shape = TreeShape(4, 6, 2, 2)
    src = SuffixSource()
    src.trust = 1.0  # its proposals have been hitting (tests/test_copyalign.py: trust)
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5]  # tail 1..5 matched, 5 long
    assert model_shape(shape, src, SuffixConfig(min_match=4, full_run=5), ctx).budget == 0
    assert model_shape(shape, src, SuffixConfig(min_match=4, full_run=6), ctx) == shape
    assert model_shape(shape, src, SuffixConfig(min_match=6, full_run=5), ctx) == shape
    assert model_shape(shape, src, SuffixConfig(min_match=0), ctx) == shape
    # its continuation (6, 7, 8, 9, 1, 2 at depth 6) cannot fill a budget of 8: none held
    wide = TreeShape(8, 6, 2, 2)
    assert model_shape(wide, src, SuffixConfig(min_match=4, full_run=5), ctx) == wide
    assert model_shape(shape, None, SuffixConfig(), ctx) == shape
    assert model_shape(shape, SuffixSource(), SuffixConfig(), [1, 2, 3]) == shape


def test_suffix_builder_drafts_a_deep_chain_in_one_step():
    shape = suffix_shape(TreeShape(12, 6, 2, 2), 16)
    assert shape.depth == 16
    src = SuffixSource()
    ctx = list(range(50, 80)) + [7] + list(range(50, 60))
    b = SuffixBuilder(src, ctx, shape)
    tree = b.run()
    assert b.steps == 1 and tree.root == ctx[-1] and tree.committed_len == len(ctx)
    assert tree.tokens == list(range(60, 72)) and tree.suffix == list(range(1, 13))
    assert all(math.isfinite(x) for x in tree.logp)
    assert SuffixBuilder(src, ctx, TreeShape(0, 1, 1, 1)).run().size == 0
