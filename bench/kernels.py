"""python -m bench.kernels [--device cpu|cuda] [--shape tiny|0.5b|1.5b|7b|hybrid-tiny] [--out DIR]: the
verifier's packed forward against the same tokens as a padded dense batch through stock
transformers (a KV cache per row, the cached length of every row the same) and against the
weights alone (every token in one row, no cache), for sessions x new tokens per session over
a cached context. Random weights of the shape's real config (`synthetic:<shape>`: tiny is
hidden 256, 4 layers, the real vocabulary); every forward timed with CUDA events on a GPU
(perf_counter and a device sync elsewhere), median of --reps. Each cell is appended to
DIR/results.jsonl the moment it is measured (a run cut short keeps what it measured; --budget-s
stops it and says what was left); DIR/results.json and DIR/table.md at the end.

hybrid-tiny is a Qwen3.5-like model (three gated-delta-rule layers to one attention layer,
random weights): its rows add the share of the forward spent in the stateful layers, packed
(the tree level by level, recurrent.py) and dense (stock transformers' own cache).

Packed: each session's new tokens are a draft tree (the root, which the cache lacks, plus
tokens-1 nodes) hanging off its cached context in the KV pool, as the verifier runs them.

The measurement pieces of `make gpu-check` (bench/gpu_check.py) live here too: the journal
(one fsynced JSON line per result), the per-step time budget, and steps a-c (correctness of
graphs vs eager flex vs sdpa, the latency sweep, the profiler summary).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from bench.stack import markdown_table
from specedge.devices import device_name, synchronize
from specedge.edge.coalesce import CoalescingRunner
from specedge.execution import KVSeq, PackedRunner, Segment
from specedge.execution.graphs import GraphRunner
from specedge.execution.sampling import RowSampling, pick
from specedge.execution.tree import depths_of
from specedge.synthetic import build

SHAPES = ("tiny", "0.5b", "1.5b", "7b")  # the vendored Qwen2.5 configs (specedge.synthetic)
# a hybrid of Qwen3.5's make (three gated-delta-rule layers to one attention layer), tiny
HYBRID = {"hybrid-tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=768,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=64, linear_num_value_heads=8, linear_num_key_heads=4,
                              linear_key_head_dim=32, linear_value_head_dim=32,
                              layer_types=["linear_attention"] * 3 + ["full_attention"])}
CACHED = {"tiny": 256, "hybrid-tiny": 256}  # cached tokens per session; 512 for the others
SESSIONS = (1, 4, 16, 64)
TOKENS = (1, 4, 8, 16)
PREFILL_GROUP = 8  # sessions per prefill forward: one padded size per context length


# ---------------------------------------------------------------- journal and budget


class Journal:
    """Appends one JSON line per event to a file, flushed and fsynced at once: a process
    killed at its time limit (or a machine taken back) leaves every line it wrote."""

    def __init__(self, path: Path, step: str | None = None, echo: bool = True):
        self.path, self.step, self.echo = Path(path), step, echo
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **fields) -> dict:
        rec = {"kind": kind, **({"step": self.step} if self.step else {}),
               "t": round(time.time(), 3), **fields}
        line = json.dumps(rec, default=str) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.echo:
            print(line[:400], end="", file=sys.stderr, flush=True)
        return rec


def read_journal(path: Path) -> list[dict]:
    """Every complete line of a journal (a torn last line is dropped)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@dataclass
class Budget:
    """Seconds a step may take, from its start (wall clock: shared with the parent)."""

    seconds: float
    start: float = field(default_factory=time.time)

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


@dataclass
class Item:
    """One measurement (or a setup others need): fn returns the fields of its result line."""

    name: str
    fn: Callable[[], dict | None]
    need_s: float = 1.0  # skipped when less than this is left
    needs: str | None = None  # a setup item whose failure or skip skips this one


def run_items(journal: Journal, budget: Budget, items: Sequence[Item]) -> bool:
    """Runs the items in order: one `result` line each as it is measured, an `error` line
    for one that raised (the rest go on), a `skipped` line with the reason for each that the
    budget or a failed setup left out. The plan comes first, so a process killed at its
    limit still says what it never reached. True when nothing failed."""
    journal.write("plan", items=[it.name for it in items], budget_s=round(budget.seconds, 1))
    done: set[str] = set()
    ok = True
    for it in items:
        left = budget.left()
        if it.needs and it.needs not in done:
            journal.write("skipped", name=it.name, reason=f"needs {it.needs}")
            continue
        if left < it.need_s:
            journal.write("skipped", name=it.name,
                          reason=f"budget: {max(0.0, left):.0f} s of {budget.seconds:.0f} s "
                                 f"left, needs ~{it.need_s:.0f} s")
            continue
        t0 = time.perf_counter()
        try:
            out = it.fn() or {}
        except Exception as e:  # one broken measurement must not hide the others
            ok = False
            journal.write("error", name=it.name, error=f"{type(e).__name__}: {e}"[:2000],
                          s=round(time.perf_counter() - t0, 2))
            continue
        done.add(it.name)
        ok = ok and out.get("ok", True)
        journal.write("result", name=it.name, s=round(time.perf_counter() - t0, 2), **out)
    return ok


# ---------------------------------------------------------------- timing and compiles


def time_ms(fn: Callable[[], object], device: str, reps: int,
            setup: Callable[[], object] | None = None) -> dict:
    """Median and minimum ms of fn() over reps after one warm-up; setup() runs untimed. CUDA
    events on a GPU (the device's time from the launch of fn's first work to its last),
    perf_counter around a device sync elsewhere."""
    cuda = torch.device(device).type == "cuda"
    out = []
    for i in range(reps + 1):
        if setup:
            setup()
        synchronize(device)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            ms = (time.perf_counter() - t0) * 1000
        if i:
            out.append(ms)
    return {"ms": round(statistics.median(out), 3), "ms_min": round(min(out), 3),
            "reps": reps, "timer": "cuda-events" if cuda else "perf_counter"}


def compile_count() -> int | None:
    """Graphs torch.compile has produced in this process (dynamo's counter; None if absent)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return None


def startup_compile(runner: PackedRunner, journal: Journal, what: str) -> None:
    """THE START-UP COMPILE: the one place gpu-check asks a runner to compile every shape it
    can meet (`PackedRunner.warm_compile()`: the ladder's rungs) and logs how many compiles
    that took and how long (profile entry `warm_compile`; where it is off, a shape compiles
    at its first forward, which `time_ms` leaves out of the timing)."""
    warm = getattr(runner, "warm_compile", None)
    c0, t0 = compile_count(), time.perf_counter()
    if callable(warm):
        warm()
        synchronize(runner.device)
    journal.write("compile", name=what, phase="warm_compile", present=callable(warm),
                  compiles=None if c0 is None else compile_count() - c0,
                  s=round(time.perf_counter() - t0, 2))


# PackedRunner compiles its ladder at construction where it takes `warm`; here that is
# startup_compile's job, timed on its own
_WARM_KW = ({"warm": False} if "warm" in inspect.signature(PackedRunner.__init__).parameters
            else {})


def make_runner(model, mode: str, kv_tokens: int, journal: Journal, what: str,
                warm: bool = False) -> PackedRunner:
    """A runner for `mode` (sdpa, flex: eager; graphs: the bucket path over the production
    ladder, captured on CUDA, the static path without capture elsewhere); its construction,
    start-up compile (when `warm`) and capture each logged with compiles and seconds."""
    c0, t0 = compile_count(), time.perf_counter()
    runner = PackedRunner(model, attention="sdpa" if mode == "sdpa" else "flex",
                          kv_budget_tokens=kv_tokens, cuda_graphs=False, **_WARM_KW)
    journal.write("compile", name=f"{what} {mode}", phase="construct",
                  compiles=None if c0 is None else compile_count() - c0,
                  s=round(time.perf_counter() - t0, 2))
    if warm and mode != "sdpa":
        startup_compile(runner, journal, f"{what} {mode}")
    if mode == "graphs":
        c0, t0 = compile_count(), time.perf_counter()
        runner.graphs = GraphRunner(runner, capture=runner.device.type == "cuda")
        synchronize(runner.device)
        journal.write("compile", name=f"{what} {mode}", phase="capture",
                      buckets=len(runner.graphs.buckets),
                      compiles=None if c0 is None else compile_count() - c0,
                      s=round(time.perf_counter() - t0, 2))
    return runner


# ---------------------------------------------------------------- workloads


def random_model(shape: str, dtype: torch.dtype, device: str):
    """Random weights of the shape's real config (deterministic, built on the device)."""
    if shape in HYBRID:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.Qwen3_5TextConfig(**HYBRID[shape], tie_word_embeddings=False)
        return transformers.AutoModelForCausalLM.from_config(cfg).to(device, dtype).eval()
    return build(f"synthetic:{shape}", dtype=dtype, device=device)


def recurrent_share(model, device: str, fn: Callable[[], object],
                    setup: Callable[[], object] | None = None, reps: int = 3) -> float | None:
    """The share of one call of `fn` spent inside the model's stateful layers (their whole
    module call: projections, conv, state kernel; device synced at each edge), median of
    reps; None for a model without such layers."""
    from specedge.execution.recurrent import keeps_state

    mods = [m for m in model.modules() if keeps_state(m)]
    if not mods:
        return None
    spent, t0 = [0.0], [0.0]

    def pre(*_):
        synchronize(device)
        t0[0] = time.perf_counter()

    def post(*_):
        synchronize(device)
        spent[0] += time.perf_counter() - t0[0]

    hooks = [h for m in mods for h in (m.register_forward_pre_hook(pre),
                                        m.register_forward_hook(post))]
    shares = []
    try:
        for _ in range(reps):
            if setup:
                setup()
            spent[0] = 0.0
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            shares.append(spent[0] / (time.perf_counter() - start))
    finally:
        for h in hooks:
            h.remove()
    return round(statistics.median(shares), 3)


def tree_parents(n: int) -> list[int]:
    """A bushy tree of n nodes (each node's parent about half-way up), like a draft tree."""
    return [0 if i < 3 else i // 2 for i in range(1, n + 1)]


def _cache_kwarg(model) -> str:
    """transformers renamed past_key_values to cache (5.x); take whichever forward has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Batch:
    """Token ids of sessions x (cached context, new tokens)."""

    ctx: torch.Tensor  # [S, cached]
    new: torch.Tensor  # [S, tokens]

    @classmethod
    def random(cls, vocab: int, sessions: int, tokens: int, cached: int, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randint(0, vocab, (sessions, cached), generator=g),
                   torch.randint(0, vocab, (sessions, tokens), generator=g))


def load_contexts(runner: PackedRunner, b: Batch) -> list[KVSeq]:
    """A sequence per session holding its context but the last token (the tree's root)."""
    seqs = [runner.new_seq() for _ in range(b.ctx.shape[0])]
    if b.ctx.shape[1] > 1:
        for a in range(0, len(seqs), PREFILL_GROUP):
            runner.forward([Segment.chain(s, b.ctx[a + i, :-1].tolist())
                            for i, s in enumerate(seqs[a : a + PREFILL_GROUP])])
    return seqs


def tree_segments(seqs: Sequence[KVSeq], b: Batch, sessions: int | None = None
                  ) -> list[Segment]:
    """Each session's draft tree: its root (the context's last token) and tokens-1 nodes."""
    n = sessions or len(seqs)
    parents = tree_parents(b.new.shape[1] - 1)
    depths = depths_of(parents)
    return [Segment.tree(s, [int(b.ctx[i, -1])], b.new[i, 1:].tolist(), parents, depths)
            for i, s in enumerate(seqs[:n])]


def rewind(seqs: Sequence[KVSeq], length: int) -> None:
    for s in seqs:
        s.truncate(length)


def free(seqs: Sequence[KVSeq]) -> None:
    for s in seqs:
        s.free()


def packed_ms(runner: PackedRunner, device: str, ctx: torch.Tensor, new: torch.Tensor,
              reps: int) -> float:
    """Median ms of one forward of every session's tree over its cached context."""
    b = Batch(ctx, new)
    seqs = load_contexts(runner, b)
    segs = tree_segments(seqs, b)
    try:
        return time_ms(lambda: runner.forward(segs), device, reps,
                       lambda: rewind(seqs, ctx.shape[1] - 1))["ms"]
    finally:
        free(seqs)


# How the packed forward runs: `sdpa` and `flex` eagerly (the yardstick of one attention call
# per layer), `graphs` replaying CUDA graphs of the flex path (CUDA only).
MODES = {"sdpa": ("sdpa", False), "flex": ("flex", False), "graphs": ("flex", True)}


@torch.no_grad()
def cell(model, runners: dict[str, PackedRunner], device: str, sessions: int, tokens: int,
         cached: int, reps: int, seed: int) -> dict:
    vocab = model.config.vocab_size
    b = Batch.random(vocab, sessions, tokens, cached, seed)
    row: dict = {"sessions": sessions, "tokens_each": tokens, "cached": cached}
    for mode, runner in runners.items():
        row[f"packed_{mode}_ms"] = round(packed_ms(runner, device, b.ctx, b.new, reps), 3)
    first = next(iter(runners.values()))
    if first.recurrent_layers:  # the stateful layers' share of the packed forward
        seqs = load_contexts(first, b)
        segs = tree_segments(seqs, b)
        try:
            row["packed_recurrent_share"] = recurrent_share(
                model, device, lambda: first.forward(segs),
                lambda: rewind(seqs, cached - 1))
        finally:
            free(seqs)

    # dense: stock transformers, a KV cache of `cached` tokens per row, one forward of T tokens
    arg = _cache_kwarg(model)
    ids = b.ctx.to(device)
    step = b.new.to(device)
    mask = torch.ones(sessions, cached + tokens, dtype=torch.long, device=device)
    state: dict = {}

    def prefill() -> None:
        state["cache"] = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, **{arg: state["cache"]})

    def dense() -> None:
        model(input_ids=step, attention_mask=mask, use_cache=True, **{arg: state["cache"]})

    row["dense_ms"] = time_ms(dense, device, reps, prefill)["ms"]
    share = recurrent_share(model, device, dense, prefill)
    if share is not None:
        row["dense_recurrent_share"] = share
    state.clear()
    flat_ids = step.reshape(1, -1)
    row["flat_ms"] = time_ms(lambda: model(input_ids=flat_ids, use_cache=False), device,
                             reps)["ms"]
    best = min(row[f"packed_{m}_ms"] for m in runners)
    row["packed_ms"] = best  # the fastest way this device runs it
    row["packed_x_dense"] = round(best / row["dense_ms"], 3)
    row["packed_x_flat"] = round(best / row["flat_ms"], 3)
    for mode in runners:
        row[f"{mode}_x_dense"] = round(row[f"packed_{mode}_ms"] / row["dense_ms"], 3)
    return row


# ---------------------------------------------------------------- gpu-check steps a-c


def kv_tokens(sessions: int, cached: int, tokens: int) -> int:
    """A fixed pool that holds every session's context and tree, and the padding block."""
    return int(1.1 * sessions * (cached + tokens + 16)) + 1024


def main_kv(prof: dict, need: int) -> int:
    """The main shape's pool: one size for every step (prof["kv_tokens"]), so that a step's
    compiles of the same shapes hit the inductor cache an earlier step filled."""
    return max(need, prof.get("kv_tokens") or 0)


def _logits(runner: PackedRunner, b: Batch, chunk: bool) -> tuple[torch.Tensor, bool]:
    """Every wanted row's logits (float32, host) of one forward, and whether it replayed a
    bucket (the graph path) rather than running eagerly."""
    replays = runner.graphs.replays if runner.graphs else 0
    if chunk:  # a lone chunk: one fresh sequence, logits at every row
        seqs = [runner.new_seq()]
        segs = [Segment.chain(seqs[0], b.new[0].tolist(), list(range(b.new.shape[1])))]
    else:
        seqs = load_contexts(runner, b)
        replays = runner.graphs.replays if runner.graphs else 0
        segs = tree_segments(seqs, b)
    try:
        out = torch.cat(runner.forward(segs)).float().cpu()
    finally:
        free(seqs)
    return out, bool(runner.graphs and runner.graphs.replays > replays)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """How far `got` is from the reference logits: the tolerance is the backend probe's
    (2% of the largest logit, plus 1e-3), argmax agreement reported beside it."""
    err = float((ref - got).abs().max())
    tol = 2e-2 * float(ref.abs().max()) + 1e-3
    return {"max_abs_diff": round(err, 5), "tol": round(tol, 5),
            "argmax_agree": round(float((ref.argmax(-1) == got.argmax(-1)).float().mean()), 4),
            "ok": err <= tol}


def correctness_items(prof: dict, journal: Journal) -> list[Item]:
    """Step a: the graph (bucket) path, eager flex and sdpa on the same inputs, for each case
    of prof["cases"] (name, sessions, tokens, cached; tokens of a chunk case: one fresh
    sequence's chain), with the weights requiring grad and not, two replays with different
    inputs each (stale buffers or a wrong capture show as a disagreement)."""
    st: dict = {}
    dev, dtype = prof["device"], getattr(torch, prof["dtype"])
    cases = prof["cases"]
    kv = main_kv(prof, max(kv_tokens(s, c, t) for _, s, t, c in cases))

    def setup(grad: bool) -> dict:
        if "model" not in st:
            st["model"] = random_model(prof["shape"], dtype, dev)
        st["model"].requires_grad_(grad)
        # the graphs runner captures (on CUDA) with these weights: built anew for each; the
        # eager runners read the weights at each forward, built once
        names = ("graphs",) if "runners" in st else ("graphs", "flex", "sdpa")
        st.setdefault("runners", {}).update(
            {m: make_runner(st["model"], m, kv, journal, f"{prof['shape']} grad={grad}",
                            prof.get("warm_compile", False)) for m in names})
        return {"grad": grad, "shape": prof["shape"], "dtype": prof["dtype"]}

    def check(case: tuple, grad: bool, replay: int) -> dict:
        name, sessions, tokens, cached = case
        chunk = name.startswith("chunk")
        b = Batch.random(st["model"].config.vocab_size, sessions, tokens, max(cached, 1),
                         seed=1000 * replay + sessions * 10 + tokens)
        outs = {m: _logits(r, b, chunk) for m, r in st["runners"].items()}
        ref = outs["sdpa"][0]
        g, f = compare(ref, outs["graphs"][0]), compare(ref, outs["flex"][0])
        return {"case": name, "grad": grad, "replay": replay, "rows": ref.shape[0],
                "graphed": outs["graphs"][1], "graphs_vs_sdpa": g, "flex_vs_sdpa": f,
                "ok": g["ok"] and f["ok"]}

    items = []
    for grad in (True, False):
        su = f"runners grad={grad}"
        items.append(Item(su, lambda grad=grad: setup(grad), prof["setup_s"]))
        items += [Item(f"{c[0]} grad={grad} replay {r}", lambda c=c, grad=grad, r=r:
                       check(c, grad, r), needs=su)
                  for c in cases for r in (1, 2)]
    return items


def latency_items(prof: dict, journal: Journal) -> list[Item]:
    """Step b: CUDA-event latency of the main shape's forward at each (sessions, tokens) of
    prof["grid"] over each context length of prof["cached"], for graphs, eager flex and sdpa;
    the big shape at its one cell with graphs; the draft step alone and through the
    coalescer; the sampled pick."""
    st: dict = {}
    dev, dtype, reps = prof["device"], getattr(torch, prof["dtype"]), prof["reps"]
    grid, cached_list = prof["grid"], prof["cached"]
    most = max(s for s, _ in grid)
    kv = main_kv(prof, kv_tokens(most, max(cached_list), max(t for _, t in grid)))
    modes = ("graphs", "flex", "sdpa")

    def setup() -> dict:
        st["model"] = random_model(prof["shape"], dtype, dev)
        st["runners"] = {m: make_runner(st["model"], m, kv, journal, prof["shape"],
                                        prof.get("warm_compile", False)) for m in modes}
        return {"shape": prof["shape"], "kv_tokens": kv}

    def contexts(cached: int) -> dict:
        for seqs in st.get("seqs", {}).values():
            free(seqs)
        st["batch"] = Batch.random(st["model"].config.vocab_size, most, max(t for _, t in grid),
                                   cached, seed=cached)
        st["seqs"] = {m: load_contexts(r, st["batch"]) for m, r in st["runners"].items()}
        st["cached"] = cached
        return {"cached": cached, "sessions": most}

    def one(mode: str, sessions: int, tokens: int) -> dict:
        r, seqs, cached = st["runners"][mode], st["seqs"][mode], st["cached"]
        full = st["batch"]
        b = Batch(full.ctx[:sessions], full.new[:sessions, :tokens])
        rewind(seqs[:sessions], cached - 1)  # the segments are built on the context alone
        segs = tree_segments(seqs, b, sessions)
        before = r.graphs.replays if r.graphs else 0
        t = time_ms(lambda: r.forward(segs), dev, reps, lambda: rewind(seqs[:sessions],
                                                                       cached - 1))
        return {"shape": prof["shape"], "mode": mode, "sessions": sessions, "tokens_each": tokens,
                "cached": cached, "graphed": bool(r.graphs and r.graphs.replays > before), **t}

    items = [Item("setup " + prof["shape"], setup, prof["setup_s"])]
    for cached in cached_list:
        ctx_name = f"contexts {cached}"
        items.append(Item(ctx_name, lambda c=cached: contexts(c), 2.0, needs=items[0].name))
        items += [Item(f"{prof['shape']} {m} {s}x{t} c{cached}",
                       lambda m=m, s=s, t=t: one(m, s, t), needs=ctx_name)
                  for s, t in grid for m in modes]

    def big() -> dict:
        for seqs in st.pop("seqs", {}).values():
            free(seqs)
        st.pop("runners", None)
        st.pop("model", None)
        _free_memory()
        shape, (s, t), cached = prof["big"], prof["big_cell"], prof["big_cached"]
        model = random_model(shape, dtype, dev)
        runner = make_runner(model, "graphs", kv_tokens(s, cached, t), journal, shape)
        b = Batch.random(model.config.vocab_size, s, t, cached, seed=7)
        seqs = load_contexts(runner, b)
        segs = tree_segments(seqs, b)
        before = runner.graphs.replays
        try:
            res = time_ms(lambda: runner.forward(segs), dev, reps,
                          lambda: rewind(seqs, cached - 1))
            runner_replays = [runner.graphs.replays]
        finally:
            free(seqs)
        return {"shape": shape, "mode": "graphs", "sessions": s, "tokens_each": t,
                "cached": cached, "graphed": runner_replays[0] > before, **res}

    items.append(Item(f"{prof['big']} graphs {prof['big_cell'][0]}x{prof['big_cell'][1]}",
                      big, prof["big_s"]))
    items += draft_items(prof, journal, st)
    items.append(Item(f"pick sampled {prof['pick_rows']} rows", lambda: pick_item(prof), 2.0))
    return items


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def draft_items(prof: dict, journal: Journal, st: dict) -> list[Item]:
    """The draft model's step (a root and one node over its cached context): one session
    alone, then prof["coalesce"] sessions in threads through the CoalescingRunner, as an edge
    serving several requests runs it."""
    dev, dtype, reps = prof["device"], getattr(torch, prof["dtype"]), prof["reps"]
    shape, cached, n = prof["draft"], prof["draft_cached"], prof["coalesce"]

    def setup() -> dict:
        st.pop("runners", None)
        st.pop("model", None)
        _free_memory()
        st["draft"] = random_model(shape, dtype, dev)
        # the edge's path: flex, graphs; only the bucket a draft step of n sessions uses
        st["draft_runner"] = make_runner(st["draft"], "graphs", kv_tokens(n, cached + 64, 2),
                                         journal, shape)
        return {"shape": shape}

    def alone() -> dict:
        r = st["draft_runner"]
        b = Batch.random(st["draft"].config.vocab_size, 1, 2, cached, seed=3)
        seqs = load_contexts(r, b)
        segs = tree_segments(seqs, b)
        try:
            res = time_ms(lambda: r.forward(segs), dev, reps, lambda: rewind(seqs, cached - 1))
        finally:
            free(seqs)
        return {"shape": shape, "sessions": 1, "tokens_each": 2, "cached": cached, **res}

    def coalesced() -> dict:
        r = st["draft_runner"]
        co = CoalescingRunner(r)
        b = Batch.random(st["draft"].config.vocab_size, n, 2, cached, seed=4)
        seqs = load_contexts(r, b)
        lat: list[float] = []
        lock = threading.Lock()

        def session(i: int) -> None:
            for k in range(reps + 1):
                seg = Segment.tree(seqs[i], [int(b.ctx[i, -1]) if k == 0 else 1], [2], [0], [1])
                t0 = time.perf_counter()
                co.forward([seg])
                if k:
                    with lock:
                        lat.append((time.perf_counter() - t0) * 1000)

        threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        free(seqs)
        return {"shape": shape, "sessions": n, "tokens_each": 2, "cached": cached,
                "ms": round(statistics.median(lat), 3), "ms_min": round(min(lat), 3),
                "timer": "perf_counter (per session, host)", "forwards": co.forwards,
                "requests": co.requests, "sessions_per_forward": round(
                    co.requests / max(1, co.forwards), 2), "wall_s": round(wall, 3)}

    return [Item(f"setup draft {shape}", setup, prof["setup_s"]),
            Item(f"draft {shape} 1x2 alone", alone, needs=f"setup draft {shape}"),
            Item(f"draft {shape} {n}x2 coalesced", coalesced, needs=f"setup draft {shape}")]


def pick_item(prof: dict) -> dict:
    """The verifier's sampled pick (T 0.7, top-p 0.9: sort, cumulative sum, seeded noise) over
    prof["pick_rows"] rows of the full vocabulary, and the greedy pick beside it."""
    from specedge.synthetic import config

    dev, rows = prof["device"], prof["pick_rows"]
    vocab = config(prof["shape"]).vocab_size
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(getattr(torch, prof["dtype"])
                                                            ).to(dev)
    rs = RowSampling([0.7] * rows, [0] * rows, [0.9] * rows, [(i, 7) for i in range(rows)])
    greedy = RowSampling([0.0] * rows, [0] * rows, [1.0] * rows, [(0, 0)] * rows)
    sampled = time_ms(lambda: pick(logits, rs), dev, prof["reps"])
    return {"rows": rows, "vocab": vocab, "temperature": 0.7, "top_p": 0.9, **sampled,
            "greedy_ms": time_ms(lambda: pick(logits, greedy), dev, prof["reps"])["ms"]}


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_summary(prof_obj, forwards: int) -> dict:
    """Kernels per forward and the GPU's idle time inside the profiled forwards (each bracketed
    by a `gpucheck-forward` range and a sync); on the CPU the aten ops per forward."""
    evs = list(prof_obj.events())
    gpu = torch.autograd.DeviceType.CUDA
    # the range on the host (kineto mirrors user ranges onto the GPU timeline: not work)
    windows = [(e.time_range.start, e.time_range.end) for e in evs
               if e.name == "gpucheck-forward" and e.device_type != gpu]
    work = [e for e in evs if e.device_type == gpu and e.name != "gpucheck-forward"]
    kernels = [e for e in work if not e.name.startswith(("Memcpy", "Memset"))]
    out: dict = {"forwards": forwards,
                 "aten_ops_per_forward": round(sum(e.name.startswith("aten::") for e in evs)
                                               / forwards, 1)}
    wall = sum(b - a for a, b in windows)
    out["wall_ms_per_forward"] = round(wall / 1000 / forwards, 3)
    if kernels:
        busy = _union_us([(k.time_range.start, k.time_range.end) for k in work])
        out |= {"kernels_per_forward": round(len(kernels) / forwards, 1),
                "gpu_busy_ms_per_forward": round(busy / 1000 / forwards, 3),
                "gpu_idle_ms_per_forward": round(max(0.0, wall - busy) / 1000 / forwards, 3),
                "gpu_idle_share": round(max(0.0, wall - busy) / wall, 3) if wall else None}
    else:
        out |= {"kernels_per_forward": None, "gpu_idle_ms_per_forward": None,
                "gpu_idle_share": None}
    return out


def profile_items(prof: dict, journal: Journal, out_dir: Path) -> list[Item]:
    """Step c: torch.profiler over a few graphed forwards of sessions x tokens (prof["cell"]),
    and the same forwards eagerly (flex) beside them; the top ops table to DIR/profile-*.txt."""
    from torch.profiler import ProfilerActivity, profile, record_function

    st: dict = {}
    dev, dtype = prof["device"], getattr(torch, prof["dtype"])
    (s, t), cached, n = prof["cell"], prof["profile_cached"], prof["profile_forwards"]

    def setup() -> dict:
        st["model"] = random_model(prof["shape"], dtype, dev)
        return {"shape": prof["shape"]}

    def one(mode: str) -> dict:
        r = make_runner(st["model"], mode, main_kv(prof, kv_tokens(s, cached, t)), journal,
                        prof["shape"], prof.get("warm_compile", False))
        b = Batch.random(st["model"].config.vocab_size, s, t, cached, seed=11)
        seqs = load_contexts(r, b)
        segs = tree_segments(seqs, b)
        for _ in range(3):  # warm: compiles, allocator
            rewind(seqs, cached - 1)
            r.forward(segs)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                         if torch.device(dev).type == "cuda" else [])
        synchronize(dev)
        with profile(activities=acts) as p:
            for _ in range(n):
                rewind(seqs, cached - 1)
                with record_function("gpucheck-forward"):
                    r.forward(segs)
                    synchronize(dev)
        free(seqs)
        name = f"profile-{prof['shape']}-{mode}-{s}x{t}.txt"
        sort = "cuda_time_total" if len(acts) > 1 else "cpu_time_total"
        (out_dir / name).write_text(p.key_averages().table(sort_by=sort, row_limit=25))
        return {"shape": prof["shape"], "mode": mode, "sessions": s, "tokens_each": t,
                "cached": cached, "table": name, **profile_summary(p, n)}

    return [Item("setup " + prof["shape"], setup, prof["setup_s"]),
            Item(f"profile graphs {s}x{t}", lambda: one("graphs"), needs="setup " + prof["shape"]),
            Item(f"profile flex {s}x{t}", lambda: one("flex"), needs="setup " + prof["shape"])]


# ---------------------------------------------------------------- the grid (CLI)


def main(argv=None) -> int:
    from specedge import logs

    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="tiny", choices=SHAPES + tuple(HYBRID),
                   help="hybrid-tiny: a Qwen3.5-like hybrid (gated delta rule and attention)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sessions", type=int, nargs="*", default=list(SESSIONS))
    p.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    p.add_argument("--cached", type=int, default=None,
                   help="cached tokens per session (default: 256 for tiny, else 512)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per cell (median)")
    p.add_argument("--modes", nargs="*", default=None, choices=sorted(MODES),
                   help="packed-forward variants to time (default: sdpa on the CPU; sdpa, flex "
                        "and graphs on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting cells after this many seconds (the rest: skipped lines)")
    p.add_argument("--out", default=None, help="default bench/results/kernels-<shape>-<device>")
    a = p.parse_args(argv)
    logs.configure("warning")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    cached = a.cached or CACHED.get(a.shape, 512)
    out = Path(a.out or f"bench/results/kernels-{a.shape}-{torch.device(a.device).type}")
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "results.jsonl", echo=False)
    budget = Budget(a.budget_s if a.budget_s is not None else float("inf"))
    model = random_model(a.shape, dtype, a.device)
    cuda = torch.device(a.device).type == "cuda"
    modes = a.modes or (["sdpa", "flex", "graphs"] if cuda else ["sdpa"])
    kv = int(1.25 * max(a.sessions) * (cached + max(a.tokens))) + 1024
    runners = {m: make_runner(model, m, kv, journal, a.shape) for m in modes}
    rows: list[dict] = []
    cells = [(s, t) for s in a.sessions for t in a.tokens]
    t_start = time.time()

    def measure(s: int, t: int) -> dict:
        row = {"shape": a.shape, "device": device_name(a.device), "dtype": a.dtype,
               **cell(model, runners, a.device, s, t, cached, a.reps, seed=s * 100 + t)}
        rows.append(row)
        return row

    run_items(journal, budget, [Item(f"{s}x{t}", lambda s=s, t=t: measure(s, t), 0.0)
                                for s, t in cells])
    result = {"settings": vars(a) | {"cached": cached, "wall_s": round(time.time() - t_start, 1),
                                     "torch": torch.__version__},
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    if not rows:
        print("no cell measured", file=sys.stderr)
        return 1
    cols = (["sessions", "tokens_each"] + [f"packed_{m}_ms" for m in modes]
            + ["dense_ms", "flat_ms"] + [f"{m}_x_dense" for m in modes] + ["packed_x_flat"])
    if "packed_recurrent_share" in rows[0]:
        cols += ["packed_recurrent_share", "dense_recurrent_share"]
    table = (f"# bench.kernels: {a.shape} on {rows[0]['device']} ({a.dtype}, {cached} cached "
             f"tokens, median of {a.reps}; packed: {', '.join(modes)})\n\n"
             + markdown_table(rows, cols) + "\n")
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out}/results.jsonl, results.json and table.md", file=sys.stderr)
    return 0 if len(rows) == len(cells) else 1


if __name__ == "__main__":
    sys.exit(main())
