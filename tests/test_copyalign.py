"""The answer's alignment to its prompt (specedge.edge.copyalign): copies, edits learned as
substitutions and applied to later copies, insertions rejoined, unrelated text let go; and how
a session's trust in its suffix proposals follows their hits (specedge.edge.suffixdraft)."""

from __future__ import annotations

import json

from specedge.config import SuffixConfig, TreeShape
from specedge.edge.copyalign import LOST, Aligner
from specedge.edge.suffix import Proposal, accepted_len, continuation_tree
from specedge.edge.suffixdraft import SuffixSource, model_shape
from specedge.execution.tree import validate_parents

# a "function" of distinct tokens where the name X=7 occurs three times
X, Y = 7, 900
SRC = [1, 2, X, 10, 11, 12, 13, X, 14, 15, 16, 17, 18, X, 19, 20, 21]
TEMPLATE = [300, 301, 302, 303, 304]  # a chat template's end of turn and assistant header


def test_a_copy_is_followed_and_continued():
    al = Aligner([100, 101] + SRC)
    al.feed([1, 2, X, 10])  # found by its first 3 tokens, then copied
    [b] = al.branches(5)
    assert b.tokens == (11, 12, 13, X, 14) and b.weight == 1.0 and b.run == 4


def test_a_rename_is_learned_and_applied_through_later_copies():
    al = Aligner(SRC)
    al.feed([1, 2, X, 10, 11, 12, 13, Y])  # copies, then departs at the second X
    guesses = [b.tokens for b in al.branches(3)]
    assert (14, 15, 16) in guesses  # one token replaced: the copy goes on after it
    al.feed([14, 15, 16])  # rejoined: X -> Y learned
    assert al.subs == {(X,): (Y,)}
    [b] = al.branches(4)
    assert b.tokens == (17, 18, Y, 19)  # the next X is drafted as Y
    al.feed([17, 18, Y, 19])
    assert al.p is not None and al.branches(2)[0].tokens == (20, 21)


def test_a_longer_replacement_and_an_insertion_rejoin():
    al = Aligner(SRC)
    al.feed([1, 2, X, 500, 501])  # two tokens inserted after X
    assert (10, 11, 12) in [b.tokens for b in al.branches(3)]  # the insertion ends here
    al.feed([10, 11, 12, 13])
    assert al.p is not None and al.subs == {}  # nothing replaced: nothing learned
    assert al.branches(2)[0].tokens == (X, 14)


def test_unrelated_text_is_let_go_and_found_again():
    al = Aligner(SRC)
    al.feed([1, 2, X, 10])
    al.feed(list(range(600, 600 + LOST + 2)))  # the answer writes something else
    assert al.branches(4) == []
    al.feed([15, 16, 17])  # and comes back to the prompt elsewhere
    assert al.branches(2)[0].tokens == (18, X)


def test_source_drafts_through_an_edit_where_a_suffix_match_has_nothing():
    prompt = [100] + SRC + TEMPLATE
    src = SuffixSource()
    src.propose(prompt, 6, 6)  # the first context proposed from is the prompt
    answer = [1, 2, X, 10, 11, 12, 13, Y, 14, 15, 16, 17, 18]
    p = src.propose(prompt + answer, 6, 6)
    assert p.tokens[:3] == [Y, 19, 20]  # the learned rename, then the copy
    assert p.match_len >= 4


def test_trust_follows_hits_and_gates_the_held_budget():
    shape = TreeShape(4, 6, 2, 2)
    cfg = SuffixConfig(min_match=4, full_run=5)
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5]  # a 5-long match: a full run here
    src = SuffixSource()
    assert src.trust < 0.5  # no hit yet: a long match holds nothing
    assert model_shape(shape, src, cfg, ctx) == shape
    src.judge(len(ctx), [6, 7, 8])  # its proposal (6, 7, 8, ...) held 3 tokens: one hit opens
    assert model_shape(shape, src, cfg, ctx).budget == 0
    src.propose(ctx, 4, 6)
    src.judge(len(ctx), [42])  # and one miss closes
    assert src.trust < 0.5
    assert model_shape(shape, src, cfg, ctx) == shape
    for _ in range(8):
        src.propose(ctx, 8, 6)
        src.judge(len(ctx), [42])
    assert src.trust < 0.05
    src.judge(len(ctx) + 1, [6])  # a round it did not draft for: not judged
    assert src.trust < 0.05
    for _ in range(8):  # one right token is what the model's tree holds too: not a hit
        src.propose(ctx, 4, 6)
        src.judge(len(ctx), [6, 42])
    assert src.trust < 0.05
    for _ in range(4):  # the proposal is judged whether or not it was sent
        src.propose(ctx, 4, 6)
        src.judge(len(ctx), [6, 7, 8, 42])
    assert src.trust > 0.7
    assert model_shape(shape, src, cfg, ctx).budget == 0


def test_accepted_len_walks_the_tree():
    p = Proposal(tokens=[5, 6, 8, 7], parents=[0, 1, 1, 3], depths=[1, 2, 2, 3],
                 prob=[1, .5, .5, .5])
    assert accepted_len(p, [5, 8, 7, 1]) == 3
    assert accepted_len(p, [5, 6, 7]) == 2
    assert accepted_len(p, [9]) == 0 and accepted_len(Proposal(), [5]) == 0


def test_a_long_copy_run_takes_the_whole_budget_and_a_short_one_none():
    shape = TreeShape(8, 6, 2, 2)
    prompt = list(range(100, 140))
    src = SuffixSource()
    src.trust = 1.0
    src.propose(prompt, 8, 8)
    short = prompt + prompt[:5]  # copying for 5 tokens: the model drafts its whole tree
    assert model_shape(shape, src, SuffixConfig(min_match=4, full_run=12), short, 8) == shape
    long = prompt + prompt[:14]  # for 14: the model's tree would only repeat the copy
    assert model_shape(shape, src, SuffixConfig(min_match=4, full_run=12), long, 8).budget == 0
    assert model_shape(shape, src, SuffixConfig(min_match=4, full_run=20), long, 8) == shape
    # a long run whose branches cannot fill the tree (the prompt ends 2 tokens on) holds none
    end = prompt + prompt[:14] + prompt[14:38]
    assert model_shape(shape, src, SuffixConfig(min_match=4, full_run=12), end, 8) == shape


def test_rival_guesses_each_get_nodes_under_decay():
    conts = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    flat = continuation_tree(conts, 6, 6, weights=[0.6, 0.4])
    assert flat.tokens == [1, 2, 3, 4, 5, 6]  # the likelier chain takes the budget
    hedged = continuation_tree(conts, 6, 6, weights=[0.6, 0.4], decay=0.7)
    assert set(hedged.tokens) & {7, 8} and set(hedged.tokens) & {1, 2, 3}
    validate_parents(hedged.parents)


def test_recorded_edits_take_fewer_rounds_aligned():
    """The real target's answers to code edits (bench/data), replayed: aligned to its prompt,
    the model-free drafter needs fewer rounds on the renames, and never more overall."""
    from bench.suffixreplay import DATA, replay

    answers = json.loads(DATA.read_text())["answers"]
    renames = [a for a in answers if a["category"] == "rename"]
    plain = sum(replay(a["prompt"], a["answer"], 7, align=False)[0] for a in renames)
    aligned = sum(replay(a["prompt"], a["answer"], 7)[0] for a in renames)
    assert aligned < plain * 0.95
    tokens = sum(len(a["answer"]) for a in answers)
    rounds = sum(replay(a["prompt"], a["answer"], 7)[0] for a in answers)
    assert tokens / rounds >= 2.5
    assert rounds <= sum(replay(a["prompt"], a["answer"], 7, align=False)[0] for a in answers)


def test_drafts_never_run_into_the_prompts_chat_template():
    prompt = list(range(100, 130)) + TEMPLATE
    src = SuffixSource()
    src.propose(prompt, 8, 8)
    near_end = prompt + list(range(120, 127))  # copying the prompt's last content tokens
    p = src.propose(near_end, 8, 8)
    assert p.tokens == [127, 128, 129]  # the copy stops where the template starts
    assert not set(p.tokens) & set(TEMPLATE)
