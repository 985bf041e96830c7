"""What one packed forward needs: the segments callers hand in, and the per-forward metadata
built from them once and shared by every layer.

A segment is one sequence's new tokens. They are written at logical positions
seq.length .. seq.length + m - 1 (slot order in the sequence), carry their own RoPE positions
(depth in a tree), and row r attends to the logical positions < upto[r] plus those
window + j for which bits[r, j] is set (its tree ancestors and itself). That covers a causal
chain (prefill, catch-up), a verifier's chain-then-tree, and an edge's partly forwarded tree,
without a dense mask per segment.

A layer may further restrict what a row sees (`MaskKind`): a sliding window of W keeps the
keys whose position on the row's path is above the row's position minus W, a chunk of C the
keys in the row's chunk of C positions. A key's position on the path is its logical position
below the tree window, and for a tree ancestor the window's start plus its depth minus one
(its ancestors are exactly the row's ancestors before it in node order, so its depth is a
prefix count of the row's ancestor bits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch

from specedge.execution.pool import KVPool, KVSeq
from specedge.execution.tree import ancestor_bits, unpack_rows

# (sliding window, chunk) of a layer; (None, None) for plain causal attention
MaskKind = tuple[int | None, int | None]
PLAIN: MaskKind = (None, None)


@dataclass(frozen=True, eq=False)
class LayerAttention:
    """What one layer's attention call asks for beyond the packed visibility: its mask kind,
    attention-logit soft-capping, and per-head sink logits (gpt-oss's `s_aux`)."""

    window: int | None = None
    chunk: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def mask(self) -> MaskKind:
        return (self.window, self.chunk)

    @property
    def plain_scores(self) -> bool:
        return self.softcap is None and self.sinks is None


PLAIN_LAYER = LayerAttention()


def restrict(vis: torch.Tensor, key_pos: torch.Tensor, q_pos: torch.Tensor,
             kind: MaskKind) -> torch.Tensor:
    """`vis` narrowed to a layer's window and chunk (key_pos [R, L] and q_pos [R, 1] are
    positions on the rows' paths), with transformers' rules: a key is in a window of W when
    its position is above the query's minus W; in a chunk when both fall in the same one."""
    window, chunk = kind
    if window is not None:
        vis = vis & (key_pos > q_pos - window)
    if chunk is not None:
        vis = vis & (torch.div(key_pos, chunk, rounding_mode="floor")
                     == torch.div(q_pos, chunk, rounding_mode="floor"))
    return vis


def tree_positions(window: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """[N, W]: the path position of each tree-window column for each row (meaningful where
    the row's bit is set)."""
    return window[:, None] - 1 + bits.long().cumsum(1)


@dataclass
class Segment:
    seq: KVSeq
    tokens: list[int]
    positions: list[int]  # RoPE positions
    upto: list[int]  # row r sees logical positions < upto[r] ...
    logits_at: list[int]  # rows whose next-token logits are wanted
    window: int = 0  # ... and window + j where bits[r, j]
    bits: torch.Tensor | None = None  # [m, W] bool, on the host

    @classmethod
    def chain(cls, seq: KVSeq, tokens: Sequence[int], logits_at: list[int] | None = None
              ) -> Segment:
        """A causal run appended to the sequence (prefill, catch-up); logits at the last
        token unless told otherwise."""
        n, m = seq.length, len(tokens)
        return cls(seq, [int(t) for t in tokens], list(range(n, n + m)),
                   list(range(n + 1, n + m + 1)), [m - 1] if logits_at is None else logits_at)

    @classmethod
    def tree(cls, seq: KVSeq, chain: Sequence[int], nodes: Sequence[int],
             parents: Sequence[int], depths: Sequence[int]) -> Segment:
        """The verifier's segment: the committed tokens the cache lacks (the last one is the
        tree's root), then the draft tree's nodes; logits at the root and at every node. A
        node sees the whole chain and its own ancestors."""
        n, k, t = seq.length, len(chain), len(nodes)
        c = n + k  # committed length; nodes live at logical positions c .. c + t - 1
        # chain rows see no tree column; node rows their ancestors (one unpack, no torch op)
        bits = torch.from_numpy(unpack_rows(ancestor_bits(parents), t, lead=k)) if t else None
        return cls(seq, [int(x) for x in chain] + [int(x) for x in nodes],
                   list(range(n, c)) + [c - 1 + d for d in depths],
                   list(range(n + 1, c + 1)) + [c] * t, [k - 1] + [k + i for i in range(t)],
                   window=c, bits=bits)

    @classmethod
    def tree_nodes(cls, seq: KVSeq, tree_start: int, rows: torch.Tensor, tokens: Sequence[int],
                   positions: Sequence[int]) -> Segment:
        """Nodes of a partly forwarded tree: the tree's nodes live at tree_start + i - 1 in
        node order, the new ones right after those already forwarded; rows[r] is node r's
        ancestor row over the tree's nodes so far (itself included). Logits at every row."""
        m = len(tokens)
        return cls(seq, [int(x) for x in tokens], [int(p) for p in positions], [tree_start] * m,
                   list(range(m)), window=tree_start, bits=rows)

    def check(self) -> None:
        m = len(self.tokens)
        if m == 0:
            raise ValueError("a segment needs at least one token")
        if len(self.positions) != m or len(self.upto) != m:
            raise ValueError("tokens, positions and upto must have one entry per token")
        if self.bits is not None and self.bits.shape[0] != m:
            raise ValueError(f"bits has {self.bits.shape[0]} rows for {m} tokens")
        end = self.seq.length + m
        if any(not 0 < u <= end for u in self.upto):
            raise ValueError(f"upto must lie in 1..{end}")
        if self.bits is not None and self.window + self.bits.shape[1] > end:
            raise ValueError("the tree window runs past the tokens written")


# Segments of at most this many rows (a draft tree and a short catch-up) share one padded
# attention call; a longer one (a prefill) gets its own, so nobody is padded to its length.
SHORT_ROWS = 96


@dataclass
class ForwardPlan:
    """Metadata of one packed forward, on the model's device; built once, used by every
    layer. Rows are the packed new tokens (N). For the gathered attention, the short segments
    are padded to M rows and L keys (one call); each long segment is attended alone."""

    pool: KVPool
    ids: torch.Tensor  # [N]
    pos: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] where each new token's K/V goes
    upto: torch.Tensor  # [N]
    window: torch.Tensor  # [N]
    want: torch.Tensor  # [R] rows whose logits are wanted
    seg_of: torch.Tensor  # [N] segment of each row
    kv_len: torch.Tensor  # [S] keys per segment after this forward's writes
    tables: torch.Tensor  # [S, blocks] block tables, padded with block 0
    short_segs: torch.Tensor  # [Ss] the short segments
    short_rows: torch.Tensor  # [Ns] their rows
    q_index: torch.Tensor  # [Ss * M] row of each padded query (padding -> a short row)
    out_index: torch.Tensor  # [Ns] padded position of each short row
    bits: torch.Tensor | None  # [N, W]
    host_kv_len: list[int]
    host_rows: list[int]  # rows per segment
    host_tables: list[list[int]]
    short_max_rows: int  # M
    long: list[tuple[int, int, int]]  # (segment, first row, rows) of each long segment
    chain_only: list[bool]  # per segment: a pure causal run (no tree bits)
    attention_calls: int = 0
    cache: dict = field(default_factory=dict)  # what a backend derives once per forward

    @property
    def segments(self) -> int:
        return len(self.host_kv_len)

    def key_index(self, segs: torch.Tensor, n_keys: int) -> torch.Tensor:
        """[len(segs), n_keys] slot of every (segment, logical position < n_keys); positions
        past a segment's length point at some slot of its table or block 0 (masked)."""
        b = self.pool.block_size
        cols = torch.arange(n_keys, device=self.tables.device)
        return self.tables.index_select(0, segs)[:, cols // b] * b + cols % b

    def visible(self, rows: torch.Tensor, n_keys: int, kind: MaskKind = PLAIN) -> torch.Tensor:
        """[len(rows), n_keys] bool: which logical positions of its segment each row sees
        (in a layer of mask `kind`)."""
        cols = torch.arange(n_keys, device=self.upto.device)
        vis = cols[None, :] < self.upto.index_select(0, rows)[:, None]
        key_pos = cols[None, :].expand(len(rows), n_keys)
        if self.bits is not None:
            w = self.bits.shape[1]
            rel = cols[None, :] - self.window.index_select(0, rows)[:, None]
            inside = (rel >= 0) & (rel < w)
            relc = rel.clamp(0, w - 1)
            tree = inside & self.bits.index_select(0, rows).gather(1, relc)
            vis |= tree
            if kind != PLAIN:
                if "tree_pos" not in self.cache:
                    self.cache["tree_pos"] = tree_positions(self.window, self.bits)
                tp = self.cache["tree_pos"].index_select(0, rows).gather(1, relc)
                key_pos = torch.where(tree, tp, key_pos)
        if kind != PLAIN:
            vis = restrict(vis, key_pos, self.pos.index_select(0, rows)[:, None], kind)
        return vis


def fill_bits(out: np.ndarray, segments: Sequence[Segment]) -> None:
    """Write the segments' tree bits into `out` [rows, width] (bool, host), the segments' rows
    one after another from row 0; everything else False (chains, padding rows and columns)."""
    out[:] = False
    r = 0
    for seg in segments:
        m = len(seg.tokens)
        if seg.bits is not None:
            out[r : r + m, : seg.bits.shape[1]] = seg.bits.numpy()
        r += m


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy of a host buffer to `device`; staged through page-locked memory on CUDA (an
    asynchronous copy: the caching host allocator hands that block out again only once the
    copy has finished, so the next forward's buffer never overwrites this one in flight)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host if device.type == "cpu" else host.to(device)


def build_plan(segments: Sequence[Segment], pool: KVPool, device: torch.device) -> ForwardPlan:
    """Host-side bookkeeping for a forward whose segments' slots are already writable. All
    the integer metadata (one Python list, converted once) and the tree bits are written into
    one host buffer and reach the device in one copy; the fields are views of it there."""
    s_count = len(segments)
    rows_of = [len(seg.tokens) for seg in segments]
    host_tables = [seg.seq.blocks for seg in segments]
    host_kv_len = [seg.seq.length + m for seg, m in zip(segments, rows_of, strict=True)]
    firsts = list(accumulate(rows_of, initial=0))
    n = firsts[-1]
    short = [s for s in range(s_count) if rows_of[s] <= SHORT_ROWS]
    m_max = max((rows_of[s] for s in short), default=0)
    width = max(len(t) for t in host_tables)
    ids, pos, slots, upto, window, want, seg_of, tables = ([] for _ in range(8))
    for s, seg in enumerate(segments):
        m, first = rows_of[s], firsts[s]
        ids += seg.tokens
        pos += seg.positions
        slots += seg.seq.slots(host_kv_len[s] - m, host_kv_len[s])
        upto += seg.upto
        window += [seg.window] * m
        want += [first + i for i in seg.logits_at]
        seg_of += [s] * m
        tables += host_tables[s]
        tables += [0] * (width - len(host_tables[s]))  # padding: block 0
    # the short segments padded to m_max rows each: padded position <-> row
    q_index = [firsts[short[0]] if short else 0] * (len(short) * m_max)
    short_rows: list[int] = []
    out_index: list[int] = []
    for k, s in enumerate(short):
        rows = range(firsts[s], firsts[s] + rows_of[s])
        q_index[k * m_max : k * m_max + rows_of[s]] = rows
        short_rows += rows
        out_index += range(k * m_max, k * m_max + rows_of[s])
    parts = [ids, pos, slots, upto, window, want, seg_of, host_kv_len, tables, short,
             short_rows, q_index, out_index]
    sizes = [len(p) for p in parts]
    n_ints = sum(sizes)
    w = max((seg.bits.shape[1] for seg in segments if seg.bits is not None), default=0)
    # int64 words: the integers, then the bits (one byte each) padded to a whole word
    buf = np.empty(n_ints + -(-n * w // 8), dtype=np.int64)
    flat: list[int] = []
    for p in parts:
        flat += p
    buf[:n_ints] = flat
    if w:
        fill_bits(buf[n_ints:].view(np.bool_)[: n * w].reshape(n, w), segments)
    dev = to_device(torch.from_numpy(buf), device)
    d = dev[:n_ints].split_with_sizes(sizes)
    return ForwardPlan(pool, ids=d[0], pos=d[1], slots=d[2], upto=d[3], window=d[4], want=d[5],
                       seg_of=d[6], kv_len=d[7], tables=d[8].view(s_count, width),
                       short_segs=d[9], short_rows=d[10], q_index=d[11], out_index=d[12],
                       bits=dev[n_ints:].view(torch.bool)[: n * w].view(n, w) if w else None,
                       host_kv_len=host_kv_len, host_rows=rows_of, host_tables=host_tables,
                       short_max_rows=m_max,
                       long=[(s, firsts[s], rows_of[s]) for s in range(s_count)
                             if rows_of[s] > SHORT_ROWS],
                       chain_only=[seg.bits is None for seg in segments])
