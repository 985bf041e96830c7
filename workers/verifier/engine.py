"""The model side of verification: build one packed forward for a batch of checked blocks,
run it, walk each tree, roll each session's KV back to its accepted path. Runs in the worker's
executor thread; knows nothing about NATS."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specedge.kvstore import new_store
from specedge.runner import PackedRunner, Segment
from specedge.sampling import round_generator
from specedge.tree import chain_then_tree_mask
from specedge.verify import WalkResult, walk
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock


@dataclass
class Outcome:
    walk: WalkResult
    kv_hit: bool
    new_tokens: int  # tokens this session put into the forward


class Engine:
    def __init__(self, model):
        self.runner = PackedRunner(model)
        self.model = model
        self.vocab_size = self.runner.vocab_size

    def verify(self, work: list[tuple[SessionState, CheckedBlock]]) -> list[Outcome]:
        """One target forward for all blocks (distinct sessions)."""
        segments, metas = [], []
        for st, blk in work:
            kv_hit = st.kv is not None and st.kv.length == len(st.committed) - 1
            if st.kv is None or st.kv.length > len(st.committed) - 1:
                st.kv = new_store(self.model)  # never seen, evicted, or out of step: rebuild
            have = st.kv.length
            chain = st.committed[have:]  # committed tokens the cache lacks, ending at the root
            c = len(st.committed)
            tokens = torch.tensor(chain + blk.tokens, dtype=torch.long)
            positions = torch.tensor(
                list(range(have, c)) + [c - 1 + d for d in blk.depths], dtype=torch.long
            )
            mask = chain_then_tree_mask(len(chain), blk.parents)
            want = [len(chain) - 1] + [len(chain) + i for i in range(len(blk.tokens))]
            segments.append(Segment(st.kv, tokens, positions, mask, have, want))
            metas.append((have, len(chain), kv_hit))
        all_logits = self.runner.forward(segments)
        out = []
        for (st, blk), logits, (have, chain_len, kv_hit) in zip(work, all_logits, metas, strict=True):
            gen = round_generator(st.seed, blk.round) if st.sampling.temperature > 0 else None
            res = walk(blk.tokens, blk.parents, logits, st.sampling, gen)
            # keep the chain (all committed) and the accepted nodes, in path order
            keep = list(range(chain_len)) + [chain_len + i - 1 for i in res.accepted]
            st.kv.keep(have, keep)
            out.append(Outcome(res, kv_hit, chain_len + len(blk.tokens)))
        return out


def forward_costs(runner: PackedRunner, sizes: tuple[int, ...] = (1, 8, 16, 24, 32, 48, 64, 96,
                                                                  128, 192, 256),
                  context: int = 128, stop_ratio: float = 1.6) -> dict[int, float]:
    """Seconds of one forward of n new tokens over `context` cached ones, for growing n; stops
    once a forward costs stop_ratio times the single-token one (past the knee)."""
    import time

    kv = new_store(runner.model)
    ctx = torch.arange(context) % runner.vocab_size
    full = torch.ones(context, context, dtype=torch.bool).tril()
    runner.forward([Segment(kv, ctx, torch.arange(context), full, 0, [context - 1])])
    costs: dict[int, float] = {}
    for n in sizes:
        best = float("inf")
        for _ in range(2):
            kv.truncate(context)
            seg = Segment(kv, torch.full((n,), 1), torch.arange(context, context + n),
                          torch.ones(n, n, dtype=torch.bool).tril(), context, [n - 1])
            t0 = time.perf_counter()
            runner.forward([seg])
            best = min(best, time.perf_counter() - t0)
        costs[n] = best
        if best > stop_ratio * costs[sizes[0]]:
            break
    return costs


def knee(costs: dict[int, float], ratio: float = 1.5) -> int:
    """The most tokens a forward takes for at most `ratio` times the cost of one token: where
    verifying more tokens stops being nearly free."""
    base = costs[min(costs)]
    return max(n for n, c in costs.items() if c <= ratio * base)
