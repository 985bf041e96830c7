"""python -m bench.pick [--base DIR] [--rows 288] [--vocab 151936] [--reps 5] [--out FILE]:
the time of one `sampling.pick` call for every row of a verification batch at T > 0 (CPU,
the machine's threads), median of --reps after a warm-up, for float32 and bf16 logits:

  llm-p0.9       T 0.7, top-p 0.9: LLM-like rows (a few dozen boosted tokens over a Gaussian
                 bulk; most top-p sets hold 1-10 tokens, a few rows thousands)
  llm-p0.9-k50   the same with top-k 50
  llm-T-only     T 0.7 alone: every token of every row races
  flat-p0.9      T 0.7, top-p 0.9 on Gaussian rows: top-p sets of ~10^5 tokens (the worst case)

Each tree is timed in its own fresh process importing `pick` from the tree on its path: this
checkout, and with --base DIR another checkout (e.g. a worktree of the previous commit) run
right before it, with the same script and logits, so the two are comparable and their picks
can be compared row by row. Writes FILE (default bench/results/pick.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CASES = {  # name: (logits kind, top_p, top_k)
    "llm-p0.9": ("llm", 0.9, 0),
    "llm-p0.9-k50": ("llm", 0.9, 50),
    "llm-T-only": ("llm", 1.0, 0),
    "flat-p0.9": ("flat", 0.9, 0),
}
TEMPERATURE = 0.7


def make_logits(kind: str, rows: int, vocab: int) -> torch.Tensor:
    """Deterministic float32 logits [rows, vocab]."""
    g = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(rows, vocab, generator=g)
    x = torch.randn(rows, vocab, generator=g) * 1.5
    spikes = 40
    ids = torch.randint(0, vocab, (rows, spikes), generator=g)
    top = 11 + 8 * torch.rand(rows, 1, generator=g)
    decay = 0.1 + 1.0 * torch.rand(rows, 1, generator=g)
    boost = (top - decay * 3 * torch.arange(spikes)[None] ** 0.7
             + torch.randn(rows, spikes, generator=g))
    return x.scatter_(1, ids, boost)


def top_p_sizes(logits: torch.Tensor, top_p: float) -> list[int]:
    """Tokens in each row's top-p set at TEMPERATURE (a property of the logits)."""
    p = (logits / TEMPERATURE).softmax(-1).sort(-1, descending=True)[0]
    return ((p.cumsum(-1) - p) < top_p).sum(-1).tolist()


def worker(rows: int, vocab: int, reps: int) -> list[dict]:
    """Times the `pick` importable here; one dict per case and dtype, picks included."""
    from specedge.execution.sampling import RowSampling, pick

    out = []
    for name, (kind, top_p, top_k) in CASES.items():
        base = make_logits(kind, rows, vocab)
        rs = RowSampling([TEMPERATURE] * rows, [top_k] * rows, [top_p] * rows,
                         [(7, (0x9E3779B9 * i) & 0xFFFFFFFF) for i in range(rows)])
        for dtype in ("float32", "bfloat16"):
            logits = base.to(getattr(torch, dtype))
            times = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                picks = pick(logits, rs)
                if i:
                    times.append((time.perf_counter() - t0) * 1000)
            out.append({"case": name, "dtype": dtype, "ms": statistics.median(times),
                        "picks": picks.tolist()})
    return out


def run_tree(tree: Path, args) -> list[dict]:
    """worker() in a fresh process with `tree` first on the path (-P: not bench/, whose
    kernels.py would shadow a package transformers probes)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--worker", "--rows", str(args.rows),
           "--vocab", str(args.vocab), "--reps", str(args.reps)]
    res = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="a checkout to time first, for comparison")
    ap.add_argument("--rows", type=int, default=288)  # 32 sessions x 9 tree nodes
    ap.add_argument("--vocab", type=int, default=151936)  # Qwen2.5
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "pick.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rows, args.vocab, args.reps)))
        return
    from bench.stack import markdown_table  # the parent only: a worker runs as a bare file
    base = run_tree(args.base, args) if args.base else None
    new = run_tree(HERE.parent, args)
    sizes = {k: top_p_sizes(make_logits(k, args.rows, args.vocab), 0.9) for k in ("llm", "flat")}
    table = []
    for i, r in enumerate(new):
        row = {"case": r["case"], "dtype": r["dtype"], "ms": r["ms"], "base_ms": None,
               "speedup": None, "same_picks": None}
        if base:
            b = base[i]
            row.update(base_ms=b["ms"], speedup=b["ms"] / r["ms"],
                       same_picks=sum(x == y for x, y in zip(b["picks"], r["picks"],
                                                             strict=True)))
        table.append(row)
    q = {k: {"median": statistics.median(v), "max": max(v),
             "over_64": sum(n > 64 for n in v)} for k, v in sizes.items()}
    result = {"rows": args.rows, "vocab": args.vocab, "reps": args.reps,
              "temperature": TEMPERATURE, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "base": str(args.base) if args.base else None,
              "top_p_0.9_set_sizes": q, "cells": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"pick at {args.rows} rows x {args.vocab} vocab, T {TEMPERATURE}, "
          f"{torch.get_num_threads()} threads, median of {args.reps} (ms); top-p 0.9 set "
          f"sizes {q}")
    print(markdown_table(table, ["case", "dtype", "base_ms", "ms", "speedup", "same_picks"]))


if __name__ == "__main__":
    main()
