"""The pool's prefix cache: chained block hashes, adopting and publishing blocks, eviction
only under pressure, copy on write, renumbering on shrink; and a forward over an adopted
prefix must give exactly the logits of a fresh prefill."""

import torch

from specedge.execution import KVPool, PackedRunner, Segment
from specedge.execution.prefix import Chain, block_hashes, mix, root
from specedge.execution.tree import depths_of
from tests.conftest import tiny_model

B = 4


def tiny_pool(**kw) -> KVPool:
    return KVPool(1, 1, 2, torch.float64, "cpu", block_size=B, **kw)


def filled(pool: KVPool, tokens: list[int]):
    """A sequence holding len(tokens) positions whose KV is a function of the tokens."""
    seq = pool.new_seq()
    seq.prepare_write(0, len(tokens))
    for p, t in enumerate(tokens):
        pool.kv[:, :, :, seq.slot(p)] = float(t)
    seq.length = len(tokens)
    return seq


# -- hashes ---------------------------------------------------------------------------------

def test_hashes_are_chained_salted_and_ignore_a_partial_block():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], B)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], B)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1]  # the same second block after a different first one
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], B) == a[:1]  # the partial block: no hash
    assert block_hashes([1, 2, 3, 4], B, salt=b"alice") != block_hashes([1, 2, 3, 4], B,
                                                                        salt=b"bob")
    assert block_hashes([5, 6, 7, 8], B, parent=a[0]) == a[1:]


def test_chain_grows_incrementally_and_scopes_a_shared_prefix():
    toks = list(range(20))
    c = Chain(B, salt=b"alice")
    for n in (3, 4, 9, 20):
        c.update(toks[:n])
    assert c.hashes == block_hashes(toks, B, salt=b"alice")
    # 10 shared tokens: blocks 0-1 under the shared salt, the rest under the tenant's
    alice = Chain(B, b"alice", b"shared:sys", 10).update(toks)
    bob = Chain(B, b"bob", b"shared:sys", 10).update(toks)
    assert alice[:2] == bob[:2] == block_hashes(toks[:8], B, salt=b"shared:sys")
    assert alice[2] != bob[2]
    assert alice[2:] == block_hashes(toks[8:], B, parent=mix(alice[1], b"alice"))
    assert alice[0] != root(b"alice") and alice[0] != Chain(B, b"alice").update(toks)[0]
    # no shared salt configured (an unknown name): the tenant salt throughout
    assert Chain(B, b"alice", b"", 10).update(toks) == block_hashes(toks, B, salt=b"alice")


# -- the pool -------------------------------------------------------------------------------

def test_publish_then_adopt_shares_the_leading_blocks():
    pool = tiny_pool(capacity_tokens=32, cache_blocks=None)
    toks = list(range(1, 12))  # two full blocks and a partial one
    hs = block_hashes(toks, B)
    a = filled(pool, toks)
    assert a.publish(hs) == 2 and pool.cached_blocks == 2
    assert a.publish(hs) == 0  # already registered
    b = pool.new_seq()
    assert b.adopt(hs + block_hashes(toks + [0], B)[2:]) == 8
    assert b.blocks == a.blocks[:2] and pool.refs[a.blocks[0]] == 2
    assert pool.cache_hit_blocks == 2 and pool.cache_hit_tokens == 8
    # a different prompt adopts up to where it differs
    c = pool.new_seq()
    assert c.adopt(block_hashes(toks[:4] + [99] * 8, B)) == 4


def test_freed_blocks_stay_cached_until_the_room_is_needed():
    pool = tiny_pool(capacity_tokens=16, cache_blocks=None)  # 4 blocks
    toks = list(range(1, 9))
    hs = block_hashes(toks, B)
    a = filled(pool, toks)
    a.publish(hs)
    a.free()
    assert pool.used_blocks == 0 and pool.free_blocks == 4 and pool.can_take(4)
    b = pool.new_seq()
    assert b.adopt(hs) == 8  # still there after its session ended
    b.free()
    c = pool.new_seq()
    c.prepare_write(0, 8)  # two free blocks: the cache is untouched
    assert pool.cache_evictions == 0 and pool.cached_blocks == 2
    c.prepare_write(8, 12)  # the third needs a cached one: the least recently used goes
    assert pool.cache_evictions == 1
    assert pool.new_seq().adopt(hs) == 0  # its first block was the oldest freed one


def test_a_growing_pool_grows_rather_than_evict_below_its_cap():
    """On a pool that grows (the CPU's, an edge's) the cache is bounded by its cap, not by
    the size the pool happens to have: a new sequence grows the pool, the cache stays."""
    pool = tiny_pool(capacity_tokens=None, initial_tokens=8, cache_blocks=None)  # 2 blocks
    toks = list(range(1, 9))
    hs = block_hashes(toks, B)
    a = filled(pool, toks)
    a.publish(hs)
    a.free()
    pool.new_seq().prepare_write(0, 8)  # no free block: grows
    assert pool.cache_evictions == 0 and pool.blocks == 4
    assert pool.new_seq().adopt(hs) == 8


def test_the_cap_bounds_unused_cached_blocks():
    pool = tiny_pool(capacity_tokens=64, cache_blocks=1)
    toks = list(range(1, 9))
    a = filled(pool, toks)
    a.publish(block_hashes(toks, B))
    a.free()
    assert pool.cached_blocks == 1 and pool.cache_evictions == 1
    assert tiny_pool(capacity_tokens=64).new_seq().publish(block_hashes(toks, B)) == 0  # off


def test_a_cached_block_is_never_written_in_place():
    pool = tiny_pool(capacity_tokens=64, cache_blocks=None)
    toks = list(range(1, 9))
    hs = block_hashes(toks, B)
    a = filled(pool, toks)
    a.publish(hs)
    b = pool.new_seq()
    b.adopt(hs)
    b.truncate(6)  # a rollback into the second block, then a write there: copy on write
    b.prepare_write(6, 8)
    assert b.blocks[1] != a.blocks[1] and pool.lookup(hs[1]) == a.blocks[1]
    pool.flush()
    assert torch.equal(pool.kv[:, :, :, b.slot(5)], pool.kv[:, :, :, a.slot(5)])
    b.free()
    # its only user writes into it: it leaves the cache first
    a.truncate(6)
    a.prepare_write(6, 8)
    assert pool.lookup(hs[1]) is None and pool.lookup(hs[0]) == a.blocks[0]
    assert pool.new_seq().adopt(hs) == 4


def test_shrink_renumbers_the_cache():
    pool = tiny_pool(initial_tokens=8, cache_blocks=None)  # 2 blocks, grows
    big = filled(pool, list(range(100, 164)))  # 16 blocks
    toks = list(range(1, 9))
    hs = block_hashes(toks, B)
    a = filled(pool, toks)
    a.publish(hs)
    want = a.view()
    a.free()
    big.free()
    assert pool.blocks == 32 and pool.shrink() and pool.blocks < 32
    b = pool.new_seq()
    assert b.adopt(hs) == 8
    k, v = b.view()
    assert torch.equal(k, want[0]) and torch.equal(v, want[1])


def test_a_forward_over_an_adopted_prefix_matches_a_fresh_prefill():
    model = tiny_model(21)
    runner = PackedRunner(model, block_size=B)
    runner.pool.enable_cache(None)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 256, (23,), generator=g).tolist()
    nodes, parents = torch.randint(0, 256, (4,), generator=g).tolist(), [0, 0, 1, 2]
    first = runner.new_seq()
    (want,) = runner.forward([Segment.tree(first, prompt, nodes, parents, depths_of(parents))])
    first.keep(0, list(range(len(prompt))))  # the verifier's rollback: the prompt stays
    first.publish(block_hashes(prompt, B))
    first.free()
    second = runner.new_seq()
    have = second.adopt(block_hashes(prompt[:-1], B))  # the root is always computed
    assert have == 20
    (got,) = runner.forward([Segment.tree(second, prompt[have:], nodes, parents,
                                          depths_of(parents))])
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_block_hashes_are_keyed_per_process():
    """Keyed with a secret the process draws at start: another process (an attacker's copy of
    the code included) computes other hashes for the same tokens."""
    import os
    import subprocess
    import sys

    from tests.procs import ROOT

    toks = list(range(1, 2 * B + 1))
    here = block_hashes(toks, B)
    code = ("from specedge.execution.prefix import block_hashes; "
            f"print(block_hashes({toks}, {B})[0].hex())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bytes.fromhex(there.stdout.strip()) != here[0] and len(here[0]) == 16
    assert block_hashes(toks, B) == here  # stable within the process
