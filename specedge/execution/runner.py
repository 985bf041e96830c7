"""One forward of a causal LM over many sequences' new tokens, packed without padding.

Every sequence contributes a segment (see plan.py). The segments' tokens are concatenated
into one row, so the weights run once for the whole batch; attention is one call per layer
over the KV pool for all segments (attention.py). It plugs into transformers through
`AttentionInterface`, so the model code is stock: a forward without a plan (e.g. generate()
on the same model) is plain SDPA.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from specedge.execution import checkcache, compiling, flex, kvlayout, recurrent
from specedge.execution.attention import Backend, backend_for
from specedge.execution.graphs import GraphRunner
from specedge.execution.kvlayout import discover
from specedge.execution.plan import (
    PLAIN,
    ForwardPlan,
    LayerAttention,
    MaskKind,
    Segment,
    build_plan,
)
from specedge.execution.pool import KVPool, KVSeq
from specedge.execution.qblocks import LADDER, Q_BLOCK, split
from specedge.execution.statepool import StatePool
from specedge.execution.support import check_config, check_modules, check_recurrent, probe_model

ATTN_NAME = "specedge_packed"
log = structlog.get_logger(__name__)
# A runner given no KV budget on a GPU (an edge's draft model) takes this share of the free
# device memory for a pool of fixed size (a fixed pool is what CUDA graphs need); on the CPU
# the pool grows instead. A verifier sizes its own pool (workers/verifier/state.py).
GPU_DEFAULT_SHARE = 0.25
# What `--attention auto` tries per device type, checked against sdpa at start-up (else sdpa).
AUTO = {"cuda": "flex"}


def gpu_share_tokens(model, share: float, block_size: int = 16) -> int:
    """Tokens of KV that `share` of the device's free memory holds for this model (each
    layer's real size, kvlayout.py), rounded down to a coarse grid: the pool's size is part of
    every compiled kernel's shape, and free memory differs a little from one start to the
    next, so an unrounded pool would never reuse the kernels compiled by the last run."""
    p = next(model.parameters())
    free, _ = torch.cuda.mem_get_info(p.device)
    tokens = max(block_size, int(free * share) // max(1, discover(model).bytes_per_token))
    return round_capacity(tokens, block_size)


def round_capacity(tokens: int, block_size: int) -> int:
    """`tokens` rounded down to whole blocks with at most 4 significant bits (at most 1/8
    lost): 1000 blocks -> 960, 1100 -> 1024."""
    blocks = max(1, tokens // block_size)
    step = 1 << max(0, blocks.bit_length() - 4)
    return blocks // step * step * block_size


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    plan: ForwardPlan | None = kw.pop("specedge_plan", None)
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw
        )
    plan.attention_calls += 1
    layer = module.layer_idx
    # the keywords the model's attention passes win; the config's layer types fill in what a
    # model applies through its masks only (a chunked layer, a window without the keyword)
    window, chunk = plan.cache["layers"].get(layer, PLAIN)
    attn = LayerAttention(kw.get("sliding_window") or window, chunk, kw.get("softcap") or None,
                          kw.get("s_aux"))
    seen = plan.cache.get("seen")
    if seen is not None:
        seen.append((layer, attn, tuple(key.shape[1:]), tuple(value.shape[1:])))
    return plan.cache["backend"](layer, query, key, value, scaling, plan, attn), None


AttentionInterface.register(ATTN_NAME, _packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


class PackedRunner:
    """Owns a model and its KV pool; `forward` runs one packed step. One step at a time (the
    pool's lock): sessions that share a runner from several threads queue."""

    def __init__(self, model, *, pool: KVPool | None = None, attention: str = "auto",
                 kv_budget_tokens: int | None = None, block_size: int = 16,
                 cuda_graphs: bool | None = None, vocab_limit: int | None = None,
                 warm: bool | None = None):
        """cuda_graphs: replay captured graphs for forwards that fit a bucket (None: on CUDA
        when the flex backend is in use and the pool has a fixed size). vocab_limit: the ids
        the tokenizer has; logits past it (embedding padding) are never chosen. warm: compile
        compiled flex for every rung of the ladder now (None: wherever flex is compiled)."""
        self.model = model
        # refused here, before anything is allocated, when the config says it cannot be exact
        self.layers: dict[int, MaskKind] = check_config(model.config)
        check_modules(model)
        model.set_attn_implementation(ATTN_NAME)
        rows = model.get_input_embeddings().weight.shape[0]
        self.vocab_size = min(rows, vocab_limit) if vocab_limit else rows
        self.device = next(model.parameters()).device
        self._no_mask = torch.zeros(1, 1, 1, 1, dtype=next(model.parameters()).dtype,
                                    device=self.device)
        # the checks below, remembered from a start with the same files, format, device and
        # versions (checkcache.py): the layout's forward and two of the probe's are skipped
        check_key = checkcache.material(model, self.vocab_size)
        known = checkcache.lookup(check_key)
        if known is not None:
            kvlayout.remember(model, known["layout"])
        if pool is None and kv_budget_tokens is None and self.device.type == "cuda":
            kv_budget_tokens = gpu_share_tokens(model, GPU_DEFAULT_SHARE, block_size)
        self.pool = pool or KVPool.for_model(model, capacity_tokens=kv_budget_tokens,
                                             block_size=block_size)
        # layers with recurrent or convolution state: run by their own code on each row's
        # path (recurrent.py), their state kept beside the KV (statepool.py)
        self.recurrent_layers = check_recurrent(model, recurrent.install(model))
        if self.recurrent_layers and self.pool.states is None:
            self.pool.states = StatePool(self.recurrent_layers)
        self.forward_calls = 0  # one per forward(); tests assert batching with it
        self.graphs: GraphRunner | None = None  # set after the backend is chosen (below)
        self.attention_calls = 0  # attention-function calls (layers x forwards)
        self._seen: list | None = None  # set while probing: every attention call's layer
        self.compiled, self._compiles, self.late_compiles = False, 0, 0  # set after start-up
        tried = AUTO.get(self.device.type) if attention == "auto" else None
        if tried:
            self.attention, self.backend = self._probe(tried)
        else:
            self.attention, self.backend = backend_for(
                "sdpa" if attention == "auto" else attention, self.device)
        # what each layer's attention asks for, checked against the model's own attention
        # (refused with UnsupportedModel when the packed path is not exact)
        same = known is not None and known["attention"] == self.attention
        self.layer_attention: dict[int, LayerAttention]
        self.layer_attention, figures = probe_model(self, known["result"] if same else None)
        if not same:
            checkcache.remember(check_key, self.pool.layout, self.attention, figures)
        self.mask_kinds: set[MaskKind] = {a.mask for a in self.layer_attention.values()}
        if cuda_graphs is None:  # a graph replays no host-side grouping of stateful rows
            cuda_graphs = (self.device.type == "cuda" and self.attention == "flex"
                           and self.pool.fixed and not self.recurrent_layers)
        elif cuda_graphs and self.recurrent_layers:
            log.warning("no CUDA graphs for a model with recurrent layers (their rows are "
                        "grouped on the host each forward)")
            cuda_graphs = False
        t0, before = time.perf_counter(), compiling.compiles()
        if cuda_graphs:  # capturing every bucket compiles every rung too
            self.graphs = GraphRunner(self, capture=self.device.type == "cuda")
        compiled = self.attention == "flex" and self.device.type in flex.COMPILE_ON
        if warm or (warm is None and compiled and not self.graphs):
            self.warm_compile()
        self.compiled = compiled  # from here on, a compile is a shape outside the ladder
        if compiled:
            log.info("flex compiled at start-up", rungs=len(LADDER),
                     compiles=compiling.compiles() - before, s=round(time.perf_counter() - t0, 1),
                     pool_tokens=self.pool.capacity_tokens)
            if not self.pool.fixed:
                log.warning("compiled flex over a growing KV pool: each growth recompiles "
                            "every rung; give the pool a fixed budget")
        self._compiles = compiling.compiles()  # later ones: a shape outside the ladder

    def warm_compile(self) -> None:
        """One forward per rung of the ladder, so that compiled flex has seen every shape a
        steady-state forward can take before the first request (rung/16 one-token sessions:
        each starts its own query block)."""
        compiled, self.compiled = self.compiled, False  # these compiles are start-up's
        try:
            for rows in LADDER:
                seqs = [self.new_seq() for _ in range(rows // Q_BLOCK)]
                try:
                    self.forward_flat([Segment.chain(s, [0]) for s in seqs])
                finally:
                    for s in seqs:
                        s.free()
        finally:
            self.compiled, self._compiles = compiled, compiling.compiles()

    def _probe(self, name: str) -> tuple[str, Backend]:
        """Use backend `name` if it runs here and agrees with the sdpa reference on a small
        mixed batch (a prefill, a chain on a cached prefix, a tree); else sdpa, with a
        warning. Compiling it is part of the cost, logged."""
        ref = backend_for("sdpa", self.device)
        t0 = time.perf_counter()
        try:
            cand = backend_for(name, self.device)
            outs = []
            for backend in (ref, cand):
                self.attention, self.backend = backend
                seqs = [self.new_seq() for _ in range(3)]
                try:
                    self.forward([Segment.chain(seqs[1], list(range(1, 40)))])
                    outs.append(self.forward([
                        Segment.chain(seqs[0], list(range(3, 70))),
                        Segment.chain(seqs[1], [5, 6, 7]),
                        Segment.tree(seqs[2], [9, 8, 7, 6], [1, 2, 3, 4], [0, 0, 1, 3],
                                     [1, 1, 2, 3])]))
                finally:
                    for s in seqs:
                        s.free()
            a, b = torch.cat(outs[0]).float(), torch.cat(outs[1]).float()
            err = float((a - b).abs().max())
            tol = 2e-2 * float(a.abs().max()) + 1e-3
            if not err <= tol:
                raise RuntimeError(f"{name} disagrees with sdpa by {err:.3g} (tolerance {tol:.3g})")
        except Exception as exc:
            log.warning("attention backend unavailable; using sdpa", backend=name,
                        error=repr(exc)[:300])
            return ref
        log.info("attention backend checked", backend=name, max_abs_diff=err,
                 s=round(time.perf_counter() - t0, 2))
        return cand

    def new_seq(self) -> KVSeq:
        return self.pool.new_seq()

    def mask_argument(self, n: int) -> torch.Tensor:
        """The attention mask handed to the model: a 4-D tensor, which every model class
        takes as already prepared, so none builds a mask (the packed attention ignores it). A
        view of one element: no memory, no host sync (CUDA-graph safe)."""
        return self._no_mask.expand(1, 1, n, n)

    def set_backend(self, name: str, fn: Backend) -> None:
        self.attention, self.backend = name, fn

    @torch.no_grad()
    def forward_flat(self, segments: Sequence[Segment]) -> tuple[torch.Tensor, list[int]]:
        """Run one forward over all segments: the wanted rows' logits [R, V] in the model's
        dtype (an upcast of every row would cost more than the attention: the picks and the
        drafter's top-k promote only what they read), and each segment's first row in them
        (plus the end). New tokens' KV is appended to each sequence. With the flex backend a
        forward bigger than the ladder's top rung runs as several (qblocks.split)."""
        if not segments:
            return torch.empty(0, self.vocab_size, device=self.device), [0]
        if len({id(s.seq) for s in segments}) != len(segments):
            raise ValueError("a sequence may appear only once per packed forward")
        for seg in segments:
            seg.check()
        with self.pool.lock:
            groups = split(segments) if self.attention == "flex" else [list(segments)]
            if len(groups) == 1:
                logits = self._forward_once(groups[0])
            else:  # each segment's wanted rows, from its pieces in order
                per: dict[int, list[torch.Tensor]] = {}
                for group in groups:
                    out = self._forward_once(group)
                    r = 0
                    for piece in group:
                        k = len(piece.logits_at)
                        per.setdefault(id(piece.seq), []).append(out[r : r + k])
                        r += k
                logits = torch.cat([t for seg in segments for t in per[id(seg.seq)]])
        if self.compiled and compiling.compiles() != self._compiles:
            self.late_compiles += compiling.compiles() - self._compiles
            self._compiles = compiling.compiles()
            log.warning("flex compiled after start-up: a forward outside the ladder",
                        segments=len(segments), rows=sum(len(s.tokens) for s in segments),
                        late_compiles=self.late_compiles)
        offsets = [0]
        for seg in segments:
            offsets.append(offsets[-1] + len(seg.logits_at))
        return logits, offsets

    def _forward_once(self, segments: Sequence[Segment]) -> torch.Tensor:
        """One model forward (the pool's lock held); the wanted rows' logits."""
        pool = self.pool
        pool.shrink()  # after a peak, before any slot of this forward is computed
        for seg in segments:
            n = seg.seq.length
            seg.seq.prepare_write(n, n + len(seg.tokens))
        pool.flush()
        bucket = self.graphs.bucket_for(segments) if self.graphs else None
        if bucket is not None:
            logits = self.graphs.forward(bucket, segments)
            want, r = [], 0
            for seg in segments:
                want += [r + i for i in seg.logits_at]
                r += len(seg.tokens)
            # the graph's output buffer is overwritten by the next replay: copy out (a long
            # index even when empty: a forward of prefill chunks wants no row)
            idx = torch.tensor(want, dtype=torch.long, device=self.device)
            logits = logits[idx] if len(want) != r else logits.clone()
        else:
            plan = build_plan(segments, pool, self.device)
            plan.cache.update(backend=self.backend, layers=self.layers, segments=segments,
                              kinds=getattr(self, "mask_kinds", None))
            if self._seen is not None:
                plan.cache["seen"] = self._seen
            logits = self.model(
                input_ids=plan.ids.unsqueeze(0),
                position_ids=plan.pos.unsqueeze(0),
                attention_mask=self.mask_argument(plan.ids.numel()),
                use_cache=False,
                logits_to_keep=plan.want,
                specedge_plan=plan,
            ).logits[0]
            if logits.shape[0] != plan.want.numel():  # a model without logits_to_keep
                logits = logits.index_select(0, plan.want)
            self.attention_calls += plan.attention_calls
        if logits.shape[-1] > self.vocab_size:  # padding rows: no tokenizer id, no pick
            logits[:, self.vocab_size :] = float("-inf")
        self.forward_calls += 1
        for seg in segments:
            seg.seq.length += len(seg.tokens)
        return logits

    def forward(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """Per-segment logits [len(logits_at), V]."""
        logits, off = self.forward_flat(segments)
        return [logits[a:b] for a, b in zip(off, off[1:], strict=False)]
