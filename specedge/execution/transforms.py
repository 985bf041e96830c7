"""Logit transforms that depend on what came before: logit bias, repetition penalty, presence
and frequency penalties, applied in that order (transformers' generate() applies its sequence
bias before its repetition penalty; presence/frequency, which it lacks, follow the repetition
penalty as in vLLM). Temperature and the cuts (top-k, top-p, min-p) follow, in `sampling`.

In a draft tree every row has its own history: the committed sequence plus the node tokens
on the path from the root to that row's node (the node's own token included). The committed
part is counted once per session (`History`); each row adds only its path.

Every transform changes a sparse set of entries (tokens seen, tokens biased), so the work is
done on those entries alone, with flat index tensors over all rows of a batch and no per-row
loop over the vocabulary: each step gathers its entries, computes and scatters. A row's counts
are its session's (counted once) plus its path's few tokens, merged on the host, so every
(row, token) is counted in one entry; the repetition penalty's set may name an entry twice (a
path token already seen), which is harmless: both copies read the same value and write the
same result. Nothing is sorted, and no float sum depends on an order (the same bits on every
device and run). Rows of sessions that ask for no transform are not touched.

Semantics: repetition penalty as transformers' RepetitionPenaltyLogitsProcessor (every token of
prompt and generation, once: x / p where x > 0, else x * p); presence and frequency as OpenAI
(generated tokens only: x -= frequency * count + presence * (count > 0)); bias added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from schemas import Sampling

# The accepted ranges, checked by the edge's API (a 400) and the verifier (a refusal): OpenAI's
# for the penalties and the bias; transformers allows any repetition penalty > 0, but past 10
# it only zeroes the logits of every token seen.
MAX_PENALTY = 2.0  # presence and frequency: [-MAX_PENALTY, MAX_PENALTY]
MAX_REPETITION_PENALTY = 10.0  # (0, MAX_REPETITION_PENALTY]
MAX_BIAS = 100.0  # logit_bias values: [-MAX_BIAS, MAX_BIAS]
MAX_BIAS_ENTRIES = 300


def wanted(s: Sampling) -> bool:
    """Whether `s` asks for any history-dependent transform."""
    return bool(s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty
                or s.logit_bias)


@dataclass(frozen=True)
class History:
    """One session's committed sequence, counted once: the distinct tokens of all of it (the
    repetition penalty's set) and of its generated part with their counts."""

    seen: torch.Tensor  # distinct ids of prompt + generated, int64
    gen_ids: torch.Tensor  # distinct generated ids, int64
    gen_counts: torch.Tensor  # their counts, float64
    gen_pos: dict[int, int]  # id -> its index in gen_ids

    @classmethod
    def of(cls, committed: Sequence[int], prompt_len: int) -> History:
        c = torch.tensor(committed, dtype=torch.long)
        ids, counts = torch.unique(c[prompt_len:], return_counts=True)
        return cls(torch.unique(c), ids, counts.double(),
                   {t: i for i, t in enumerate(ids.tolist())})


@dataclass(frozen=True)
class Rows:
    """Rows of a logits tensor from one session: row start + j is tree node nodes[j] (0: the
    root, the last committed token) of the tree (tokens, parents) hanging off `history`."""

    start: int
    sampling: Sampling
    history: History
    tokens: Sequence[int] = ()
    parents: Sequence[int] = ()
    nodes: Sequence[int] | None = None  # None: the root and every node, in order


def paths(tokens: Sequence[int], parents: Sequence[int], nodes: Sequence[int]) -> list[list[int]]:
    """Per node of `nodes`, the tokens on the path root..node (the node's own included).
    A parent always comes before its child (validate_parents)."""
    memo: list[list[int]] = [[]]
    for i in range(1, max(nodes, default=0) + 1):
        memo.append(memo[parents[i - 1]] + [tokens[i - 1]])
    return [memo[n] for n in nodes]


def _keys(rows: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Flat indices of every (row, id) pair."""
    return (rows[:, None] * vocab + ids[None, :]).reshape(-1)


@dataclass(frozen=True)
class _Plan:
    """Flat indices (CPU) of each step's entries, with per-entry parameters."""

    bias_k: torch.Tensor
    bias_v: torch.Tensor
    rep_k: torch.Tensor
    rep_p: torch.Tensor
    cnt_k: torch.Tensor  # every (row, id) with a count, once
    cnt_v: torch.Tensor  # frequency * count + presence

    @property
    def touched(self) -> torch.Tensor:
        return torch.cat([self.bias_k, self.rep_k, self.cnt_k])


def _cat(parts: list[torch.Tensor], dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def _plan(groups: Sequence[Rows], vocab: int) -> _Plan | None:
    bk, bv, rk, rp, ck, cv = ([] for _ in range(6))
    f64 = torch.float64
    for g in groups:
        s = g.sampling
        if not wanted(s):
            continue
        nodes = list(range(len(g.tokens) + 1)) if g.nodes is None else list(g.nodes)
        rows = torch.arange(g.start, g.start + len(nodes))
        ps = paths(g.tokens, g.parents, nodes)
        p_rows = torch.tensor([g.start + j for j, p in enumerate(ps) for _ in p], dtype=torch.long)
        p_keys = p_rows * vocab + torch.tensor([t for p in ps for t in p], dtype=torch.long)
        if s.logit_bias:
            bk.append(_keys(rows, torch.tensor([i for i, _ in s.logit_bias]), vocab))
            bv.append(torch.tensor([b for _, b in s.logit_bias], dtype=f64).repeat(len(nodes)))
        if s.repetition_penalty != 1.0:
            k = torch.cat([_keys(rows, g.history.seen, vocab), p_keys])
            rk.append(k)
            rp.append(torch.full((len(k),), s.repetition_penalty, dtype=f64))
        if s.presence_penalty or s.frequency_penalty:
            k, c = _counts(g.history, g.start, ps, rows, vocab)
            ck.append(k)
            cv.append(s.frequency_penalty * c + s.presence_penalty)
    if not (bk or rk or ck):
        return None
    lng = torch.long
    return _Plan(_cat(bk, lng), _cat(bv, f64), _cat(rk, lng), _cat(rp, f64), _cat(ck, lng),
                 _cat(cv, f64))


def _counts(h: History, start: int, ps: list[list[int]], rows: torch.Tensor,
            vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat keys, counts) of generated tokens for each row: the session's counts on every
    row, plus each row's path tokens, merged so that every (row, id) appears once."""
    n_ids = len(h.gen_ids)
    counts = h.gen_counts.repeat(len(ps))  # row j's counts at j * n_ids ...
    add_at, add_n, new_keys, new_n = [], [], [], []
    for j, p in enumerate(ps):
        mult: dict[int, int] = {}
        for t in p:
            mult[t] = mult.get(t, 0) + 1
        for t, m in mult.items():
            pos = h.gen_pos.get(t)
            if pos is None:
                new_keys.append((start + j) * vocab + t)
                new_n.append(m)
            else:
                add_at.append(j * n_ids + pos)
                add_n.append(m)
    if add_at:
        counts[torch.tensor(add_at)] += torch.tensor(add_n, dtype=counts.dtype)  # distinct
    keys = torch.cat([_keys(rows, h.gen_ids, vocab), torch.tensor(new_keys, dtype=torch.long)])
    return keys, torch.cat([counts, torch.tensor(new_n, dtype=counts.dtype)])


def _repetition(x: torch.Tensor, pen: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, x * pen, x / pen)


def apply_(logits: torch.Tensor, groups: Sequence[Rows]) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform logits [R, V] (contiguous) in place. Returns (flat indices, raw values) of
    every entry it may have changed, to undo it (`view(-1).index_copy_(0, idx, raw)`)."""
    plan = _plan(groups, logits.shape[-1])
    dev = logits.device
    if plan is None:
        return torch.empty(0, dtype=torch.long, device=dev), logits.new_empty(0)
    view = logits.view(-1)
    dt = torch.promote_types(logits.dtype, torch.float32)  # the arithmetic, as sampling's
    touched = plan.touched.to(dev)
    # index_select/index_copy_: advanced indexing into a large flat tensor is ~30x slower here
    raw = view.index_select(0, touched)
    for k, f in ((plan.bias_k, lambda x: x + plan.bias_v.to(dev, dt)),
                 (plan.rep_k, lambda x: _repetition(x, plan.rep_p.to(dev, dt))),
                 (plan.cnt_k, lambda x: x - plan.cnt_v.to(dev, dt))):
        if len(k):
            k = k.to(dev)
            view.index_copy_(0, k, f(view.index_select(0, k).to(dt)).to(logits.dtype))
    return touched, raw


def apply(logits: torch.Tensor, groups: Sequence[Rows]) -> torch.Tensor:
    """A transformed copy of logits [R, V]."""
    out = logits.clone(memory_format=torch.contiguous_format)
    apply_(out, groups)
    return out


@contextlib.contextmanager
def applied(logits: torch.Tensor, groups: Sequence[Rows]) -> Iterator[torch.Tensor]:
    """logits (contiguous) transformed in place for the duration of the block, then restored
    bit for bit: the raw rows stay available afterwards (log-probabilities are of the raw
    target) without copying any row."""
    if not logits.is_contiguous():  # e.g. a vocabulary slice: transform a copy instead
        yield apply(logits, groups)
        return
    touched, raw = apply_(logits, groups)
    try:
        yield logits
    finally:
        logits.view(-1).index_copy_(0, touched, raw)
