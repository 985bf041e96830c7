"""python -m bench.hostpath: the host work around a forward, with the model taken out.

Times, per call, (1) `ancestor_mask` of a 9-node tree, (2) the host side of a verifier batch
of 32 trees x 9 nodes: building the segments (`Segment.tree`) and the plan (`build_plan`),
and (3) a draft step with a model whose forward returns at once (`InstantLM`), through the
runner alone and through the coalescer with one session: everything a step costs besides
the model. Each figure is measured on this tree and, with --base, on another checkout (the
same measuring code run against that checkout's modules in a subprocess), so before and
after come from one run. Writes bench/results/hostpath.json and prints a table."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TREES, NODES = 32, 9


class InstantLM(torch.nn.Module):
    """Stands in for the draft model inside a real runner: returns logits of the right shape
    (the rows the runner asks for) from a fixed random table, doing no model work."""

    def __init__(self, vocab: int, rows: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(1, rows, vocab, generator=g)

    def forward(self, input_ids: torch.Tensor, logits_to_keep=None, **_) -> SimpleNamespace:
        n = input_ids.shape[1] if logits_to_keep is None else int(logits_to_keep.numel())
        return SimpleNamespace(logits=self.table[:, :n])


def _per_call_ms(fn, calls: int, repeats: int = 9) -> float:
    """The best of `repeats` runs of the mean time of one call, in ms (the CPU is shared
    with other processes: the best run is the one least interrupted)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    return min(runs)


def _trees(rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(i) for i in range(1, NODES + 1)] for _ in range(TREES)]


def measure_masks() -> float:
    from specedge.execution.tree import ancestor_mask

    trees = _trees(random.Random(0))
    return _per_call_ms(lambda: [ancestor_mask(p, include_root=False) for p in trees], 50) / TREES


def measure_batch() -> dict:
    """A verifier batch's host side: 32 sessions, each a one-token chain (the root) and a
    9-node tree on a cached prefix of 40-100 tokens."""
    from specedge.execution import KVPool, Segment
    from specedge.execution.plan import build_plan
    from specedge.execution.tree import depths_of

    rng = random.Random(1)
    pool = KVPool(2, 2, 16, torch.float32, "cpu", block_size=16, initial_tokens=8192)
    seqs, trees = [], _trees(rng)
    for _ in range(TREES):
        s = pool.new_seq()
        n = rng.randint(40, 100)
        s.prepare_write(0, n + 1 + NODES)
        s.length = n
        seqs.append(s)
    depths = [depths_of(p) for p in trees]
    toks = [[rng.randrange(512) for _ in range(NODES)] for _ in trees]

    def segments():
        return [Segment.tree(s, [7], t, p, d) for s, t, p, d in zip(seqs, toks, trees, depths,
                                                                     strict=True)]

    segs = segments()
    cpu = torch.device("cpu")
    return {"segments_ms": _per_call_ms(segments, 20),
            "build_plan_ms": _per_call_ms(lambda: build_plan(segs, pool, cpu), 20)}


def measure_draft_step(vocab: int) -> dict:
    """A draft step's cost with an instant model: a real PackedRunner (built on a tiny real
    model, whose forward is then swapped for InstantLM), a real Drafter and TreeBuilder, the
    default tree shape; rounds of catch-up + node steps, then a rollback to the prefix."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from specedge.config import TreeShape
    from specedge.edge.coalesce import CoalescingRunner
    from specedge.edge.drafter import Drafter, TreeBuilder
    from specedge.execution import PackedRunner

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    runner = PackedRunner(Qwen2ForCausalLM(cfg).eval(), attention="sdpa")
    runner.model = InstantLM(vocab)
    shape = TreeShape()
    committed = list(range(1, 50))
    out = {}
    for name, r in (("direct", runner), ("coalesced", CoalescingRunner(runner))):
        d = Drafter(r)
        d.catch_up(committed[:-1])
        steps = [0]

        def one_round(d=d, steps=steps):
            b = TreeBuilder(d, committed, shape)
            tree = b.run()
            d.rollback(tree, [])
            steps[0] += b.steps

        one_round()
        rounds = 40
        steps[0] = 0
        ms = _per_call_ms(one_round, rounds)
        out[f"{name}_step_ms"] = ms * rounds * 9 / steps[0]
        out["steps_per_round"] = steps[0] / (rounds * 9)
        d.close()
    return out


def measure(vocab: int) -> dict:
    torch.set_num_threads(1)
    return {"ancestor_mask_ms_per_tree": measure_masks(), **measure_batch(),
            **measure_draft_step(vocab)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostpath", description=__doc__)
    p.add_argument("--base", help="another checkout of the project, measured the same way")
    p.add_argument("--vocab", type=int, default=512, help="the instant draft model's vocabulary")
    p.add_argument("--out", default="bench/results/hostpath.json")
    p.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure_only:  # the subprocess: this tree's modules come first on sys.path
        print(json.dumps(measure(a.vocab)))
        return 0
    trees = {"after": os.getcwd()} | ({"before": a.base} if a.base else {})
    res = {}
    for label, root in sorted(trees.items(), reverse=True):  # before first
        env = dict(os.environ, PYTHONPATH=root)
        # -P: not this file's folder first on sys.path (bench/kernels.py would shadow a package)
        out = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--measure-only",
                              "--vocab", str(a.vocab)], cwd=root, env=env, check=True,
                             capture_output=True, text=True).stdout
        res[label] = json.loads(out.strip().splitlines()[-1])
    from bench.machine import machine

    def commit(root: str) -> str:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": machine("cpu", "float32"),
                                       "settings": {"trees": TREES, "nodes": NODES,
                                                    "vocab": a.vocab, "threads": 1},
                                       "trees": {k: [v, commit(v)] for k, v in trees.items()},
                                       "results": res}, indent=1))
    labels = list(res)
    rows = [("ancestor_mask, ms per 9-node tree", "ancestor_mask_ms_per_tree"),
            (f"Segment.tree x {TREES}, ms", "segments_ms"),
            (f"build_plan of {TREES} trees, ms", "build_plan_ms"),
            ("draft step, runner alone, ms", "direct_step_ms"),
            ("draft step, coalescer (one session), ms", "coalesced_step_ms")]
    md = ["| host work (instant model) | " + " | ".join(labels) + " |",
          "|---" * (len(labels) + 1) + "|"]
    md += [f"| {text} | " + " | ".join(f"{res[x][key]:.3f}" for x in labels) + " |"
           for text, key in rows]
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
