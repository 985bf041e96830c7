"""python -m bench.proactive: proactive drafting off vs single vs multi, with the real pair, an
emulated network round trip, and 1 and 4 concurrent edges. Writes results.json and table.md.

Per configuration: inter-token latency p50/p90, tokens per round, proactive hit rate, drafting
time hidden behind verification, and server busy time per generated token (from the verifier's
own counters; a fresh verifier per configuration)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from bench import pair as pair_mod
from bench.machine import machine
from bench.stack import Stack, delta, markdown_table, pin_edge
from bench.workload import load
from specedge import broker, logs
from specedge.config import TreeShape
from specedge.edge.drafter import Drafter
from specedge.edge.proactive import Mode
from specedge.edge.session import EdgeSession, SessionParams
from specedge.edge.text import eos_ids, prompt_ids
from specedge.execution import PackedRunner


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else 0.0


async def run_config(url, draft, tok, prompts, edges, mode, a, bar) -> list:
    """`edges` sessions at a time (each its own draft KV, sharing the edge cores), until all
    prompts are done."""
    eos = eos_ids(tok, draft.config, draft.generation_config)
    runner = PackedRunner(draft)
    ex = ThreadPoolExecutor(1)
    nc = await broker.connect(url, "bench-edge")
    js = nc.jetstream()
    queue = list(prompts)
    results = []

    async def edge_loop():
        while queue:
            q = queue.pop(0)
            p = SessionParams(prompt_ids=prompt_ids(tok, q["prompt"], True),
                              max_new_tokens=a.max_new_tokens, eos_ids=eos,
                              shape=TreeShape(a.budget, a.depth, a.width, a.topk),
                              proactive=mode, emulate_rtt_ms=a.rtt_ms)
            res = await EdgeSession(nc, js, Drafter(runner), ex, p).run()
            results.append((q, res))
            bar.update()

    try:
        await asyncio.gather(*(edge_loop() for _ in range(edges)))
    finally:
        ex.shutdown()
        await nc.close()
    return results


def summarize(results, vstats, edges, mode) -> dict:
    itl = [x for _, r in results for x in r.itl]
    rounds = [rec for _, r in results for rec in r.rounds]
    tokens = sum(len(r.token_ids) for _, r in results)
    judged = [rec for rec in rounds if rec.hit is not None]
    return {
        "edges": edges, "proactive": str(mode), "sessions": len(results), "tokens": tokens,
        "itl_p50_ms": 1000 * pct(itl, 0.5), "itl_p90_ms": 1000 * pct(itl, 0.9),
        "tokens_per_round": tokens / max(1, len(rounds)),
        "hit_rate": (sum(bool(r.hit) for r in judged) / len(judged)) if judged else None,
        "draft_ms_per_round": 1000 * statistics.mean(r.draft_s for r in rounds),
        "hidden_ms_per_round": 1000 * statistics.mean(r.hidden_s for r in rounds),
        "proactive_ms_per_round": 1000 * statistics.mean(r.proactive_s for r in rounds),
        "wait_ms_per_round": 1000 * statistics.mean(r.wait_s for r in rounds),
        "react_ms_max": 1000 * max(r.react_s for r in rounds),
        "ttft_p50_ms": 1000 * pct([r.ttft_s for _, r in results], 0.5),
        "server_busy_ms_per_token": 1000 * vstats.get("busy_s", float("nan")) / max(1, tokens),
        "server_mean_batch": vstats.get("mean_batch"),
    }


def table(rows: list[dict]) -> str:
    return markdown_table(rows, [
        "edges", "proactive", "itl_p50_ms", "itl_p90_ms", "tokens_per_round", "hit_rate",
        "draft_ms_per_round", "hidden_ms_per_round", "wait_ms_per_round",
        "server_busy_ms_per_token", "react_ms_max"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proactive", description=__doc__)
    p.add_argument("--prompts", type=int, default=4, help="Spec-Bench prompts per configuration")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rtt-ms", type=float, default=15.0)
    p.add_argument("--edges", type=int, nargs="*", default=[1, 4])
    p.add_argument("--modes", nargs="*", default=["off", "single", "multi"])
    d = TreeShape()
    p.add_argument("--budget", type=int, default=d.budget)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--topk", type=int, default=d.topk)
    p.add_argument("--out", default="bench/results/proactive")
    pair_mod.add_args(p)
    a = p.parse_args(argv)
    logs.configure("warning")
    vcores, ecores = pin_edge()
    pair, draft, tok = pair_mod.resolve(a)
    qs = load(per_category=1, categories=["coding", "writing", "translation", "qa", "math",
                                          "summarization", "rag", "roleplay"])
    rows, t0 = [], time.time()
    total = sum(max(a.prompts, e) for e in a.edges) * len(a.modes)
    bar = tqdm(total=total, desc="sessions", file=sys.stderr)
    for edges in a.edges:
        prompts = [qs[i % len(qs)] for i in range(max(a.prompts, edges))]
        for mode in a.modes:
            stack = Stack(vcores, model=pair.target, device=pair.device,
                          dtype=pair.dtype).start()
            try:
                # warm-up, excluded: one short session, then a counter snapshot
                warm = argparse.Namespace(**(vars(a) | {"max_new_tokens": 8}))
                asyncio.run(run_config(stack.url, draft, tok, [qs[0]], 1, Mode(mode), warm,
                                       tqdm(disable=True)))
                before = stack.snapshot()
                res = asyncio.run(run_config(stack.url, draft, tok, prompts, edges, Mode(mode), a,
                                             bar))
                vstats = delta(stack.snapshot(), before)
            finally:
                stack.stop()
            rows.append(summarize(res, vstats, edges, mode))
    bar.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(pair.device, pair.dtype, vcores, ecores),
              "models": pair.record(),
              "settings": vars(a) | {"target": pair.target, "draft": pair.draft,
                                     "wall_s": time.time() - t0},
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = table(rows) + "\n"
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
