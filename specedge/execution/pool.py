"""One paged KV pool per model: every session's keys and values in fixed-size blocks.

Each layer keeps what its attention call receives (kvlayout.py): layers of one shape share a
tensor [layers, 2, heads, slots, dim] (keys and values of one width), or a pair
[layers, 1, heads, slots, key_dim] and [layers, 1, heads, slots, value_dim] (MLA's keys and
values differ); a layer that reads another's KV (shared KV) has none of its own. Every tensor
has its slots on dimension 3, slot = block * block_size + offset in all of them, so one block
table holds for every layer. A sequence (`KVSeq`) owns a block table, so writing a forward's
new tokens is one scatter per layer for the whole batch, and rollback, forking and truncation
are block-table edits plus copies that are queued and run as one batched copy per tensor
before the next forward (`flush`). Blocks are reference counted: a fork shares its parent's
full blocks and copies a shared block only when one side writes into it.

An opt-in prefix cache (`cache_blocks`) keeps finished sequences' full blocks under chained
hashes of their tokens (prefix.py): `KVSeq.publish` registers a sequence's blocks, and a new
sequence whose tokens start the same way `adopt`s them (shared, copy on write) and computes
only the rest. Registered blocks nobody uses wait in a least-recently-used list, at most
`cache_blocks` of them; a fixed pool also takes them back when no free block is left, so the
cache never makes a live sequence fail (a growing pool grows instead).

A model with recurrent or convolution state (hybrids) also gets a `StatePool` (statepool.py):
each sequence then carries its state, and the verbs below carry it along.

Freed blocks keep finite values (the pool starts zeroed): padded attention reads them with
zero weight, and zero times a NaN would not be zero.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import torch

from specedge.execution.kvlayout import KVLayout, LayerKV, discover
from specedge.execution.statepool import SeqState, StatePool


class PoolFull(RuntimeError):
    """No free block and the pool may not grow (its budget is spent)."""


class KVPool:
    def __init__(self, layers: int | KVLayout, kv_heads: int = 0, head_dim: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                 block_size: int = 16, capacity_tokens: int | None = None,
                 initial_tokens: int = 1024, cache_blocks: int | None = 0):
        """layers: a KVLayout (each layer's shape), or a layer count with every layer
        kv_heads x head_dim in `dtype`. capacity_tokens: a fixed budget (rounded up to whole
        blocks), allocated now; None: start with initial_tokens, double when full and halve
        (or more) once at most a quarter is used (`shrink`). cache_blocks: unused blocks the
        prefix cache may keep (0: no cache, None: as many as the pool holds)."""
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if isinstance(layers, int):
            layers = KVLayout.uniform(layers, kv_heads, head_dim, dtype)
        self.layout = layers
        self.block_size = block_size
        self.fixed = capacity_tokens is not None
        tokens = capacity_tokens if capacity_tokens is not None else initial_tokens
        blocks = max(1, -(-tokens // block_size))
        shapes = list(layers.shapes.values())
        self.dtype = shapes[0].dtype if shapes else dtype
        self.device = torch.device(device)
        # the tensors (`store`) and, per storing layer, where its keys and values are in them:
        # (tensor, row, channel) each
        self.store: list[torch.Tensor] = []
        self._where: dict[int, tuple[tuple[int, int, int], tuple[int, int, int]]] = {}
        for shape, members in layers.groups().items():
            self._add_group(shape, members, blocks * block_size)
        for layer, src in layers.shares.items():
            self._where[layer] = self._where[src]
        self.refs = [0] * blocks
        self._free = list(range(blocks - 1, -1, -1))  # a stack: low block ids first
        # One lock for the pool and the forward that uses it: sessions on an edge fork and roll
        # back from their own threads while another thread's forward runs.
        self.lock = threading.RLock()
        self._src: list[int] = []
        self._dst: list[int] = []
        self._pending_dst: set[int] = set()
        self.copies_flushed = 0  # batched copies run (tests count them)
        self.min_blocks = blocks
        self.shrinks = 0
        self._seqs: weakref.WeakSet[KVSeq] = weakref.WeakSet()  # the tables `shrink` renumbers
        # the prefix cache: hash <-> block for registered blocks; those with no user, oldest
        # use first (evictable)
        self.cache_max: int | None = cache_blocks
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.cache_hit_blocks = 0  # blocks adopted from the cache
        self.cache_hit_tokens = 0
        self.cache_evictions = 0  # cached blocks given back to make room (or past the cap)
        # recurrent state beside the KV (statepool.py), set by a runner whose model has
        # stateful layers: every sequence then carries its state through the verbs below
        self.states: StatePool | None = None

    def _add_group(self, shape: LayerKV, members: list[int], slots: int) -> None:
        n, t = len(members), len(self.store)
        if shape.key_dim == shape.value_dim:  # keys and values in one tensor
            self.store.append(self._zeros((n, 2, shape.heads, slots, shape.key_dim), shape))
            where = [((t, r, 0), (t, r, 1)) for r in range(n)]
        else:
            self.store.append(self._zeros((n, 1, shape.heads, slots, shape.key_dim), shape))
            self.store.append(self._zeros((n, 1, shape.heads, slots, shape.value_dim), shape))
            where = [((t, r, 0), (t + 1, r, 0)) for r in range(n)]
        self._where.update(zip(members, where, strict=True))

    def _zeros(self, shape: tuple[int, ...], like: LayerKV | torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=like.dtype, device=self.device)

    @classmethod
    def for_model(cls, model, **kw) -> KVPool:
        """A pool for each layer's KV as the model's attention receives it (kvlayout.py)."""
        return cls(discover(model), device=next(model.parameters()).device, **kw)

    # -- sizes -----------------------------------------------------------------------------

    @property
    def blocks(self) -> int:
        return len(self.refs)

    @property
    def capacity_tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can have without growing: free ones and evictable cached."""
        return len(self._free) + len(self._lru)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds."""
        return self.blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered blocks (in use or evictable)."""
        return len(self._hash_of)

    @property
    def caching(self) -> bool:
        return self.cache_max != 0

    @property
    def bytes_per_token(self) -> int:
        """Every storing layer's keys and values of one token (the layout's sum)."""
        return sum(t.numel() // t.shape[3] * t.element_size() for t in self.store)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store)

    @property
    def kv(self) -> torch.Tensor:
        """The one tensor [layers, 2, heads, slots, dim] of a model whose layers all have one
        shape and none shares (tests and tools; the forward path uses keys/values)."""
        if len(self.store) != 1 or self.store[0].shape[1] != 2 or \
                len(self.layout.shapes) != self.layout.layers:
            raise AttributeError("a pool of several layer shapes has no single KV tensor")
        return self.store[0]

    def can_take(self, blocks: int) -> bool:
        """Whether `blocks` more blocks can be had (a growable pool always can)."""
        return not self.fixed or blocks <= self.free_blocks

    def enable_cache(self, max_blocks: int | None) -> None:
        """Turn the prefix cache on (max_blocks unused blocks kept; None: any) or off (0)."""
        with self.lock:
            self.cache_max = max_blocks
            self._trim_cache()
            if max_blocks == 0:
                self._by_hash.clear()
                self._hash_of.clear()
                if self.states is not None:
                    self.states.checkpoints.clear()

    # -- blocks ----------------------------------------------------------------------------

    def alloc(self) -> int:
        with self.lock:
            if not self._free:
                # a fixed pool evicts cached blocks before it fails; a growing one grows (its
                # cache is bounded by cache_max, not by the size the pool happens to have)
                if self._lru and self.fixed:
                    self._evict()
                else:
                    self._grow()
            b = self._free.pop()
            self.refs[b] = 1
            return b

    def incref(self, block: int) -> None:
        if self.refs[block] == 0:  # an unused cached block comes back into use
            del self._lru[block]
        self.refs[block] += 1

    def decref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._hash_of:
                self._lru[block] = None  # the most recently used end
                self._trim_cache()
            else:
                self._free.append(block)

    # -- the prefix cache --------------------------------------------------------------------

    def lookup(self, h: bytes) -> int | None:
        return self._by_hash.get(h)

    def cached_run(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest leading run of `hashes` (none taken)."""
        out = []
        for h in hashes:
            blk = self._by_hash.get(h)
            if blk is None:
                break
            out.append(blk)
        return out

    def register(self, block: int, h: bytes) -> bool:
        """Cache `block` (a full block some sequence holds) under `h`; False if either is
        registered already or the cache is off."""
        if not self.caching or h in self._by_hash or block in self._hash_of:
            return False
        self._by_hash[h] = block
        self._hash_of[block] = h
        return True

    def unregister(self, block: int) -> None:
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._by_hash[h]
            if self.states is not None:  # a state checkpoint goes with its block
                self.states.checkpoints.pop(h, None)
        if block in self._lru:  # it was unused: now simply free
            del self._lru[block]
            self._free.append(block)

    def _evict(self) -> None:
        """The least recently used unused cached block back to the free list."""
        block = next(iter(self._lru))
        self.unregister(block)
        self.cache_evictions += 1

    def _trim_cache(self) -> None:
        if self.cache_max is not None:
            while len(self._lru) > self.cache_max:
                self._evict()

    def _grow(self) -> None:
        if self.fixed:
            raise PoolFull(f"KV pool full: {self.blocks} blocks of {self.block_size} tokens")
        old = self.blocks
        for i, t in enumerate(self.store):
            new = self._zeros((*t.shape[:3], 2 * old * self.block_size, t.shape[4]), t)
            new[:, :, :, : old * self.block_size] = t
            self.store[i] = new
        self.refs.extend([0] * old)
        self._free = list(range(2 * old - 1, old - 1, -1)) + self._free

    def _shrunk_size(self) -> int | None:
        """The block count a growable pool at most a quarter used shrinks to (twice what it
        uses, in powers of two from its initial size, so that growing back takes usage
        quadrupling), or None."""
        used = self.used_blocks + len(self._lru)  # the cache keeps its blocks (it is capped)
        if self.fixed or 4 * used > self.blocks:
            return None
        target = self.min_blocks
        while target < 2 * used:
            target *= 2
        return target if target < self.blocks else None

    def shrink(self) -> bool:
        """Give memory back after a peak (a CPU verifier once holding many long sessions):
        the live blocks move to the lowest ids in one batched copy into a smaller tensor, and
        every sequence's block table is renumbered. The caller holds no slots across it (the
        runner calls it before planning a forward)."""
        with self.lock:
            target = self._shrunk_size()
            if target is None:
                return False
            self.flush()
            live = [blk for blk, r in enumerate(self.refs) if r > 0] + list(self._lru)
            renum = {old: new for new, old in enumerate(live)}
            b = self.block_size
            src = torch.tensor([blk * b + o for blk in live for o in range(b)],
                               dtype=torch.long).to(self.device, non_blocking=True)
            for i, t in enumerate(self.store):
                new = self._zeros((*t.shape[:3], target * b, t.shape[4]), t)
                if live:
                    new[:, :, :, : len(live) * b] = t.index_select(3, src)
                self.store[i] = new
            self.refs = [self.refs[blk] for blk in live] + [0] * (target - len(live))
            self._free = list(range(target - 1, len(live) - 1, -1))
            for seq in list(self._seqs):
                seq.blocks = [renum[blk] for blk in seq.blocks]
            self._hash_of = {renum[blk]: h for blk, h in self._hash_of.items()}
            self._by_hash = {h: blk for blk, h in self._hash_of.items()}
            self._lru = OrderedDict((renum[blk], None) for blk in self._lru)
            self.shrinks += 1
            return True

    # -- copies ----------------------------------------------------------------------------

    def queue_copy(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy slots src[i] -> dst[i] (all layers, keys and values) before the next forward.
        All queued copies run as one gather and one scatter, so they read the values from
        before any of them; a copy that reads or overwrites a slot that a queued copy
        writes flushes the queue first."""
        if not src:
            return
        with self.lock:
            if self._pending_dst and (not self._pending_dst.isdisjoint(src)
                                      or not self._pending_dst.isdisjoint(dst)):
                self.flush()
            self._src.extend(src)
            self._dst.extend(dst)
            self._pending_dst.update(dst)

    def flush(self) -> None:
        with self.lock:
            if not self._src:
                return
            src = torch.tensor(self._src, dtype=torch.long).to(self.device, non_blocking=True)
            dst = torch.tensor(self._dst, dtype=torch.long).to(self.device, non_blocking=True)
            for t in self.store:
                t.index_copy_(3, dst, t.index_select(3, src))
            self._src, self._dst, self._pending_dst = [], [], set()
            self.copies_flushed += 1

    # -- layer access (inside a forward) ----------------------------------------------------

    def keys(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s keys over every slot [heads, slots, key_dim] (a view; a layer
        that shares KV gets its source's)."""
        t, row, ch = self._where[layer][0]
        return self.store[t][row, ch]

    def values(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s values over every slot [heads, slots, value_dim] (a view)."""
        t, row, ch = self._where[layer][1]
        return self.store[t][row, ch]

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor,
              slots: torch.Tensor) -> None:
        """key/value [heads, n, dim] of n new tokens into their slots: one scatter each. A
        layer that shares another's KV writes nothing: it was handed the very keys and
        values its source wrote earlier in this forward (kvlayout.py)."""
        if layer in self.layout.shares:
            return
        self.keys(layer).index_copy_(1, slots, key)
        self.values(layer).index_copy_(1, slots, value)

    def new_seq(self) -> KVSeq:
        return KVSeq(self)


class KVSeq:
    """One sequence's KV: a block table over the pool and a length (positions 0..length-1)."""

    def __init__(self, pool: KVPool):
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self.rec: SeqState | None = pool.states.new() if pool.states is not None else None
        with pool.lock:  # `shrink` may be walking the set from another thread
            pool._seqs.add(self)

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    @property
    def nbytes(self) -> int:
        return self.capacity * self.pool.bytes_per_token

    def slot(self, pos: int) -> int:
        b = self.pool.block_size
        return self.blocks[pos // b] * b + pos % b

    def slots(self, start: int, end: int) -> list[int]:
        b, blocks = self.pool.block_size, self.blocks
        return [blocks[p // b] * b + p % b for p in range(start, end)]

    def blocks_needed(self, length: int) -> int:
        """New blocks a write up to `length` would allocate (shared blocks it would copy are
        not counted: only forks on an edge share, and an edge's pool grows)."""
        return max(0, -(-length // self.pool.block_size) - len(self.blocks))

    def prepare_write(self, start: int, end: int) -> None:
        """Make positions [start, end) writable: allocate blocks up to `end` and give this
        sequence its own copy of any shared block in the range (copy on write). A cached
        block is never written in place: copied if others use it, else uncached first."""
        pool, b = self.pool, self.pool.block_size
        with pool.lock:
            # all or nothing: a fixed pool that cannot give every block fails before any edit
            shared = sum(pool.refs[blk] > 1 for blk in self.blocks[start // b : -(-end // b)])
            if not pool.can_take(self.blocks_needed(end) + shared):
                raise PoolFull(f"KV pool full: {pool.free_blocks} of {pool.blocks} blocks free")
            while self.capacity < end:
                self.blocks.append(pool.alloc())
            for i in range(start // b, -(-end // b)):
                old = self.blocks[i]
                if pool.refs[old] > 1:
                    new = pool.alloc()
                    pool.queue_copy(range(old * b, old * b + b), range(new * b, new * b + b))
                    pool.decref(old)
                    self.blocks[i] = new
                elif old in pool._hash_of:
                    pool.unregister(old)

    def adopt(self, hashes: Sequence[bytes]) -> int:
        """On an empty sequence: take the longest leading run of `hashes` the cache holds as
        this sequence's first blocks (shared) and return how many tokens that is."""
        pool = self.pool
        with pool.lock:
            if self.blocks or self.length:
                raise ValueError("adopt needs an empty sequence")
            run = pool.cached_run(hashes)
            if self.rec is not None:  # up to the last block whose state is checkpointed
                cps = pool.states.checkpoints
                while run and hashes[len(run) - 1] not in cps:
                    run.pop()
                if run:
                    self.rec.adopt(len(run) * pool.block_size - 1, cps[hashes[len(run) - 1]])
            self.blocks = run
            for blk in self.blocks:
                pool.incref(blk)
            self.length = len(self.blocks) * pool.block_size
            pool.cache_hit_blocks += len(self.blocks)
            pool.cache_hit_tokens += self.length
            return self.length

    def publish(self, hashes: Sequence[bytes]) -> int:
        """Cache this sequence's leading full blocks, block i under hashes[i] (those inside
        [0, length) only); the number newly registered."""
        pool = self.pool
        with pool.lock:
            if not pool.caching:
                return 0
            full = min(len(hashes), self.length // pool.block_size)
            n = sum(pool.register(self.blocks[i], hashes[i]) for i in range(full))
            if self.rec is not None:  # the state checkpoints, under their blocks' hashes
                b = pool.block_size
                for pos, state in self.rec.marks.items():
                    i = (pos + 1) // b - 1
                    if (pos + 1) % b == 0 and i < full and hashes[i] in pool._by_hash:
                        pool.states.checkpoints.setdefault(hashes[i], state)
            return n

    def _release_beyond(self, length: int) -> None:
        keep = -(-length // self.pool.block_size)
        for blk in self.blocks[keep:]:
            self.pool.decref(blk)
        del self.blocks[keep:]

    def keep(self, base: int, keep: Sequence[int]) -> None:
        """Keep positions base + keep[i] (in that order) right after `base` and drop the rest
        of the tail: the rollback after a verdict (rejected branches vanish, the accepted path
        becomes contiguous). The moves are queued; they run before the next forward."""
        keep = list(keep)
        if any(not 0 <= k < self.length - base for k in keep):
            raise IndexError(f"keep indices {keep} outside tail of {self.length - base}")
        with self.pool.lock:
            moves = [(base + k, base + i) for i, k in enumerate(keep) if k != i]
            if moves:
                self.prepare_write(moves[0][1], base + len(keep))
                self.pool.queue_copy([self.slot(s) for s, _ in moves],
                                     [self.slot(d) for _, d in moves])
            self.length = base + len(keep)
            self._release_beyond(self.length)
            if self.rec is not None:
                self.rec.keep(base, keep)

    def fork(self, base: int, keep: Sequence[int] = ()) -> KVSeq:
        """A new sequence holding positions [0, base) plus tail entries base + keep[i]. Full
        blocks below `base` are shared, not copied; the partial block and the kept tail are
        queued copies. The edge forks its draft KV to draft ahead on a guess."""
        keep = list(keep)
        pool, b = self.pool, self.pool.block_size
        with pool.lock:
            full = base // b
            length = base + len(keep)
            # the blocks first, references after: a full pool fails here with nothing taken
            if not pool.can_take(max(0, -(-length // b) - full)):
                raise PoolFull(f"KV pool full: {pool.free_blocks} of {pool.blocks} blocks free")
            new = KVSeq(pool)
            for blk in self.blocks[:full]:
                pool.incref(blk)
            new.blocks = list(self.blocks[:full])
            new.length = length
            if self.rec is not None:
                new.rec = self.rec.fork(base, keep)
            start = full * b
            try:
                if new.length > start:
                    new.prepare_write(start, new.length)
                    src = self.slots(start, base) + [self.slot(base + k) for k in keep]
                    pool.queue_copy(src, new.slots(start, new.length))
            except BaseException:
                new.free()  # every reference it took goes back
                raise
            return new

    def truncate(self, length: int) -> None:
        """Drop positions from `length` on. With recurrent state, a length whose state is not
        held (inside a chunked run) empties the sequence: the caller's next forward rebuilds
        it from the tokens, exactly, instead of going on from a wrong state."""
        with self.pool.lock:
            self.length = min(self.length, length)
            if self.rec is not None and not self.rec.truncate(self.length):
                self.pool.states.rebuilds += 1
                self.length = 0
            self._release_beyond(self.length)

    def free(self) -> None:
        with self.pool.lock:
            self._release_beyond(0)
            self.length = 0
            if self.rec is not None:
                self.rec.clear()

    def view(self) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
        """Keys and values of positions [0, length), per storing layer in layer order:
        [heads, length, dim] each, stacked into [layers, heads, length, dim] when the layers
        have one shape (a gathered copy; for tests and inspection, not the forward path)."""
        pool = self.pool
        with pool.lock:
            pool.flush()
            idx = torch.tensor(self.slots(0, self.length), dtype=torch.long, device=pool.device)
            layers = sorted(pool.layout.shapes)
            k = [pool.keys(i).index_select(1, idx) for i in layers]
            v = [pool.values(i).index_select(1, idx) for i in layers]
            if len(set(pool.layout.shapes.values())) == 1:
                return torch.stack(k), torch.stack(v)
            return k, v
