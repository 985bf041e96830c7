"""The flex query layout (qblocks.py) against brute force: one segment per query block, every
visible (row, slot) pair in one of the block's listed pool blocks, full blocks fully
visible, nothing listed twice; and the split of forwards too big for the ladder."""

from __future__ import annotations

import random

import pytest
import torch

from specedge.execution import KVPool, Segment
from specedge.execution.plan import PLAIN, build_plan
from specedge.execution.qblocks import LADDER, MAX_SEGMENTS, Q_BLOCK, layout, padded, split
from specedge.execution.tree import depths_of

KINDS = [PLAIN, (24, None), (None, 32), (40, 16)]


def _pool() -> KVPool:
    return KVPool(1, 1, 4, torch.float32, "cpu", block_size=8, capacity_tokens=8 * 600)


def _segments(pool: KVPool, rng: random.Random) -> list[Segment]:
    """A mixed forward: prefill chunks on empty and cached sequences, decode rows, trees with
    and without a catch-up chain, slots prepared as the runner would."""
    segs = []
    for _ in range(rng.randint(1, 12)):
        seq = pool.new_seq()
        have = rng.choice([0, 5, 37, 100])
        if have:
            seq.prepare_write(0, have)
            seq.length = have
        kind = rng.choice(["chain", "decode", "tree"])
        if kind == "chain":
            seg = Segment.chain(seq, [1] * rng.randint(1, 70))
        elif kind == "decode":
            seg = Segment.chain(seq, [1])
        else:
            n = rng.randint(1, 12)
            parents = [rng.randint(0, i) for i in range(n)]
            seg = Segment.tree(seq, [1] * rng.randint(1, 20), [1] * n, parents,
                               depths_of(parents))
        seq.prepare_write(seq.length, seq.length + len(seg.tokens))
        segs.append(seg)
    return segs


@pytest.mark.parametrize("seed", range(8))
def test_layout_covers_exactly_what_each_row_sees(seed):
    rng = random.Random(seed)
    pool = _pool()
    segs = _segments(pool, rng)
    plan = build_plan(segs, pool, torch.device("cpu"))
    lay = layout(segs, KINDS, pool.block_size)
    b = pool.block_size
    assert lay.rows in LADDER and lay.rows >= sum(padded(len(s.tokens)) for s in segs)
    assert len(lay.src) == lay.rows and len(lay.qpos) == plan.ids.numel()
    assert [lay.src[p] for p in lay.qpos] == list(range(plan.ids.numel()))
    first = 0
    for seg in segs:
        m, table = len(seg.tokens), seg.seq.blocks
        start = lay.qpos[first]
        assert start % Q_BLOCK == 0  # every segment starts its own query block
        # the padding rows of its last block carry its last row
        assert lay.src[start + m : start + padded(m)] == [first + m - 1] * (padded(m) - m)
        rows = torch.arange(first, first + m)
        n_keys = seg.seq.length + m
        for kind in KINDS:
            vis = plan.visible(rows, n_keys, kind)
            for qb in range(padded(m) // Q_BLOCK):
                block = start // Q_BLOCK + qb
                sub = vis[qb * Q_BLOCK : (qb + 1) * Q_BLOCK]
                part, full = lay.partial[kind][block], lay.full[kind][block]
                assert not set(part) & set(full) and len(set(part)) == len(part)
                listed = {table.index(x) for x in part + full}
                seen = {int(j) // b for j in sub.any(0).nonzero()}
                assert seen <= listed, (kind, seen - listed)
                for x in full:  # every row sees every slot of a full block
                    j = table.index(x)
                    assert bool(sub[:, j * b : (j + 1) * b].all())
                if kind == PLAIN:  # causal trimming: nothing past the block's last row
                    assert max(listed) == (seg.seq.length + min(m, (qb + 1) * Q_BLOCK) - 1) // b
        first += m
    used = sum(padded(len(s.tokens)) for s in segs) // Q_BLOCK
    for kind in KINDS:  # the rung's padding blocks visit nothing
        assert all(not x for x in lay.partial[kind][used:] + lay.full[kind][used:])


def test_a_prefill_chunk_is_mostly_full_blocks():
    pool = _pool()
    seq = pool.new_seq()
    seq.prepare_write(0, 300)
    seq.length = 300
    seg = Segment.chain(seq, [1] * 64)
    seq.prepare_write(300, 364)
    lay = layout([seg], [PLAIN], pool.block_size)
    # block k's 16 rows sit at 300 + 16k ..; all of them see the slots below 301 + 16k
    assert [len(x) for x in lay.full[PLAIN][:4]] == [(301 + 16 * k) // 8 for k in range(4)]
    assert all(len(x) <= 3 for x in lay.partial[PLAIN][:4])


def test_split_keeps_each_forward_within_the_ladder():
    pool = KVPool(1, 1, 4, torch.float32, "cpu", block_size=16, capacity_tokens=16 * 1000)
    seqs = [pool.new_seq() for _ in range(MAX_SEGMENTS + 6)]
    segs = [Segment.chain(s, [1, 2]) for s in seqs[:-1]]
    segs.append(Segment.chain(seqs[-1], list(range(2500)), logits_at=[0, 1500, 2499]))
    groups = split(segs)
    assert len(groups) > 1
    for g in groups:
        assert len(g) <= MAX_SEGMENTS and sum(padded(len(s.tokens)) for s in g) <= LADDER[-1]
    pieces = [p for g in groups for p in g if p.seq is seqs[-1]]
    assert [len(p.tokens) for p in pieces] == [1024, 1024, 452]
    assert [p.positions[0] for p in pieces] == [0, 1024, 2048]
    assert [p.logits_at for p in pieces] == [[0], [476], [451]]
    # a piece never shares a forward with an earlier piece of its own sequence
    order = [i for i, g in enumerate(groups) for p in g if p.seq is seqs[-1]]
    assert order == sorted(set(order))


def test_split_cuts_a_long_catch_up_before_its_tree_only():
    pool = KVPool(1, 1, 4, torch.float32, "cpu", block_size=16, capacity_tokens=16 * 200)
    seq = pool.new_seq()
    parents = [0, 0, 1, 2]
    seg = Segment.tree(seq, list(range(1500)), [7, 8, 9, 10], parents, depths_of(parents))
    pieces = [p for g in split([seg]) for p in g]
    assert [len(p.tokens) for p in pieces] == [1024, 476, 4]
    assert pieces[-1].bits is not None and pieces[-1].window == seg.window
    assert [p.logits_at for p in pieces] == [[], [475], [0, 1, 2, 3]]
