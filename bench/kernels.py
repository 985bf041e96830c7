"""python -m bench.kernels [--device cpu|cuda] [--shape tiny|0.5b|1.5b|7b] [--out DIR]: the
verifier's packed forward against the same tokens as a padded dense batch through stock
transformers (a KV cache per row, the cached length of every row the same) and against the
weights alone (every token in one row, no cache), for sessions x new tokens per session over
a cached context. Random weights of the shape's real config (`synthetic:<shape>`: tiny is
hidden 256, 4 layers, the real vocabulary); every forward timed with device
synchronisation, median of --reps. Writes DIR/results.json (one row per cell) and DIR/table.md.

Packed: each session's new tokens are a draft tree (the root, which the cache lacks, plus
tokens-1 nodes) hanging off its cached context in the KV pool, as the verifier runs them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

from bench.stack import markdown_table
from specedge.devices import device_name, synchronize
from specedge.execution import PackedRunner, Segment
from specedge.execution.tree import depths_of
from specedge.synthetic import build

SHAPES = ("tiny", "0.5b", "1.5b", "7b")  # the vendored Qwen2.5 configs (specedge.synthetic)
CACHED = {"tiny": 256}  # cached tokens per session; 512 for the others
SESSIONS = (1, 4, 16, 64)
TOKENS = (1, 4, 8, 16)


def random_model(shape: str, dtype: torch.dtype, device: str):
    """Random weights of the shape's real config (deterministic, built on the device)."""
    return build(f"synthetic:{shape}", dtype=dtype, device=device)


def tree_parents(n: int) -> list[int]:
    """A bushy tree of n nodes (each node's parent about half-way up), like a draft tree."""
    return [0 if i < 3 else i // 2 for i in range(1, n + 1)]


def _cache_kwarg(model) -> str:
    """transformers renamed past_key_values to cache (5.x); take whichever forward has."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _time(fn, device: str, reps: int, setup=None) -> float:
    """Median milliseconds of fn() over reps, after one warm-up; setup() runs untimed."""
    out = []
    for i in range(reps + 1):
        if setup:
            setup()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i:
            out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


# How the packed forward runs: `sdpa` and `flex` eagerly (the yardstick of one attention call
# per layer), `graphs` replaying CUDA graphs of the flex path (CUDA only).
MODES = {"sdpa": ("sdpa", False), "flex": ("flex", False), "graphs": ("flex", True)}


def packed_ms(runner: PackedRunner, device: str, ctx: torch.Tensor, new: torch.Tensor,
              reps: int) -> float:
    """Median ms of one forward of every session's tree over its cached context."""
    sessions, cached = ctx.shape
    tokens = new.shape[1]
    seqs = [runner.new_seq() for _ in range(sessions)]
    for a in range(0, sessions, 16):
        runner.forward([Segment.chain(s, ctx[i, :-1].tolist())
                        for i, s in zip(range(a, a + 16), seqs[a : a + 16], strict=False)])
    parents = tree_parents(tokens - 1)
    depths = depths_of(parents)
    segs = [Segment.tree(s, [int(ctx[i, -1])], new[i, 1:].tolist(), parents, depths)
            for i, s in enumerate(seqs)]

    def rewind() -> None:
        for s in seqs:
            s.truncate(cached - 1)

    try:
        return _time(lambda: runner.forward(segs), device, reps, rewind)
    finally:
        for s in seqs:
            s.free()


@torch.no_grad()
def cell(model, runners: dict[str, PackedRunner], device: str, sessions: int, tokens: int,
         cached: int, reps: int, seed: int) -> dict:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(0, vocab, (sessions, cached), generator=g)
    new = torch.randint(0, vocab, (sessions, tokens), generator=g)
    row: dict = {"sessions": sessions, "tokens_each": tokens, "cached": cached}
    for mode, runner in runners.items():
        row[f"packed_{mode}_ms"] = round(packed_ms(runner, device, ctx, new, reps), 3)

    # dense: stock transformers, a KV cache of `cached` tokens per row, one forward of T tokens
    arg = _cache_kwarg(model)
    ids = ctx.to(device)
    step = new.to(device)
    mask = torch.ones(sessions, cached + tokens, dtype=torch.long, device=device)
    state: dict = {}

    def prefill() -> None:
        state["cache"] = DynamicCache(config=model.config)
        model(input_ids=ids, use_cache=True, **{arg: state["cache"]})

    def dense() -> None:
        model(input_ids=step, attention_mask=mask, use_cache=True, **{arg: state["cache"]})

    row["dense_ms"] = round(_time(dense, device, reps, prefill), 3)
    state.clear()
    flat_ids = step.reshape(1, -1)
    row["flat_ms"] = round(_time(lambda: model(input_ids=flat_ids, use_cache=False), device,
                                 reps), 3)
    best = min(row[f"packed_{m}_ms"] for m in runners)
    row["packed_ms"] = best  # the fastest way this device runs it
    row["packed_x_dense"] = round(best / row["dense_ms"], 3)
    row["packed_x_flat"] = round(best / row["flat_ms"], 3)
    for mode in runners:
        row[f"{mode}_x_dense"] = round(row[f"packed_{mode}_ms"] / row["dense_ms"], 3)
    return row


def main(argv=None) -> int:
    from specedge import logs

    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="tiny", choices=SHAPES)
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
    p.add_argument("--out", default=None, help="default bench/results/kernels-<shape>-<device>")
    a = p.parse_args(argv)
    logs.configure("warning")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    cached = a.cached or CACHED.get(a.shape, 512)
    model = random_model(a.shape, dtype, a.device)
    cuda = torch.device(a.device).type == "cuda"
    modes = a.modes or (["sdpa", "flex", "graphs"] if cuda else ["sdpa"])
    budget = int(1.25 * max(a.sessions) * (cached + max(a.tokens))) + 1024
    runners = {}
    for mode in modes:
        attention, graphs = MODES[mode]
        runners[mode] = PackedRunner(model, attention=attention, cuda_graphs=graphs,
                                     kv_budget_tokens=budget)
    out = Path(a.out or f"bench/results/kernels-{a.shape}-{torch.device(a.device).type}")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cells = [(s, t) for s in a.sessions for t in a.tokens]
    t_start = time.time()
    for s, t in tqdm(cells, desc=f"kernels {a.shape} {a.device}", file=sys.stderr):
        row = cell(model, runners, a.device, s, t, cached, a.reps, seed=s * 100 + t)
        rows.append({"shape": a.shape, "device": device_name(a.device), "dtype": a.dtype,
                     **row})
    result = {"settings": vars(a) | {"cached": cached, "wall_s": round(time.time() - t_start, 1),
                                     "torch": torch.__version__},
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    cols = (["sessions", "tokens_each"] + [f"packed_{m}_ms" for m in modes]
            + ["dense_ms", "flat_ms"] + [f"{m}_x_dense" for m in modes] + ["packed_x_flat"])
    table = (f"# bench.kernels: {a.shape} on {rows[0]['device']} ({a.dtype}, {cached} cached "
             f"tokens, median of {a.reps}; packed: {', '.join(modes)})\n\n"
             + markdown_table(rows, cols) + "\n")
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out}/results.json and table.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
