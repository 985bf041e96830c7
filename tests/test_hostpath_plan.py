"""A forward's metadata is built on the host into one buffer (one copy to the device): every
field of the plan, read row by row, says what the segments say, whatever the mix."""

import torch

from specedge.execution import KVPool, Segment
from specedge.execution.plan import SHORT_ROWS, build_plan
from specedge.execution.tree import ancestor_mask, depths_of


def mixed_segments(pool: KVPool) -> list[Segment]:
    """A prefill past SHORT_ROWS, a catch-up chain on a cached prefix, a verifier's
    chain-then-tree, and an edge's partly forwarded tree (nodes 3..5 of 5)."""
    seqs = [pool.new_seq() for _ in range(4)]
    for s, n in zip(seqs, [0, 21, 7, 40], strict=True):
        s.prepare_write(0, max(n, 1))
        s.length = n
    parents = [0, 0, 1, 3, 1]
    rows = ancestor_mask(parents, include_root=False)[2:]
    segs = [Segment.chain(seqs[0], list(range(SHORT_ROWS + 9))),
            Segment.chain(seqs[1], [4, 5, 6]),
            Segment.tree(seqs[2], [8, 9], [11, 12, 13, 14, 15], parents, depths_of(parents)),
            Segment.tree_nodes(seqs[3], 38, rows, [31, 32, 33], [40, 41, 39])]
    for seg in segs:
        seg.seq.prepare_write(seg.seq.length, seg.seq.length + len(seg.tokens))
    return segs


def test_plan_fields_and_one_buffer():
    pool = KVPool(1, 1, 4, torch.float32, "cpu", block_size=4)
    segs = mixed_segments(pool)
    plan = build_plan(segs, pool, torch.device("cpu"))
    r = 0
    want = []
    for s, seg in enumerate(segs):
        m, n = len(seg.tokens), seg.seq.length
        rows = slice(r, r + m)
        assert plan.ids[rows].tolist() == seg.tokens
        assert plan.pos[rows].tolist() == seg.positions
        assert plan.upto[rows].tolist() == seg.upto
        assert plan.slots[rows].tolist() == [seg.seq.slot(p) for p in range(n, n + m)]
        assert plan.window[rows].tolist() == [seg.window] * m
        assert plan.seg_of[rows].tolist() == [s] * m
        assert plan.kv_len[s] == n + m == plan.host_kv_len[s]
        assert plan.tables[s, : len(seg.seq.blocks)].tolist() == seg.seq.blocks
        if seg.bits is None:
            assert plan.chain_only[s]
        else:
            w = seg.bits.shape[1]
            assert torch.equal(plan.bits[rows, :w], seg.bits) and not plan.bits[rows, w:].any()
        want += [r + i for i in seg.logits_at]
        r += m
    assert plan.want.tolist() == want and plan.host_rows == [len(s.tokens) for s in segs]
    assert plan.long == [(0, 0, SHORT_ROWS + 9)] and plan.short_segs.tolist() == [1, 2, 3]
    # padded short rows: each short row goes to its place and back; padding reads a short row
    m_max = plan.short_max_rows
    assert m_max == 7
    assert torch.equal(plan.q_index[plan.out_index], plan.short_rows)
    assert plan.short_rows.tolist() == list(range(SHORT_ROWS + 9, r))
    assert set(plan.q_index.tolist()) <= set(plan.short_rows.tolist())
    # one host buffer: every field is a view of the same storage (one copy to a device)
    base = plan.ids.untyped_storage().data_ptr()
    for f in ("pos", "slots", "upto", "window", "want", "seg_of", "kv_len", "tables",
              "short_segs", "short_rows", "q_index", "out_index", "bits"):
        assert getattr(plan, f).untyped_storage().data_ptr() == base, f


def test_tree_segment_bits_are_the_ancestor_rows():
    pool = KVPool(1, 1, 4, torch.float32, "cpu", block_size=4)
    parents = [0, 0, 1, 3, 1, 2]
    seg = Segment.tree(pool.new_seq(), [1, 2, 3], [5] * 6, parents, depths_of(parents))
    assert seg.bits.shape == (9, 6) and not seg.bits[:3].any()
    assert torch.equal(seg.bits[3:], ancestor_mask(parents, include_root=False))
