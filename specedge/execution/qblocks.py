"""Where FlexAttention's query blocks go and which pool blocks each visits (pure, host side).

Each segment's rows start a fresh query block (its last block padded with copies of its last
row), so a block never mixes sessions: a decode row's block visits its own session's KV
blocks only, not those of the fifteen sessions that would otherwise share its tile. Per
layer kind a query block lists:
  - full blocks: every row sees every slot (below all its rows' `upto`; plain layers only),
    so the kernel skips the mask there;
  - partial blocks: the rest it may see, trimmed to what causality allows (no row sees past
    its own slot) and, for windowed or chunked layers, to what the window or chunk can reach.

The padded row count is rounded up to a rung of LADDER, so the compiled kernel's shapes come
from a short, fixed list; a forward with more rows or segments than a rung holds is split by
the runner (see `split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specedge.execution.plan import PLAIN, MaskKind, Segment

Q_BLOCK = 16
# padded query rows of one flex call: the compiled shapes (64 sessions x one block = 1024)
LADDER = (16, 32, 64, 128, 256, 384, 512, 768, 1024)
MAX_SEGMENTS = 64  # sequences per flex forward (the verifier's --max-batch, an edge's sessions)


def padded(m: int) -> int:
    return -(-m // Q_BLOCK) * Q_BLOCK


def rung(rows: int) -> int:
    """The smallest rung of the ladder that holds `rows` padded rows."""
    for r in LADDER:
        if r >= rows:
            return r
    raise ValueError(f"{rows} padded rows exceed the ladder's {LADDER[-1]}: split the forward")


@dataclass
class QueryLayout:
    rows: int  # padded rows, a rung of LADDER
    src: list[int]  # padded row -> packed row whose query and metadata it carries
    qpos: list[int]  # packed row -> its padded row
    partial: dict[MaskKind, list[list[int]]]  # per kind, per query block: pool blocks
    full: dict[MaskKind, list[list[int]]]


def _trim_start(kind: MaskKind, min_pos: int, block_size: int) -> int:
    """First logical block a query block of a windowed or chunked layer can see: a key's
    position on a row's path is at most its logical position, so a block whose last slot is
    out of every row's reach holds no visible key."""
    window, chunk = kind
    lo = 0
    if window is not None:
        lo = max(lo, (min_pos - window + 1) // block_size)
    if chunk is not None:
        lo = max(lo, (min_pos // chunk * chunk) // block_size)
    return max(0, lo)


def layout(segments: Sequence[Segment], kinds: Sequence[MaskKind], block_size: int
           ) -> QueryLayout:
    """The query layout of a forward whose segments are about to be written (each
    `seq.length` is still the length before this forward)."""
    b = block_size
    src: list[int] = []
    qpos: list[int] = []
    partial: dict[MaskKind, list[list[int]]] = {k: [] for k in kinds}
    full: dict[MaskKind, list[list[int]]] = {k: [] for k in kinds}
    r = 0
    for seg in segments:
        m, n, table = len(seg.tokens), seg.seq.length, seg.seq.blocks
        p = len(src)
        qpos += range(p, p + m)
        src += range(r, r + m)
        src += [r + m - 1] * (padded(m) - m)
        for a in range(0, m, Q_BLOCK):
            z = min(m, a + Q_BLOCK)
            # no row sees past its own slot (n + i): every constructor keeps upto <= n + i + 1
            # and the tree window at or before the row
            hi = -(-(n + z) // b)
            lo_full = min(seg.upto[a:z]) // b
            min_pos = min(seg.positions[a:z])
            for kind in kinds:
                if kind == PLAIN:
                    full[kind].append(table[:lo_full])
                    partial[kind].append(table[lo_full:hi])
                else:
                    full[kind].append([])
                    partial[kind].append(table[_trim_start(kind, min_pos, b):hi])
        r += m
    rows = rung(len(src))
    blocks = rows // Q_BLOCK
    for kind in kinds:
        pad = blocks - len(partial[kind])
        partial[kind] += [[] for _ in range(pad)]
        full[kind] += [[] for _ in range(pad)]
    src += [0] * (rows - len(src))
    return QueryLayout(rows, src, qpos, partial, full)


def split(segments: Sequence[Segment], max_rows: int = LADDER[-1],
          max_segments: int = MAX_SEGMENTS) -> list[list[Segment]]:
    """The segments in forwards that each fit the ladder: at most `max_segments` segments
    and `max_rows` padded rows. A segment too long for one forward is cut into consecutive
    pieces at rows that start no tree (pure causal rows: a prefill, a catch-up, the chain
    before a tree); later pieces go into later forwards, after the earlier ones are written.
    Pieces keep their positions, `upto` and tree window, which are absolute."""
    groups: list[list[Segment]] = [[]]
    used = 0
    for seg in segments:
        for piece in _pieces(seg, max_rows):
            need = padded(len(piece.tokens))
            if groups[-1] and (used + need > max_rows or len(groups[-1]) >= max_segments
                               or any(p.seq is piece.seq for p in groups[-1])):
                groups.append([])
                used = 0
            groups[-1].append(piece)
            used += need
    return groups


def _pieces(seg: Segment, max_rows: int) -> list[Segment]:
    m = len(seg.tokens)
    if m <= max_rows:
        return [seg]
    tree_rows = 0
    if seg.bits is not None:  # rows from the first one with a tree bit on stay together
        hits = seg.bits.any(1).nonzero()
        tree_rows = m - int(hits[0]) if len(hits) else 0
    if tree_rows > max_rows:
        raise ValueError(f"a draft tree of {tree_rows} rows exceeds one forward's {max_rows}")
    cuts = list(range(0, m - tree_rows, max_rows)) + [m - tree_rows, m]
    cuts = sorted(set(c for c in cuts if 0 <= c <= m))
    out = []
    for a, z in zip(cuts, cuts[1:], strict=False):
        bits = None
        if seg.bits is not None and z > m - tree_rows:
            bits = seg.bits[a:z]
        out.append(Segment(seg.seq, seg.tokens[a:z], seg.positions[a:z], seg.upto[a:z],
                           [i - a for i in seg.logits_at if a <= i < z],
                           window=seg.window if bits is not None else 0, bits=bits))
    return out
