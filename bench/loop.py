"""python -m bench.loop: one edge, one verifier, the real pair, Spec-Bench prompts, proactive
drafting off (this is the plain round, see bench.proactive for the overlap). Measures
tokens per round, acceptance and one round's time split (drafting, broker, verification) per
category and per tree shape. Writes results.json and a Markdown table.

The verifier and the edge get separate cores (the verifier process is pinned to the first
half, this process to the rest), as they would be separate machines in deployment."""

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
from bench.stack import Stack, markdown_table, pin_edge
from bench.workload import load
from schemas import Sampling
from specedge import broker, logs
from specedge.config import TreeShape
from specedge.edge.drafter import Drafter
from specedge.edge.proactive import Mode
from specedge.edge.session import EdgeSession, SessionParams
from specedge.edge.text import eos_ids, prompt_ids
from specedge.execution import PackedRunner

SHAPES = {
    "chain4": TreeShape.chain(4),
    "chain6": TreeShape.chain(6),
    "tree8": TreeShape(budget=8, depth=6, width=2, topk=2),
    "tree12": TreeShape(budget=12, depth=6, width=3, topk=3),
    "tree16": TreeShape(budget=16, depth=7, width=4, topk=3),
    # wide: more nodes per draft forward, fewer sequential forwards (cheap on AMX)
    "wide8": TreeShape(budget=8, depth=4, width=4, topk=2),
    "wide12": TreeShape(budget=12, depth=5, width=4, topk=3),
}


async def run(a, url, draft, tok) -> list[dict]:
    qs = load(per_category=a.per_category, categories=a.categories)
    eos = eos_ids(tok, draft.config, draft.generation_config)
    runner = PackedRunner(draft)
    ex = ThreadPoolExecutor(1)
    nc = await broker.connect(url, "bench-loop")
    js = nc.jetstream()
    rows = []
    try:
        # warm-up, excluded
        await EdgeSession(nc, js, Drafter(runner), ex, SessionParams(
            prompt_ids=prompt_ids(tok, "hi", True), max_new_tokens=8, eos_ids=eos,
            proactive=Mode.OFF)).run()
        bar = tqdm(total=len(a.shapes) * len(qs), desc="sessions", file=sys.stderr)
        for name in a.shapes:
            for q in qs:
                p = SessionParams(prompt_ids=prompt_ids(tok, q["prompt"], True),
                                  max_new_tokens=a.max_new_tokens, sampling=Sampling(),
                                  eos_ids=eos, shape=SHAPES[name], proactive=Mode.OFF)
                res = await EdgeSession(nc, js, Drafter(runner), ex, p).run()
                s = res.summary()
                n = len(res.rounds)
                steady = res.rounds[1:] or res.rounds
                rows.append({
                    "shape": name, "category": q["category"], "question_id": q["question_id"],
                    "tokens": len(res.token_ids), "rounds": n,
                    "tokens_per_round": s["tokens_per_round"], "acceptance": s["acceptance"],
                    # steady state: round 0 carries the prompt's prefill on both sides
                    "draft_ms": 1000 * statistics.mean(r.draft_s for r in steady),
                    "verify_ms": 1000 * statistics.mean(r.verify_s for r in steady),
                    "broker_ms": 1000 * statistics.mean(r.wait_s - r.verify_s for r in steady),
                    "prefill_verify_ms": 1000 * res.rounds[0].verify_s,
                    "round_ms": 1000 * (res.wall_s - res.ttft_s) / max(n - 1, 1),
                    "tokens_per_s": len(res.token_ids) / res.wall_s,
                    "itl_p50_ms": 1000 * s["itl_s"],
                })
                bar.update()
        bar.close()
    finally:
        ex.shutdown()
        await nc.close()
    return rows


def aggregate(rows: list[dict], key: str) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r[key]) if key != "shape" else (r["shape"],), []).append(r)
    out = []
    for k, rs in groups.items():
        toks, rounds = sum(r["tokens"] for r in rs), sum(r["rounds"] for r in rs)
        agg = {"shape": k[0]} | ({key: k[1]} if key != "shape" else {})
        agg |= {"sessions": len(rs), "tokens_per_round": toks / rounds,
                "acceptance": statistics.mean(r["acceptance"] for r in rs)}
        for f in ("draft_ms", "broker_ms", "verify_ms", "round_ms", "tokens_per_s", "itl_p50_ms"):
            agg[f] = statistics.mean(r[f] for r in rs)
        out.append(agg)
    return out


def table(rows: list[dict], first: list[str]) -> str:
    return markdown_table(rows, first + ["tokens_per_round", "acceptance", "draft_ms", "broker_ms",
                                         "verify_ms", "round_ms", "tokens_per_s", "itl_p50_ms"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__)
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--categories", nargs="*", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--shapes", nargs="*", default=["chain4", "tree8", "tree16"],
                   choices=sorted(SHAPES))
    p.add_argument("--out", default="bench/results/loop")
    pair_mod.add_args(p)
    a = p.parse_args(argv)
    logs.configure("warning")
    vcores, ecores = pin_edge()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pair, draft, tok = pair_mod.resolve(a)
    stack = Stack(vcores, model=pair.target, device=pair.device, dtype=pair.dtype).start()
    try:
        t0 = time.time()
        rows = asyncio.run(run(a, stack.url, draft, tok))
    finally:
        stack.stop()
    by_shape, by_cat = aggregate(rows, "shape"), aggregate(rows, "category")
    result = {
        "machine": machine(pair.device, pair.dtype, vcores, ecores), "models": pair.record(),
        "settings": vars(a) | {"target": pair.target, "draft": pair.draft,
                               "wall_s": time.time() - t0},
        "rows": rows, "by_shape": by_shape, "by_category": by_cat,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = ("## By tree shape\n\n" + table(by_shape, ["shape"]) + "\n\n## By category\n\n"
          + table(by_cat, ["shape", "category"]) + "\n")
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
