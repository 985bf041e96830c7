"""CUDA graphs of the packed forward, one per bucket of packed tokens.

Eager transformers on a GPU is launch-bound: a 1.5B forward costs about the same from 1 to
1024 tokens (DESIGN section 6a). A captured graph replays the whole forward's kernels at
once. For that every input and piece of metadata lives in persistent buffers of the bucket's
size, updated in place before each replay: token ids, positions, slot mapping, and the
FlexAttention BlockMask's tensors (query blocks' pool blocks, the inverse block tables, each
row's segment, `upto`, tree window and ancestor bits). A forward is padded to the smallest
bucket that holds it: padding rows write to a scratch block and attend to it alone. Larger
forwards (long prefills), more segments than the buckets were sized for, or trees wider than
their bit window run eagerly.

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
    Q_BLOCK,
    fill_p2l,
    flex_pool_attention,
    make_mask_mod,
    qblock_kv_blocks,
)
from specedge.execution.plan import Segment, tree_positions
from specedge.execution.pool import KVPool

log = structlog.get_logger(__name__)

BUCKETS = (16, 32, 64, 128, 256, 512)  # packed tokens per graph
MAX_SEGMENTS = 64  # sequences per graphed forward (the verifier's --max-batch, an edge's sessions)
BITS = 64  # tree window per row (the verifier's --max-nodes)


@dataclass
class StaticPlan:
    """What the attention function reads during a graphed forward (cf. ForwardPlan)."""

    pool: KVPool
    slots: torch.Tensor
    cache: dict = field(default_factory=dict)
    attention_calls: int = 0


class Bucket:
    """Persistent buffers, BlockMask and (on CUDA) the captured graph for `rows` tokens."""

    def __init__(self, runner, rows: int, p2l: torch.Tensor, scratch: int):
        pool, dev = runner.pool, runner.device
        self.runner, self.rows, self.p2l, self.scratch = runner, rows, p2l, scratch
        # all integer inputs in one buffer: one host-to-device copy per forward
        self.ints = torch.zeros(6 * rows, dtype=torch.long, device=dev)
        self.ids, self.pos, self.slots, self.upto, self.window, self.seg_of = self.ints.split(rows)
        self.bits = torch.zeros(rows, BITS, dtype=torch.bool, device=dev)
        self.tree_pos = torch.zeros(rows, BITS, dtype=torch.long, device=dev)
        qb = rows // Q_BLOCK
        self.kv_num = torch.zeros(qb, dtype=torch.int32, device=dev)
        self.kv_idx = torch.zeros(qb, pool.blocks, dtype=torch.int32, device=dev)
        cache: dict = {"backend": flex_pool_attention, "layers": runner.layers}
        for kind in runner.mask_kinds:  # one BlockMask per layer kind, all on these buffers
            mask_mod = make_mask_mod(p2l, self.seg_of, self.upto, self.window, self.bits,
                                     pool.block_size, kind, self.pos, self.tree_pos)
            cache["flex", kind] = (BlockMask.from_kv_blocks(
                self.kv_num[None, None], self.kv_idx[None, None],
                BLOCK_SIZE=(Q_BLOCK, pool.block_size), mask_mod=mask_mod,
                seq_lengths=(rows, pool.capacity_tokens), compute_q_blocks=False), rows)
        self.plan = StaticPlan(pool, self.slots, cache)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _model(self) -> torch.Tensor:
        r = self.runner
        return r.model(input_ids=self.ids[None], position_ids=self.pos[None],
                       attention_mask=r.mask_argument(self.rows), use_cache=False,
                       specedge_plan=self.plan).logits[0]

    def fill(self, segments: Sequence[Segment]) -> None:
        """Copy this forward's metadata into the buffers (segments' slots already writable);
        rows past the forward's tokens are padding on the scratch block."""
        b, rows = self.runner.pool.block_size, self.rows
        ids, pos, slots, upto, window, seg_of = ([] for _ in range(6))
        bits = torch.zeros(rows, BITS, dtype=torch.bool)
        tables, kv_len, rows_of = [], [], []
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
            rows_of.append(m)
            r += m
        pad = rows - r
        scratch_slot = self.scratch * b
        host = torch.tensor(ids + [0] * pad + pos + [0] * pad + slots + [scratch_slot] * pad
                            + upto + [1] * pad + window + [0] * pad
                            + seg_of + [MAX_SEGMENTS] * pad, dtype=torch.long)
        self.ints.copy_(_staged(host), non_blocking=True)
        self.bits.copy_(_staged(bits), non_blocking=True)
        win = torch.tensor(window + [0] * pad, dtype=torch.long)
        self.tree_pos.copy_(_staged(tree_positions(win, bits)), non_blocking=True)
        per_q = qblock_kv_blocks(rows_of + ([pad] if pad else []),
                                 tables + ([[self.scratch]] if pad else []),
                                 kv_len + ([1] if pad else []), b, rows // Q_BLOCK)
        num = torch.tensor([len(x) for x in per_q], dtype=torch.int32)
        w = max(len(x) for x in per_q)  # entries past a query block's count are never read
        idx = torch.tensor([x + [0] * (w - len(x)) for x in per_q], dtype=torch.int32)
        self.kv_num.copy_(_staged(num), non_blocking=True)
        self.kv_idx[:, :w].copy_(_staged(idx), non_blocking=True)
        width = max(len(t) for t in tables)
        flat = [x for t in tables for x in t + [0] * (width - len(t))] + kv_len
        t = _staged(torch.tensor(flat, dtype=torch.long)).to(self.p2l.device, non_blocking=True)
        fill_p2l(self.p2l, t[: len(tables) * width].view(len(tables), width),
                 t[len(tables) * width :], b)
        self.p2l[MAX_SEGMENTS, self.scratch] = 0  # the padding rows' segment: the scratch block

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
    """The static (and on CUDA, graphed) forward path of a PackedRunner."""

    def __init__(self, runner, buckets: Sequence[int] = BUCKETS, capture: bool = True):
        pool = runner.pool
        if not pool.fixed:
            raise ValueError("CUDA graphs need a KV pool of fixed size (give a KV budget)")
        if runner.attention != "flex":
            raise ValueError("CUDA graphs need the flex attention backend")
        if any(b % Q_BLOCK for b in buckets):
            raise ValueError(f"buckets must be multiples of {Q_BLOCK}")
        self.runner = runner
        self.scratch = pool.alloc()  # padding rows write here, and only see this block
        p2l = torch.empty((MAX_SEGMENTS + 1, pool.blocks + 1), dtype=torch.int32,
                          device=runner.device)
        self.buckets = [Bucket(runner, n, p2l, self.scratch) for n in sorted(buckets)]
        self.replays = 0
        if capture:
            t0 = time.perf_counter()
            with torch.cuda.device(runner.device):
                handle = torch.cuda.graph_pool_handle()
            for bk in reversed(self.buckets):  # the largest first: the pool is shared
                self._dummy(bk)
                bk.capture(handle)
            log.info("CUDA graphs captured", buckets=[bk.rows for bk in self.buckets],
                     s=round(time.perf_counter() - t0, 2))

    def _dummy(self, bk: Bucket) -> None:
        """Plausible contents for warm-up and capture: every row padding."""
        seq = self.runner.pool.new_seq()
        seq.prepare_write(0, 1)
        bk.fill([Segment.chain(seq, [0])])
        seq.free()

    def bucket_for(self, segments: Sequence[Segment]) -> Bucket | None:
        n = sum(len(s.tokens) for s in segments)
        if len(segments) > MAX_SEGMENTS or any(
                s.bits is not None and s.bits.shape[1] > BITS for s in segments):
            return None
        return next((bk for bk in self.buckets if bk.rows >= n), None)

    def forward(self, bk: Bucket, segments: Sequence[Segment]) -> torch.Tensor:
        """All rows' logits [n, V] of a forward that fits `bk` (slots already writable)."""
        bk.fill(segments)
        self.replays += 1
        return bk.run()[: sum(len(s.tokens) for s in segments)]
