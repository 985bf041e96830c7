"""CUDA graphs of the packed forward, one per bucket of packed tokens.

Eager transformers on a GPU is launch-bound: a 1.5B forward costs about the same from 1 to
1024 tokens (DESIGN section 6a). A captured graph replays the whole forward's kernels at
once. For that every input and piece of metadata lives in persistent buffers of the bucket's
size, updated in place before each replay: token ids, positions, slot mapping, and the
FlexAttention BlockMask's tensors (the query layout, each query block's full and partial pool
blocks, the inverse block tables, the padded rows' segment, `upto`, tree window and ancestor
bits). A bucket is a pair of ladder rungs (qblocks.LADDER): the packed rows the model runs,
and the padded query rows attention runs (each segment starts its own query block), so the
compiled flex shapes are the ladder's and nothing else. Padding rows write to a scratch
block that no query block visits. More segments than MAX_SEGMENTS, or trees wider than BITS,
run eagerly; forwards larger than the top rung are split by the runner.

Graphs need the flex backend (static shapes: the keys are the whole pool) and a pool of fixed
size (its tensor must not move). The static path runs on any device; only the capture is
CUDA's, so the padding and buffer logic is tested on the CPU (`capture=False`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
import torch
from torch.nn.attention.flex_attention import BlockMask

from specedge.execution.flex import (
    BITS,
    fill_p2l,
    flex_pool_attention,
    make_mask_mod,
)
from specedge.execution.plan import Segment, tree_positions
from specedge.execution.pool import KVPool
from specedge.execution.qblocks import LADDER, MAX_SEGMENTS, Q_BLOCK, layout, padded, rung

log = structlog.get_logger(__name__)
BUCKETS = LADDER  # the rungs graphs are captured for


@dataclass
class StaticPlan:
    """What the attention function reads during a graphed forward (cf. ForwardPlan)."""

    pool: KVPool
    slots: torch.Tensor
    cache: dict = field(default_factory=dict)
    attention_calls: int = 0


class QueryBuffers:
    """The attention side of a rung of `rows` padded query rows: the padded rows' metadata,
    each layer kind's block lists and the BlockMasks over them (shared by every bucket whose
    forwards pad to this rung; flex's compiled shape depends on this alone)."""

    def __init__(self, runner, rows: int, p2l: torch.Tensor):
        pool, dev = runner.pool, runner.device
        self.rows, self.kinds = rows, sorted(runner.mask_kinds, key=str)
        self.ints = torch.zeros(5 * rows, dtype=torch.long, device=dev)
        self.src, self.upto, self.window, self.seg_of, self.pos = self.ints.split(rows)
        self.bits = torch.zeros(rows, BITS, dtype=torch.bool, device=dev)
        self.tree_pos = torch.zeros(rows, BITS, dtype=torch.long, device=dev)
        qb = rows // Q_BLOCK
        self.blocks: dict = {}
        self.masks: dict = {}
        for kind in self.kinds:  # one BlockMask per layer kind, all on these buffers
            num = torch.zeros(2, qb, dtype=torch.int32, device=dev)  # partial, full
            idx = torch.zeros(2, qb, pool.blocks, dtype=torch.int32, device=dev)
            self.blocks[kind] = (num, idx)
            mask_mod = make_mask_mod(p2l, self.seg_of, self.upto, self.window, self.bits,
                                     pool.block_size, kind, self.pos, self.tree_pos)
            self.masks["flex", kind] = BlockMask.from_kv_blocks(
                num[0][None, None], idx[0][None, None], num[1][None, None], idx[1][None, None],
                BLOCK_SIZE=(Q_BLOCK, pool.block_size), mask_mod=mask_mod,
                seq_lengths=(rows, pool.capacity_tokens), compute_q_blocks=False)


class Bucket:
    """Persistent buffers and (on CUDA) the captured graph for forwards of at most `rows`
    packed tokens whose query layout pads to `q.rows`."""

    def __init__(self, runner, rows: int, q: QueryBuffers, p2l: torch.Tensor, scratch: int):
        dev = runner.device
        self.runner, self.rows, self.q, self.p2l, self.scratch = runner, rows, q, p2l, scratch
        # the model side's integer inputs in one buffer: one host-to-device copy per forward
        self.ints = torch.zeros(7 * rows, dtype=torch.long, device=dev)
        (self.ids, self.pos, self.slots, self.qpos, self.upto, self.window,
         self.seg_of) = self.ints.split(rows)
        self.bits = torch.zeros(rows, BITS, dtype=torch.bool, device=dev)
        cache: dict = {"backend": flex_pool_attention, "layers": runner.layers,
                       "src": q.src, "qpos": self.qpos, **q.masks}
        self.plan = StaticPlan(runner.pool, self.slots, cache)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _model(self) -> torch.Tensor:
        r = self.runner
        return r.model(input_ids=self.ids[None], position_ids=self.pos[None],
                       attention_mask=r.mask_argument(self.rows), use_cache=False,
                       specedge_plan=self.plan).logits[0]

    def fill(self, segments: Sequence[Segment]) -> None:
        """Copy this forward's metadata into the buffers (segments' slots writable, lengths
        not yet advanced); rows past the forward's tokens are padding, written to the
        scratch block, which no query block visits."""
        q, b, rows = self.q, self.runner.pool.block_size, self.rows
        lay = layout(segments, q.kinds, b)
        if lay.rows != q.rows:
            raise ValueError(f"a forward laid out to {lay.rows} query rows in a {q.rows} rung")
        ids, pos, slots, upto, window, seg_of = ([] for _ in range(6))
        bits = torch.zeros(rows, BITS, dtype=torch.bool)
        tables, kv_len = [], []
        r = 0
        for s, seg in enumerate(segments):
            m, n = len(seg.tokens), seg.seq.length
            ids += seg.tokens
            pos += seg.positions
            slots += seg.seq.slots(n, n + m)
            upto += seg.upto
            window += [seg.window] * m
            seg_of += [s] * m
            if seg.bits is not None:
                bits[r : r + m, : seg.bits.shape[1]] = seg.bits
            tables.append(seg.seq.blocks)
            kv_len.append(n + m)
            r += m
        pad = rows - r
        host = torch.tensor(ids + [0] * pad + pos + [0] * pad + slots + [self.scratch * b] * pad
                            + lay.qpos + [0] * pad + upto + [1] * pad + window + [0] * pad
                            + seg_of + [0] * pad + lay.src, dtype=torch.long)
        dev_ints = _staged(host).to(self.ints.device, non_blocking=True)
        self.ints.copy_(dev_ints[: 7 * rows])
        q.src.copy_(dev_ints[7 * rows :])
        self.bits.copy_(_staged(bits), non_blocking=True)
        # the padded query rows' metadata: that of the packed row each one carries
        for name in ("upto", "window", "seg_of", "pos"):
            torch.index_select(getattr(self, name), 0, q.src, out=getattr(q, name))
        torch.index_select(self.bits, 0, q.src, out=q.bits)
        q.tree_pos.copy_(tree_positions(q.window, q.bits))
        for kind in q.kinds:
            num, idx = q.blocks[kind]
            lists = lay.partial[kind] + lay.full[kind]
            w = max(1, max(len(x) for x in lists))
            host_idx = torch.tensor([x + [0] * (w - len(x)) for x in lists], dtype=torch.int32)
            num.copy_(_staged(torch.tensor([len(x) for x in lists], dtype=torch.int32)
                              ).view(2, -1), non_blocking=True)
            idx[:, :, :w].copy_(_staged(host_idx).view(2, -1, w), non_blocking=True)
        width = max(len(t) for t in tables)
        flat = [x for t in tables for x in t + [0] * (width - len(t))] + kv_len
        t = _staged(torch.tensor(flat, dtype=torch.long)).to(self.p2l.device, non_blocking=True)
        fill_p2l(self.p2l, t[: len(tables) * width].view(len(tables), width),
                 t[len(tables) * width :], b)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Two forwards (on CUDA, on a side stream of the runner's device): compiles flex for
        this size. Without autograd: weights loaded with from_pretrained require grad, and a
        flex forward that could be differentiated wants q_indices the BlockMask does not have
        (and would leave the pool with a grad_fn)."""
        dev = self.runner.device
        if dev.type != "cuda":
            for _ in range(2):
                self._model()
            return
        with torch.cuda.device(dev):
            stream = torch.cuda.Stream(device=dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._model()
            torch.cuda.current_stream(dev).wait_stream(stream)

    @torch.no_grad()
    def capture(self, pool_handle) -> None:
        """Warm up, then capture the forward into a graph, on the runner's device (a graph
        captured on another device than its tensors' records nothing)."""
        self.warm_up()
        with torch.cuda.device(self.runner.device):
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool_handle):
                self.logits = self._model()

    def run(self) -> torch.Tensor:
        """Logits of every row [rows, V] (the graph's output buffer when captured)."""
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._model()


def _staged(host: torch.Tensor) -> torch.Tensor:
    """Page-locked on a CUDA machine, so that the copy to the device is asynchronous."""
    return host.pin_memory() if torch.cuda.is_available() else host


class GraphRunner:
    """The static (and on CUDA, graphed) forward path of a PackedRunner: one bucket per pair
    of ladder rungs (packed rows <= padded query rows)."""

    def __init__(self, runner, ladder: Sequence[int] = LADDER, capture: bool = True,
                 buckets: Sequence[int] | None = None):
        pool = runner.pool
        if not pool.fixed:
            raise ValueError("CUDA graphs need a KV pool of fixed size (give a KV budget)")
        if runner.attention != "flex":
            raise ValueError("CUDA graphs need the flex attention backend")
        ladder = buckets or ladder  # `buckets`: the name callers knew this by
        if any(r % Q_BLOCK for r in ladder):
            raise ValueError(f"rungs must be multiples of {Q_BLOCK}")
        self.runner, self.ladder = runner, sorted(ladder)
        self.scratch = pool.alloc()  # padding rows write here; no query block visits it
        p2l = torch.empty((MAX_SEGMENTS + 1, pool.blocks + 1), dtype=torch.int32,
                          device=runner.device)
        self.queries = {r: QueryBuffers(runner, r, p2l) for r in self.ladder}
        # (rows, rung) pairs a forward can reach: its padded rows are at most 16 per token
        # and above the rung below
        below = dict(zip(self.ladder, [0, *self.ladder], strict=False))
        self.buckets = [Bucket(runner, n, self.queries[r], p2l, self.scratch)
                        for r in self.ladder for n in self.ladder
                        if n <= r and Q_BLOCK * n > below[r]]
        self._by_rung = {r: [bk for bk in self.buckets if bk.q.rows == r] for r in self.ladder}
        self.replays = 0
        if capture:
            t0 = time.perf_counter()
            with torch.cuda.device(runner.device):
                handle = torch.cuda.graph_pool_handle()
            for bk in reversed(self.buckets):  # the largest first: the memory pool is shared
                self._dummy(bk)
                bk.capture(handle)
            log.info("CUDA graphs captured", buckets=len(self.buckets),
                     s=round(time.perf_counter() - t0, 2))

    def _dummy(self, bk: Bucket) -> None:
        """Plausible contents for warm-up and capture: one-token sessions reaching the rung."""
        seqs = [self.runner.pool.new_seq() for _ in range(min(bk.rows, bk.q.rows // Q_BLOCK))]
        for seq in seqs:
            seq.prepare_write(0, 1)
        bk.fill([Segment.chain(seq, [0]) for seq in seqs])
        for seq in seqs:
            seq.free()

    def bucket_for(self, segments: Sequence[Segment]) -> Bucket | None:
        """The bucket of a forward, None for one that runs eagerly (more segments than the
        inverse tables hold, a tree wider than BITS, more rows than the ladder)."""
        if len(segments) > MAX_SEGMENTS or any(
                s.bits is not None and s.bits.shape[1] > BITS for s in segments):
            return None
        n = sum(len(s.tokens) for s in segments)
        q = sum(padded(len(s.tokens)) for s in segments)
        if q > self.ladder[-1]:
            return None
        return next((bk for bk in self._by_rung.get(rung(q), ()) if bk.rows >= n), None)

    def forward(self, bk: Bucket, segments: Sequence[Segment]) -> torch.Tensor:
        """All rows' logits [n, V] of a forward that fits `bk` (slots already writable)."""
        bk.fill(segments)
        self.replays += 1
        return bk.run()[: sum(len(s.tokens) for s in segments)]
