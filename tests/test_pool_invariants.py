"""The KV pool's bookkeeping under random operations (seeded, so a failure replays): fixed and
growing pools, writes, forks, rollbacks (keep), truncations, frees, prefix-cache publish and
adopt, evictions and shrinks. After every operation: each block's reference count equals the
block-table entries that name it, the free list, the unused cached blocks and the used blocks
partition the pool, every sequence reads back exactly its tokens (so no shared block was
written through), and an operation refused with PoolFull changed nothing."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from specedge.execution.pool import KVPool, KVSeq, PoolFull
from specedge.execution.prefix import block_hashes

B = 4  # block size: small, so that sequences span many blocks and share some


def check(pool: KVPool, seqs: dict[KVSeq, list[int]]) -> None:
    names = Counter(blk for s in seqs for blk in s.blocks)
    assert pool.refs == [names.get(b, 0) for b in range(pool.blocks)], "refcount != table entries"
    free, lru = set(pool._free), set(pool._lru)
    used = {b for b in range(pool.blocks) if pool.refs[b] > 0}
    assert len(free) == len(pool._free), "a block twice on the free list"
    assert not (free & lru) and not (free & used) and not (lru & used)
    assert free | lru | used == set(range(pool.blocks)), "a block neither free, cached nor used"
    assert lru <= set(pool._hash_of), "an unused block kept that nobody can adopt"
    assert pool._by_hash == {h: b for b, h in pool._hash_of.items()}
    if pool.cache_max is not None:
        assert len(lru) <= pool.cache_max
    for s, toks in seqs.items():
        assert s.length == len(toks) and len(s.blocks) == -(-s.length // B)
        got = s.view()[0][0, 0, :, 0].round().long().tolist()  # layer 0, head 0, dim 0
        assert got == toks, "a sequence does not read back its tokens"


def snapshot(pool: KVPool, seqs: dict[KVSeq, list[int]]):
    return (list(pool.refs), sorted(pool._free), list(pool._lru), dict(pool._hash_of),
            pool.blocks, [(list(s.blocks), s.length) for s in seqs])


def write(pool: KVPool, seq: KVSeq, toks: list[int]) -> None:
    """What the runner does for a forward: make the range writable, then scatter into it."""
    n = seq.length
    seq.prepare_write(n, n + len(toks))
    pool.flush()
    slots = torch.tensor(seq.slots(n, n + len(toks)), dtype=torch.long)
    val = torch.tensor(toks, dtype=pool.dtype).reshape(1, -1, 1)
    for layer in sorted(pool.layout.shapes):
        pool.write(layer, val, val, slots)
    seq.length += len(toks)


def hashes(toks: list[int]) -> list[bytes]:
    return block_hashes(toks, B)


def run_ops(seed: int, fixed: bool, steps: int = 250) -> Counter:
    rng = random.Random(seed)
    pool = KVPool(2, 1, 1, torch.float64, "cpu", block_size=B,
                  capacity_tokens=24 * B if fixed else None, initial_tokens=4 * B,
                  cache_blocks=rng.choice([None, 3, 8]))
    seqs: dict[KVSeq, list[int]] = {}
    done: Counter = Counter()
    # a few stems so that prompts share prefixes (adoptable) more often than by chance
    stems = [[rng.randrange(1, 50) for _ in range(rng.randrange(B, 4 * B))] for _ in range(3)]

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1, 50) for _ in range(n)]

    for _ in range(steps):
        op = rng.choice(["new", "new", "append", "fork", "keep", "truncate", "free", "publish",
                         "shrink", "cache", "clear"])
        if op not in ("new", "shrink", "cache", "clear") and not seqs:
            op = "new"
        s = rng.choice(list(seqs)) if seqs else None
        before = snapshot(pool, seqs)
        try:
            if op == "new":
                prompt = rng.choice(stems)[: rng.randrange(1, 4 * B)] + tokens(rng.randrange(6))
                seq = pool.new_seq()
                got = seq.adopt(hashes(prompt)) if rng.random() < 0.7 else 0
                seqs[seq] = prompt[:got]
                done["adopted_tokens"] += got
                check(pool, seqs)
                adopted = snapshot(pool, seqs)
                try:
                    write(pool, seq, prompt[got:])
                    seqs[seq] = prompt
                except PoolFull:  # the prefill refused whole; the sequence is given up
                    assert snapshot(pool, seqs) == adopted, "PoolFull in a prefill changed it"
                    done["pool_full"] += 1
                    seq.free()
                    del seqs[seq]
            elif op == "append":
                toks = tokens(rng.randrange(1, 2 * B))
                write(pool, s, toks)
                seqs[s] = seqs[s] + toks
            elif op == "fork":
                base = rng.randrange(len(seqs[s]) + 1)
                tail = len(seqs[s]) - base
                keep = sorted(rng.sample(range(tail), rng.randrange(tail + 1))) if tail else []
                f = s.fork(base, keep)
                seqs[f] = seqs[s][:base] + [seqs[s][base + k] for k in keep]
            elif op == "keep":
                base = rng.randrange(len(seqs[s]) + 1)
                tail = len(seqs[s]) - base
                keep = rng.sample(range(tail), rng.randrange(tail + 1)) if tail else []
                s.keep(base, keep)
                seqs[s] = seqs[s][:base] + [seqs[s][base + k] for k in keep]
            elif op == "truncate":
                n = rng.randrange(len(seqs[s]) + 1)
                s.truncate(n)
                seqs[s] = seqs[s][:n]
            elif op == "free":
                s.free()
                del seqs[s]
            elif op == "clear":  # most sequences end at once: a growing pool may shrink
                for f in rng.sample(list(seqs), len(seqs) * 3 // 4):
                    f.free()
                    del seqs[f]
            elif op == "publish":
                done["published"] += s.publish(hashes(seqs[s]))
            elif op == "shrink":
                done["shrinks"] += pool.shrink()
            elif op == "cache":
                pool.enable_cache(rng.choice([None, 0, 2, 8]))
            done[op] += 1
        except PoolFull:
            done["pool_full"] += 1
            assert snapshot(pool, seqs) == before, f"PoolFull in {op} changed the pool"
        check(pool, seqs)
    for s in list(seqs):
        s.free()
    check(pool, {})
    assert pool.used_blocks == 0
    done["evictions"] = pool.cache_evictions
    return done


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "growing"])
def test_random_operations_keep_the_bookkeeping_exact(fixed):
    total: Counter = Counter()
    for seed in range(12):
        total += run_ops(seed, fixed)
    # the runs did reach the cases they are about
    assert total["fork"] > 50 and total["keep"] > 50 and total["adopted_tokens"] > 0
    assert total["published"] > 0 and total["evictions"] > 0
    if fixed:
        assert total["pool_full"] > 5
    else:
        assert total["shrinks"] > 0


def test_fork_on_a_full_fixed_pool_takes_no_reference():
    """The failure the issue names: fork increfs the shared blocks, then cannot allocate."""
    pool = KVPool(1, 1, 1, torch.float64, "cpu", block_size=B, capacity_tokens=3 * B)
    seq = pool.new_seq()
    write(pool, seq, list(range(1, 3 * B)))  # 2 full blocks + a partial one: the pool is full
    refs = list(pool.refs)
    with pytest.raises(PoolFull):
        seq.fork(2 * B + 1)  # shares 2 blocks, needs one for the partial block
    assert pool.refs == refs and pool._free == []
    f = seq.fork(2 * B)  # shares every full block, needs none
    with pytest.raises(PoolFull):  # a copy on write that cannot get its block
        f.prepare_write(B, B + 1)
    assert pool.refs[seq.blocks[1]] == 2 and f.blocks == seq.blocks[:2]
    f.free()
    assert pool.refs == refs
