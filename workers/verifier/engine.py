"""The model side of verification: build one packed forward for a batch of checked blocks,
run it, pick every node's token in one batched call, walk each tree, roll each session's KV
back to its accepted path. Runs in the worker's executor thread; knows nothing about NATS."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

from specedge import subjects
from specedge.execution import PackedRunner, Segment
from specedge.execution import grammar as grammars
from specedge.execution.logprobs import PathScorer, Scored
from specedge.execution.prefix import Chain
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
    computed: int = 0  # tokens of C this forward computed to (re)build the session's KV


# Unused blocks the prefix cache keeps on a pool that grows (the CPU's): without a cap the
# pool would never give the memory of a past peak back. A fixed pool's cache uses any room.
GROWING_POOL_CACHE_TOKENS = 65536


def cache_blocks(tokens: int | None, fixed: bool, block_size: int) -> int | None:
    """The pool's cache cap in blocks from --prefix-cache-tokens (None: the default)."""
    if tokens is None:
        return None if fixed else GROWING_POOL_CACHE_TOKENS // block_size
    if tokens < 0:
        raise ValueError(f"prefix cache tokens must be >= 0, got {tokens}")
    return -(-tokens // block_size)


class Engine:
    def __init__(self, model, *, kv_budget_tokens: int | None = None, attention: str = "auto",
                 block_size: int = 16, cuda_graphs: bool | None = None,
                 vocab_limit: int | None = None, prefix_cache_tokens: int | None = None,
                 shared_prefixes: frozenset[str] = frozenset()):
        """prefix_cache_tokens: unused KV the prefix cache keeps (0: no cache; None: any free
        room of a fixed pool, GROWING_POOL_CACHE_TOKENS of a growing one). shared_prefixes:
        the SessionOpened.shared_prefix names whose blocks any tenant may hit."""
        self.runner = PackedRunner(model, kv_budget_tokens=kv_budget_tokens, attention=attention,
                                   block_size=block_size, cuda_graphs=cuda_graphs,
                                   vocab_limit=vocab_limit)
        self.model = model
        self.pool = self.runner.pool
        self.pool.enable_cache(cache_blocks(prefix_cache_tokens, self.pool.fixed, block_size))
        self.shared_prefixes = shared_prefixes
        self.vocab_size = self.runner.vocab_size
        # structured output: grammars compiled for the target's tokenizer (None: from the
        # tokenizer saved with the model, looked up when a session first asks)
        self.grammars: grammars.Grammars | None = None
        self._masker: concurrent.futures.ThreadPoolExecutor | None = None

    def _mask_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._masker is None:
            self._masker = concurrent.futures.ThreadPoolExecutor(1, "grammar-masks")
        return self._masker

    def grammar_compile(self, st: SessionState) -> concurrent.futures.Future | None:
        """The compile of this session's grammar, started on the first ask (None: it has no
        grammar, or its matcher exists already)."""
        if st.grammar is None or st.constraint is not None:
            return None
        if self.grammars is None:
            self.grammars = grammars.Grammars.for_model(self.model, self.vocab_size)
        if self.grammars is None:
            raise grammars.GrammarError("this verifier has no tokenizer for grammars")
        return self.grammars.prepare(st.grammar, sorted(st.eos_ids))

    def _grammar_rows(self, st: SessionState, blk: CheckedBlock):
        """Per-node grammar bitmask of this session's tree (None: unconstrained), from its
        matcher synced to C (built on first use, e.g. after a rebuild from the log)."""
        if st.grammar is None:
            return None
        if st.constraint is None:
            if self.grammars is None:
                self.grammars = grammars.Grammars.for_model(self.model, self.vocab_size)
            if self.grammars is None:
                raise grammars.GrammarError("this verifier has no tokenizer for grammars")
            st.constraint = self.grammars.constraint(st.grammar, sorted(st.eos_ids))
        st.constraint.sync_or_raise(st.committed[st.prompt_len:])
        return st.constraint.tree_bitmask(blk.tokens, blk.parents)

    def _hashes(self, st: SessionState) -> list[bytes]:
        """The block hashes of C: salted with the session's authenticated edge (its tenant),
        the blocks of a system prompt this verifier shares with the shared name instead."""
        if st.prefix_chain is None:
            shared = st.shared_prefix in self.shared_prefixes and st.shared_prefix != ""
            st.prefix_chain = Chain(
                self.pool.block_size, subjects.edge_of(st.sid).encode(),
                b"shared:" + st.shared_prefix.encode() if shared else b"",
                min(max(0, st.shared_len), st.prompt_len))
        return st.prefix_chain.update(st.committed)

    def _adoptable(self, st: SessionState) -> list[bytes]:
        """The hashes of C's full blocks before the root's (always computed: its row is the
        verdict's first pick)."""
        return self._hashes(st)[: (len(st.committed) - 1) // self.pool.block_size]

    def _adopt(self, st: SessionState) -> int:
        """On a new (empty) cache: take C's leading blocks from the prefix cache, all but the
        root at most (the root's row is the verdict's first pick); the tokens taken. The
        prompt tokens among them that no earlier build of this session reused are the next
        verdict's cached_tokens: a rebuild reuses the same tokens again, they count once."""
        if not self.pool.caching:
            return 0
        have = st.kv.adopt(self._adoptable(st))
        new = max(0, min(have, st.prompt_len) - st.cached_reported)
        st.cached_tokens += new
        st.cached_reported += new
        return have

    def _publish(self, st: SessionState) -> None:
        """Offer C's full blocks to sessions that start the same way (its other choices, its
        next turn), while this one still runs."""
        if self.pool.caching and st.kv is not None:
            st.kv.publish(self._hashes(st))

    def _chain(self, st: SessionState) -> tuple[int, bool]:
        """(tokens of C the cache holds, whether that is all but the root); a cache that is
        out of step with C is dropped."""
        kv = st.kv
        c = len(st.committed)
        if kv is not None and kv.length > c - 1:  # out of step (e.g. another worker's state)
            kv.free()
            st.kv = kv = None
        return (0 if kv is None else kv.length), kv is not None and kv.length == c - 1

    def prefilled(self, st: SessionState) -> int:
        """Tokens of C this session's KV holds, or would adopt from the prefix cache."""
        have, _ = self._chain(st)
        if st.kv is None and self.pool.caching:  # what adopting would find, without adopting
            have += len(self.pool.cached_run(self._adoptable(st))) * self.pool.block_size
        return have

    def catching_up(self, st: SessionState, prefill_chunk: int | None) -> bool:
        """Whether this session's next forward would only prefill a chunk (no verdict)."""
        return bool(prefill_chunk) and len(st.committed) - self.prefilled(st) > prefill_chunk

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
                have = self._adopt(st)
            chain = st.committed[have:]  # committed tokens the cache lacks, ending at the root
            if prefill_chunk and len(chain) > prefill_chunk:
                segments.append(Segment.chain(st.kv, chain[:prefill_chunk], logits_at=[]))
                metas.append((have, prefill_chunk, kv_hit, False))
                continue
            segments.append(Segment.tree(st.kv, chain, blk.tokens, blk.parents, blk.depths))
            metas.append((have, len(chain), kv_hit, True))
            base = len(st.committed)  # the root's row fills position len(C), a node's C + depth
            rows.append(RowSampling.for_positions(st.sampling, st.seed,
                                                  [base] + [base + d for d in blk.depths]))
        # grammar masks (matcher walks on the host) computed while the forward runs
        constrained = [i for i, ((st, _), m) in enumerate(zip(work, metas, strict=True))
                       if m[3] and st.grammar is not None]
        walks = self._mask_pool().submit(
            lambda: [(i, self._grammar_rows(*work[i])) for i in constrained]
        ) if constrained else None
        try:
            logits, off = self.runner.forward_flat(segments)
        except BaseException:
            if walks is not None:  # the matchers are not touched again until it is done
                concurrent.futures.wait([walks])
            raise
        scorer = PathScorer(logits, {i: (off[i], off[i + 1]) for i, ((st, _), m)
                                     in enumerate(zip(work, metas, strict=True))
                                     if m[3] and st.logprobs >= 0})  # raw rows, copied now
        # penalties and bias on the rows of the sessions that ask (each row's history: C and
        # its node's path), for the picks only: logits are restored after
        groups = [Rows(a, st.sampling, History.of(st.committed, st.prompt_len), blk.tokens,
                       blk.parents) for (st, blk), a, m in zip(work, off, metas, strict=False)
                  if m[3] and wanted(st.sampling)]
        # structured output: each node's row masked to what the grammar allows after its path
        masks = [(off[i], bm) for i, bm in walks.result()] if walks else []
        with applied(logits, groups) as x, grammars.masked(x, masks) as y:
            picks = pick(y, RowSampling.concat(rows)).tolist() if rows else []  # one transfer
        out = []
        for (st, blk), a, (_, chain_len, kv_hit, verified) in zip(
                work, off, metas, strict=False):
            computed = 0 if kv_hit else chain_len
            if not verified:
                out.append(Outcome(None, kv_hit, chain_len, computed=computed))
                continue
            res = walk(blk.tokens, blk.parents, picks[a : a + len(blk.tokens) + 1])
            scorer.add(len(out), res.accepted, blk.tokens, res.next_token, st.logprobs)
            out.append(Outcome(res, kv_hit, chain_len + len(blk.tokens), computed=computed))
        for i, scored in scorer.score().items():  # one batched call for the forward
            out[i].logprobs = scored
        # Only now, with every session's outcome in hand, the KV moves past the forward: a
        # failure before this point leaves nothing to undo but the appended tail (_restore).
        for (st, _), (have, chain_len, _, verified), o in zip(work, metas, out, strict=True):
            if verified:  # keep the chain (all committed) and the accepted nodes, in order
                st.kv.keep(have, list(range(chain_len))
                           + [chain_len + i - 1 for i in o.walk.accepted])
                self._publish(st)
        return out

    def verify_isolating(self, work: list[tuple[SessionState, CheckedBlock]],
                         prefill_chunk: int | None = None) -> list[Outcome | Exception]:
        """verify(), and when it raises: every session's KV rolled back to where it was, and
        the batch retried in halves until the sessions at fault stand alone. Each item is the
        session's Outcome or the exception it alone raised: one bad session costs the others
        a few extra forwards in this step, never their verdicts."""
        marks = [_mark(st) for st, _ in work]
        try:
            return list(self.verify(work, prefill_chunk))
        except Exception as exc:
            for (st, _), mark in zip(work, marks, strict=True):
                _restore(st, mark)
            if len(work) == 1:
                return [exc]
        half = len(work) // 2
        return (self.verify_isolating(work[:half], prefill_chunk)
                + self.verify_isolating(work[half:], prefill_chunk))


def _mark(st: SessionState) -> tuple:
    """What a forward may change in a session's state before its verdict: its KV (replaced,
    or grown by the forward's tail) and the tokens it adopted from the prefix cache."""
    return (st.kv, (st.kv.length if st.kv is not None else 0), st.cached_tokens,
            st.cached_reported)


def _restore(st: SessionState, mark: tuple) -> None:
    """Back to the mark after a failed forward: the tail it appended is dropped (positions
    below the mark are never written by a forward), a cache it made is freed. A cache that
    was itself dropped meanwhile is rebuilt by the next forward, exactly."""
    kv, length, cached, reported = mark
    if st.kv is not None and st.kv is not kv:
        st.kv.free()
    if kv is not None and kv.length >= length > 0:
        kv.truncate(length)
        st.kv = kv
    else:
        if kv is not None:
            kv.free()
        st.kv = None
    st.cached_tokens, st.cached_reported = cached, reported
