"""The model side of verification: build one packed forward for a batch of checked blocks,
run it, pick every node's token in one batched call, walk each tree, roll each session's KV
back to its accepted path. Runs in the worker's executor thread; knows nothing about NATS."""

from __future__ import annotations

from dataclasses import dataclass

from specedge.execution import PackedRunner, Segment
from specedge.execution.logprobs import PathScorer, Scored
from specedge.execution.sampling import RowSampling, pick
from specedge.execution.transforms import History, Rows, applied, wanted
from specedge.execution.walk import WalkResult, walk
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock


@dataclass
class Outcome:
    walk: WalkResult | None  # None: the session is still prefilling (no verdict yet)
    kv_hit: bool
    new_tokens: int  # tokens this session put into the forward
    # with st.logprobs >= 0: the target's log-probabilities of the walk's new tokens
    logprobs: Scored | None = None


class Engine:
    def __init__(self, model, *, kv_budget_tokens: int | None = None, attention: str = "auto",
                 block_size: int = 16, cuda_graphs: bool | None = None,
                 vocab_limit: int | None = None):
        self.runner = PackedRunner(model, kv_budget_tokens=kv_budget_tokens, attention=attention,
                                   block_size=block_size, cuda_graphs=cuda_graphs,
                                   vocab_limit=vocab_limit)
        self.model = model
        self.pool = self.runner.pool
        self.vocab_size = self.runner.vocab_size

    def _chain(self, st: SessionState) -> tuple[int, bool]:
        """(tokens of C the cache holds, whether that is all but the root); a cache that is
        out of step with C is dropped."""
        kv = st.kv
        c = len(st.committed)
        if kv is not None and kv.length > c - 1:  # out of step (e.g. another worker's state)
            kv.free()
            st.kv = kv = None
        return (0 if kv is None else kv.length), kv is not None and kv.length == c - 1

    def catching_up(self, st: SessionState, prefill_chunk: int | None) -> bool:
        """Whether this session's next forward would only prefill a chunk (no verdict)."""
        have, _ = self._chain(st)
        return bool(prefill_chunk) and len(st.committed) - have > prefill_chunk

    def blocks_needed(self, work: list[tuple[SessionState, CheckedBlock]]) -> int:
        """Pool blocks this batch's forward will allocate."""
        need = 0
        for st, blk in work:
            self._chain(st)  # a cache out of step is dropped first: it will be rebuilt
            total = len(st.committed) + len(blk.tokens)
            if st.kv is None:
                need += -(-total // self.pool.block_size)
            else:
                need += st.kv.blocks_needed(total)
        return need

    def verify(self, work: list[tuple[SessionState, CheckedBlock]],
               prefill_chunk: int | None = None) -> list[Outcome]:
        """One target forward for all blocks (distinct sessions). A session whose cache lacks
        more than `prefill_chunk` committed tokens only prefills that many this time (no
        verdict: walk None), so a long prompt costs the other sessions one chunk per forward
        until it has caught up."""
        segments, metas, rows = [], [], []
        for st, blk in work:
            have, kv_hit = self._chain(st)
            if st.kv is None:
                st.kv = self.runner.new_seq()  # never seen, evicted, or out of step: rebuild
            chain = st.committed[have:]  # committed tokens the cache lacks, ending at the root
            if prefill_chunk and len(chain) > prefill_chunk:
                segments.append(Segment.chain(st.kv, chain[:prefill_chunk], logits_at=[]))
                metas.append((have, prefill_chunk, kv_hit, False))
                continue
            segments.append(Segment.tree(st.kv, chain, blk.tokens, blk.parents, blk.depths))
            metas.append((have, len(chain), kv_hit, True))
            rows.append(RowSampling.for_tree(st.sampling, st.seed, blk.round, len(blk.tokens) + 1))
        logits, off = self.runner.forward_flat(segments)
        scorer = PathScorer(logits, {i: (off[i], off[i + 1]) for i, ((st, _), m)
                                     in enumerate(zip(work, metas, strict=True))
                                     if m[3] and st.logprobs >= 0})  # raw rows, copied now
        # penalties and bias on the rows of the sessions that ask (each row's history: C and
        # its node's path), for the picks only: logits are restored after
        groups = [Rows(a, st.sampling, History.of(st.committed, st.prompt_len), blk.tokens,
                       blk.parents) for (st, blk), a, m in zip(work, off, metas, strict=False)
                  if m[3] and wanted(st.sampling)]
        with applied(logits, groups) as x:
            picks = pick(x, RowSampling.concat(rows)).tolist() if rows else []  # one transfer
        out = []
        for (st, blk), a, (have, chain_len, kv_hit, verified) in zip(work, off, metas,
                                                                     strict=False):
            if not verified:
                out.append(Outcome(None, kv_hit, chain_len))
                continue
            res = walk(blk.tokens, blk.parents, picks[a : a + len(blk.tokens) + 1])
            scorer.add(len(out), res.accepted, blk.tokens, res.next_token, st.logprobs)
            # keep the chain (all committed) and the accepted nodes, in path order
            st.kv.keep(have, list(range(chain_len)) + [chain_len + i - 1 for i in res.accepted])
            out.append(Outcome(res, kv_hit, chain_len + len(blk.tokens)))
        for i, scored in scorer.score().items():  # one batched call for the forward
            out[i].logprobs = scored
        return out
