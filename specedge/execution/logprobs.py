"""The target's log-probabilities of committed tokens, as pure functions plus their wire form.

A round commits the accepted path's tokens then the next token; each was produced by its
parent's row of the verifier's forward: the root's row for the first, node a_i's row for the
token after it (the last accepted node's row gave the next token, a correction or a bonus).
The log-probability is the log-softmax of that row's raw logits (before any penalty, bias or
temperature): what the target alone assigns the token at that position.

Only the rows of sessions that asked are copied (before any transform touches the logits) and
only their path rows are scored, all sessions of a forward in one batched call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

MAX_TOP = 20  # OpenAI's top_logprobs range is 0..20


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely (id, logprob), most likely first


@dataclass(frozen=True)
class Scored:
    """One session's new tokens of a round, in token order (before any EOS/limit cut)."""

    logprobs: np.ndarray  # [n] float64
    top_ids: np.ndarray  # [n, k] int64
    top_logprobs: np.ndarray  # [n, k] float64


def path_rows(accepted: Sequence[int]) -> list[int]:
    """The tree rows (0 = root, i = node i) that produced a round's new tokens, in order."""
    return [0, *accepted]


def score(rows: torch.Tensor, tokens: Sequence[int], k: int) -> Scored:
    """log_softmax of each row [R, V] at its token, and the row's k most likely ids with theirs.
    Float64 logits stay float64 (exact against the target alone); others are scored in
    float32, never in their own half precision."""
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(rows.to(dtype), dim=-1)
    tok = torch.as_tensor(list(tokens), dtype=torch.long, device=rows.device)
    chosen = lp.gather(1, tok[:, None])[:, 0]
    top_lp, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return Scored(chosen.double().cpu().numpy(), top_ids.cpu().numpy(),
                  top_lp.double().cpu().numpy())


class PathScorer:
    """Collects, over one forward, the path rows of every session that asked for logprobs and
    scores them in one call. `spans`: work index -> (first, end) of its rows in `logits`."""

    def __init__(self, logits: torch.Tensor, spans: dict[int, tuple[int, int]]):
        self._base: dict[int, int] = {}
        self._want: list[tuple[int, list[int], list[int], int]] = []
        self._raw = None
        if spans:
            idx: list[int] = []
            for key, (a, b) in spans.items():
                self._base[key] = len(idx)
                idx.extend(range(a, b))
            # a copy: the picks' transforms may rewrite the logits in place afterwards
            self._raw = logits.index_select(0, torch.tensor(idx, device=logits.device))

    def add(self, key: int, accepted: Sequence[int], tree_tokens: Sequence[int],
            next_token: int, k: int) -> None:
        """A session's walk: its new tokens are the accepted nodes' tokens then next_token."""
        if key not in self._base:
            return
        toks = [tree_tokens[i - 1] for i in accepted] + [next_token]
        rows = [self._base[key] + r for r in path_rows(accepted)]
        self._want.append((key, rows, toks, k))

    def score(self) -> dict[int, Scored]:
        if not self._want:
            return {}
        k = max(w[3] for w in self._want)
        rows = torch.tensor([r for w in self._want for r in w[1]], device=self._raw.device)
        s = score(self._raw.index_select(0, rows), [t for w in self._want for t in w[2]], k)
        out, at = {}, 0
        for key, r, _, kk in self._want:
            n = len(r)
            out[key] = Scored(s.logprobs[at : at + n], s.top_ids[at : at + n, :kk],
                              s.top_logprobs[at : at + n, :kk])
            at += n
        return out


def to_wire(s: Scored, n: int) -> dict[str, bytes]:
    """The Verdict's logprob fields for the first n tokens (those the round commits)."""
    return {"logprobs": np.asarray(s.logprobs[:n], dtype="<f8").tobytes(),
            "top_ids": np.asarray(s.top_ids[:n], dtype="<i4").tobytes(),
            "top_logprobs": np.asarray(s.top_logprobs[:n], dtype="<f8").tobytes()}


def from_wire(tokens: Sequence[int], logprobs: bytes, top_ids: bytes,
              top_logprobs: bytes) -> list[TokenLogprob]:
    """A verdict's fields back to one entry per committed token; ValueError if they do not
    fit the tokens (k alternatives per token, the same k for ids and values)."""
    n = len(tokens)
    lp = np.frombuffer(logprobs, dtype="<f8")
    ids = np.frombuffer(top_ids, dtype="<i4")
    tlp = np.frombuffer(top_logprobs, dtype="<f8")
    if len(lp) != n or len(ids) != len(tlp) or (n and len(ids) % n) or (not n and len(ids)):
        raise ValueError(f"logprob fields do not fit {n} tokens: {len(lp)} values, "
                         f"{len(ids)} top ids, {len(tlp)} top values")
    k = len(ids) // n if n else 0
    ids, tlp = ids.reshape(n, k).tolist(), tlp.reshape(n, k).tolist()
    return [TokenLogprob(int(t), float(v), tuple(zip(ids[i], tlp[i], strict=True)))
            for i, (t, v) in enumerate(zip(tokens, lp.tolist(), strict=True))]
