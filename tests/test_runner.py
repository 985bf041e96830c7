"""The packed forward over the KV pool must give the same logits as the stock model run on
each path alone, whatever the mix of segments; the pool's block-table edits (rollback, fork,
eviction) must leave exactly the KV a fresh prefill would."""

import pytest
import torch

from specedge.execution import KVPool, PackedRunner, PoolFull, Segment
from specedge.execution.tree import depths_of, path_to
from tests.conftest import tiny_model


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def random_sessions(n: int, seed: int = 0, prefills: bool = True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, [0, 0, 1, 1, 3]), (17, []), (1, [0, 1, 2]), (9, [0, 0, 0, 2]), (40, [0, 1])]
    if prefills:
        shapes.append((110, [0, 0, 1, 2]))  # a prefill after a cache miss, then a tree
    out = []
    for i in range(n):
        length, parents = shapes[i % len(shapes)]
        length += i
        prompt = torch.randint(0, 256, (length,), generator=g).tolist()
        nodes = torch.randint(0, 256, (len(parents),), generator=g).tolist()
        out.append((prompt, parents, nodes))
    return out


def assert_tree_logits(model, sessions, out):
    for (prompt, parents, nodes), logits in zip(sessions, out, strict=True):
        assert torch.allclose(logits[0], plain_logits(model, prompt), atol=1e-10)
        for i in range(1, len(nodes) + 1):
            path = [nodes[j - 1] for j in path_to(i, parents)]
            assert torch.allclose(logits[i], plain_logits(model, prompt + path), atol=1e-10)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_packed_batch_matches_plain_forward(block_size, attention):
    model = tiny_model(11)
    runner = PackedRunner(model, block_size=block_size, attention=attention)
    sessions = random_sessions(6)
    segs = [Segment.tree(runner.new_seq(), p, nodes, parents, depths_of(parents))
            for p, parents, nodes in sessions]
    out = runner.forward(segs)
    assert runner.forward_calls == 1
    assert_tree_logits(model, sessions, out)


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_cached_prefix_then_tree_and_a_long_prefill_in_one_forward(attention):
    """Sessions at different points: a cached prefix with a chain and a tree on top, and a
    prefill of 100 tokens packed with them (padded rows, different key lengths)."""
    model = tiny_model(13)
    runner = PackedRunner(model, block_size=8, attention=attention)
    sessions = random_sessions(4, seed=3)
    seqs = [runner.new_seq() for _ in sessions]
    runner.forward([Segment.chain(s, p[: len(p) // 2 + 1]) for s, (p, _, _) in
                    zip(seqs, sessions, strict=True)])
    long_prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(9))
    segs = [Segment.tree(s, p[s.length:], nodes, parents, depths_of(parents))
            for s, (p, parents, nodes) in zip(seqs, sessions, strict=True)]
    segs.append(Segment.chain(runner.new_seq(), long_prompt.tolist()))
    out = runner.forward(segs)
    assert_tree_logits(model, sessions, out[:-1])
    assert torch.allclose(out[-1][0], plain_logits(model, long_prompt.tolist()), atol=1e-10)


def test_long_prefill_alone_and_in_pieces():
    model = tiny_model(14)
    runner = PackedRunner(model)
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    whole, pieces = runner.new_seq(), runner.new_seq()
    (a,) = runner.forward([Segment.chain(whole, ids)])
    for i in range(0, 300, 70):
        (b,) = runner.forward([Segment.chain(pieces, ids[i : i + 70])])
    ref = plain_logits(model, ids)
    assert torch.allclose(a[0], ref, atol=1e-10) and torch.allclose(b[0], ref, atol=1e-10)
    for x, y in zip(whole.view(), pieces.view(), strict=True):
        assert torch.allclose(x, y, atol=1e-12)


def test_one_attention_call_per_layer_for_32_sessions():
    model = tiny_model(15, layers=3)
    runner = PackedRunner(model)
    sessions = random_sessions(32, seed=5, prefills=False)
    segs = [Segment.tree(runner.new_seq(), p, nodes, parents, depths_of(parents))
            for p, parents, nodes in sessions]
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        out = runner.forward(segs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    assert runner.attention_calls == 3 and len(calls) == 3  # layers x 1 forward
    assert_tree_logits(model, sessions[:4], out[:4])


def test_keep_rolls_back_to_the_accepted_path():
    model = tiny_model(12)
    runner = PackedRunner(model, block_size=4)
    prompt, parents, nodes = [3, 1, 4, 1, 5], [0, 0, 2, 1], [9, 2, 6, 5]
    kv = runner.new_seq()
    runner.forward([Segment.tree(kv, prompt, nodes, parents, depths_of(parents))])
    kv.keep(0, list(range(5)) + [5 + 1, 5 + 2])  # accept node 2 then node 3
    assert kv.length == 7
    seq = prompt + [2, 6]
    (logits,) = runner.forward([Segment.chain(kv, [8])])
    assert torch.allclose(logits[0], plain_logits(model, seq + [8]), atol=1e-10)
    fresh = runner.new_seq()
    runner.forward([Segment.chain(fresh, seq + [8])])
    for a, b in zip(kv.view(), fresh.view(), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_rollbacks_of_a_batch_are_one_batched_copy():
    model = tiny_model(16)
    runner = PackedRunner(model, block_size=4)
    sessions = random_sessions(8, seed=7)
    seqs = [runner.new_seq() for _ in sessions]
    runner.forward([Segment.tree(s, p, nodes, parents, depths_of(parents))
                    for s, (p, parents, nodes) in zip(seqs, sessions, strict=True)])
    flushed = runner.pool.copies_flushed
    for s, (p, parents, nodes) in zip(seqs, sessions, strict=True):
        path = path_to(len(nodes), parents) if nodes else []
        s.keep(len(p) - 1, [0] + [i for i in path])  # root, then the deepest path's nodes
    assert runner.pool.copies_flushed == flushed  # queued, not run one by one
    runner.forward([Segment.chain(s, [7]) for s in seqs])
    assert runner.pool.copies_flushed == flushed + 1
    for s, (p, parents, nodes) in zip(seqs, sessions, strict=True):
        path = [nodes[i - 1] for i in (path_to(len(nodes), parents) if nodes else [])]
        fresh = runner.new_seq()
        runner.forward([Segment.chain(fresh, p + path + [7])])
        for a, b in zip(s.view(), fresh.view(), strict=True):
            assert torch.allclose(a, b, atol=1e-12)


def test_fork_shares_blocks_and_copies_on_write():
    model = tiny_model(17)
    runner = PackedRunner(model, block_size=4)
    pool = runner.pool
    ids = list(range(10, 21))  # 11 tokens: two full blocks and a partial one
    main = runner.new_seq()
    runner.forward([Segment.chain(main, ids)])
    used = pool.used_blocks
    fork = main.fork(11)
    assert pool.used_blocks == used + 1  # full blocks shared; the partial one copied
    assert fork.blocks[:2] == main.blocks[:2] and fork.blocks[2] != main.blocks[2]
    # both sides grow differently; then the main one rewrites inside a shared block
    runner.forward([Segment.chain(fork, [1, 2, 3])])
    runner.forward([Segment.chain(main, [4, 5])])
    main.truncate(6)
    runner.forward([Segment.chain(main, [6, 7])])  # position 6 lies in shared block 1
    assert main.blocks[1] != fork.blocks[1]  # copied on write
    for seq, want in ((fork, ids + [1, 2, 3]), (main, ids[:6] + [6, 7])):
        fresh = runner.new_seq()
        runner.forward([Segment.chain(fresh, want)])
        for a, b in zip(seq.view(), fresh.view(), strict=True):
            assert torch.allclose(a, b, atol=1e-12)
        fresh.free()
    main.free()
    fork.free()
    assert pool.used_blocks == 0 and all(r == 0 for r in pool.refs)


def test_a_fixed_pool_refuses_and_a_growing_pool_grows():
    pool = KVPool(2, 1, 4, torch.float32, "cpu", block_size=4, capacity_tokens=8)
    a = pool.new_seq()
    a.prepare_write(0, 8)
    with pytest.raises(PoolFull):
        pool.new_seq().prepare_write(0, 1)
    a.free()
    assert pool.free_blocks == 2
    grow = KVPool(2, 1, 4, torch.float32, "cpu", block_size=4, initial_tokens=4)
    s = grow.new_seq()
    s.prepare_write(0, 4)
    grow.kv[:, :, :, s.slot(3)] = 1.5
    s.prepare_write(4, 40)
    assert grow.capacity_tokens >= 40 and float(grow.kv[0, 0, 0, s.slot(3), 0]) == 1.5


def test_a_growing_pool_shrinks_after_a_peak_and_keeps_every_sequence():
    """After a peak the pool gives memory back: live blocks (a fork's shared ones once) move
    down, tables are renumbered, and every sequence still holds exactly its KV."""
    pool = KVPool(2, 1, 3, torch.float64, "cpu", block_size=4, initial_tokens=8)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for n in (30, 9, 50, 21, 64, 3):
        s = pool.new_seq()
        s.prepare_write(0, n)
        s.length = n
        pool.kv[:, :, :, s.slots(0, n)] = torch.rand(2, 2, 1, n, 3, generator=g,
                                                      dtype=torch.float64)
        seqs.append(s)
    fork = seqs[2].fork(48, keep=[1])  # shares 12 full blocks, copies the rest
    peak = pool.blocks
    assert peak == 64 and not pool.shrink()  # well used: nothing to give back
    for s in seqs[:2] + seqs[3:5]:
        s.free()
    keep = [seqs[2], seqs[5], fork]
    want = [s.view() for s in keep]
    assert pool.shrink() and pool.shrinks == 1
    used = pool.used_blocks
    assert pool.blocks == 32 and used == 13 + 1 + 1 and pool.kv.shape[3] == 32 * 4
    assert sorted({b for s in keep for b in s.blocks}) == list(range(used))
    assert pool.refs[keep[0].blocks[0]] == 2 and sum(pool.refs) == 13 + 1 + 13
    for s, (k, v) in zip(keep, want, strict=True):
        k2, v2 = s.view()
        assert torch.equal(k, k2) and torch.equal(v, v2)
    assert torch.count_nonzero(pool.kv[:, :, :, used * 4:]) == 0  # free blocks stay finite
    fork.prepare_write(fork.length, fork.length + 40)  # and the pool works on from there
    assert pool.blocks == 32 and not pool.shrink()
    for s in keep:
        s.free()
    assert pool.shrink() and pool.blocks == 2 and pool.used_blocks == 0  # its initial size


def test_greedy_decoding_is_unchanged_across_a_pool_shrink():
    """The runner shrinks the pool before a forward; the sessions decoding through it still
    match the model's own greedy continuation."""
    model = tiny_model(23)
    runner = PackedRunner(model, block_size=4)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (900, 800, 7, 12)]
    seqs = [runner.new_seq() for _ in prompts]
    logits = runner.forward([Segment.chain(s, p) for s, p in zip(seqs, prompts, strict=True)])
    for s in seqs[:2]:  # the long ones leave: the pool is now mostly empty
        s.free()
    peak = runner.pool.blocks
    out = {i: prompts[i] + [int(logits[i][-1].argmax())] for i in (2, 3)}
    for _ in range(6):
        step = runner.forward([Segment.chain(seqs[i], out[i][-1:]) for i in (2, 3)])
        for i, lg in zip((2, 3), step, strict=True):
            out[i].append(int(lg[-1].argmax()))
    assert runner.pool.shrinks >= 1 and runner.pool.blocks < peak
    for i in (2, 3):
        ref = model.generate(torch.tensor([prompts[i]]), max_new_tokens=7, do_sample=False,
                             min_new_tokens=7)
        assert out[i] == ref[0].tolist()


def test_compiled_flex_matches_the_sdpa_reference(monkeypatch):
    """The compiled FlexAttention path (as on CUDA; here through inductor's CPU kernel) over
    the pool with the per-forward BlockMask gives the reference attention's logits."""
    from specedge.execution import flex

    monkeypatch.setattr(flex, "COMPILE_ON", {"cpu", "cuda"})
    model = tiny_model(19, dtype=torch.float32)
    outs = {}
    for attention in ("sdpa", "flex"):
        runner = PackedRunner(model, block_size=16, attention=attention)
        sessions = random_sessions(5, seed=2)
        seqs = [runner.new_seq() for _ in sessions]
        runner.forward([Segment.chain(s, p[: len(p) // 2 + 1]) for s, (p, _, _) in
                        zip(seqs, sessions, strict=True)])
        outs[attention] = runner.forward([
            Segment.tree(s, p[s.length:], nodes, parents, depths_of(parents))
            for s, (p, parents, nodes) in zip(seqs, sessions, strict=True)])
    for a, b in zip(outs["sdpa"], outs["flex"], strict=True):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_one_sequence_once_per_forward():
    runner = PackedRunner(tiny_model(18))
    s = runner.new_seq()
    with pytest.raises(ValueError):
        runner.forward([Segment.chain(s, [1]), Segment.chain(s, [2])])


def test_backend_probe_keeps_a_good_backend_and_refuses_a_wrong_one(monkeypatch):
    """On CUDA, 'auto' takes flex only after checking it against the sdpa reference, when the
    runner is built (here made to do on the CPU what it does on CUDA)."""
    from specedge.execution import attention

    monkeypatch.setattr("specedge.execution.runner.AUTO", {"cpu": "flex"})
    runner = PackedRunner(tiny_model(20, dtype=torch.float32))
    assert runner.attention == "flex" and runner.forward_calls == 4  # the check's forwards
    assert runner._probe("flex")[0] == "flex"
    real = attention.backend_for

    def broken(name, device):
        if name != "flex":
            return real(name, device)
        _, fn = real("flex", device)
        return "flex", lambda *a: fn(*a) * 1.5  # runs, but computes the wrong thing

    monkeypatch.setattr("specedge.execution.runner.backend_for", broken)
    assert runner._probe("flex")[0] == "sdpa"
    assert runner.pool.used_blocks == 0  # the probe's sequences went back to the pool


def test_static_bucketed_forward_matches_the_eager_one():
    """The CUDA-graph path's static buffers (padding to a bucket, scratch block, persistent
    BlockMask refilled in place), run without capture: same logits as the eager forward, over
    forwards of different sizes that reuse the same buckets; a prefill longer than the top
    rung runs as two forwards, both through buckets."""
    model = tiny_model(21)
    graphed = PackedRunner(model, attention="flex", kv_budget_tokens=4096, cuda_graphs=True)
    eager = PackedRunner(model, attention="sdpa")
    assert graphed.graphs is not None and graphed.graphs.buckets[0].graph is None
    for seed, n in ((1, 3), (2, 7), (3, 2), (4, 12)):
        sessions = random_sessions(n, seed=seed, prefills=False)
        outs = []
        for runner in (graphed, eager):
            seqs = [runner.new_seq() for _ in sessions]
            runner.forward([Segment.chain(s, p[:-1]) for s, (p, _, _) in
                            zip(seqs, sessions, strict=True) if len(p) > 1])
            segs = [Segment.tree(s, p[s.length:], nodes, parents, depths_of(parents))
                    for s, (p, parents, nodes) in zip(seqs, sessions, strict=True)]
            outs.append(runner.forward(segs))
            for s in seqs:
                s.free()
        for a, b in zip(*outs, strict=True):
            assert torch.allclose(a, b, atol=1e-10)
    assert graphed.graphs.replays >= 8  # the prefills and the trees went through the buckets
    long = torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(0)).tolist()
    replays, calls = graphed.graphs.replays, graphed.forward_calls
    (a,) = graphed.forward([Segment.chain(graphed.new_seq(), long)])  # above the top rung
    assert graphed.graphs.replays == replays + 2 and graphed.forward_calls == calls + 2
    assert torch.allclose(a[0], plain_logits(model, long), atol=1e-10)
