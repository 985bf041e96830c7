"""python -m bench.longprompt [--prompt-tokens 3000] [--out DIR]: what a long prompt costs the
other sessions, on each side, with the real pair (or --synthetic), the verifier on its own
cores and the edges on the others (bench/stack.py).

A. Edge: one edge process shares its draft model between requests (as `edge serve` does:
   each session in its own thread, coinciding draft forwards packed). A short request runs
   alone, then again while a long prompt is being prefilled into the draft model in chunks.
   Reported: both times, one chunk's draft forward, and the bound 2 x alone + one chunk.
   The long session is then cancelled; its chunks stop (counted).
B. Verifier: four sessions are generating when a session with the long prompt joins (plain
   decoding: no draft model, so the edge adds nothing); the verifier prefills it in chunks
   packed with the four's trees. Reported: the four's time per round and per token before,
   while it catches up, and after; the verifier's chunk and that chunk's forward cost.

Writes DIR/results.json and DIR/table.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import pair as pairs
from bench.machine import machine
from bench.stack import Stack, markdown_table, pin_edge
from bench.workload import load
from schemas import Sampling
from specedge import broker, logs
from specedge.config import TreeShape
from specedge.devices import synchronize
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.drafter import Drafter
from specedge.edge.proactive import Mode
from specedge.edge.session import EdgeSession, SessionParams
from specedge.edge.text import eos_ids, prompt_ids
from specedge.execution import PackedRunner, Segment
from specedge.execution.costs import forward_costs, knee


def long_prompt(tok, n: int) -> list[int]:
    """About n tokens of real text: Spec-Bench prompts one after another, chat-templated."""
    text, qs = "", load()
    i = 0
    while len(tok(text)["input_ids"]) < n:
        text += qs[i % len(qs)]["prompt"] + "\n\n"
        i += 1
    return prompt_ids(tok, text, True)[-n:]


class Edge:
    """Sessions sharing one draft model, each in its own thread (the `edge serve` way)."""

    def __init__(self, url: str, draft, eos, chunk: int, rtt_ms: float):
        self.url, self.eos, self.chunk, self.rtt_ms = url, eos, chunk, rtt_ms
        self.runner = CoalescingRunner(PackedRunner(draft))
        self.ex = ThreadPoolExecutor(8, thread_name_prefix="draft")

    async def __aenter__(self):
        self.nc = await broker.connect(self.url, "bench-longprompt")
        return self

    async def __aexit__(self, *exc):
        await self.nc.close()
        self.ex.shutdown(wait=True)

    def session(self, ids: list[int], new: int, shape: TreeShape | None = None,
                on_tokens=None) -> EdgeSession:
        p = SessionParams(prompt_ids=ids, max_new_tokens=new, sampling=Sampling(),
                          eos_ids=(), shape=shape or TreeShape(), proactive=Mode.SINGLE,
                          emulate_rtt_ms=self.rtt_ms, verdict_timeout_s=600,
                          prefill_chunk=self.chunk, adaptive=False)
        return EdgeSession(self.nc, self.nc.jetstream(), Drafter(self.runner), self.ex, p,
                           on_tokens=on_tokens)


def chunk_forward_ms(runner: PackedRunner, chunk: int, context: int = 512) -> float:
    """One forward of `chunk` prompt tokens over `context` cached ones (best of three)."""
    seq = runner.new_seq()
    try:
        runner.forward([Segment.chain(seq, [7] * context)])
        best = float("inf")
        for _ in range(3):
            seq.truncate(context)
            synchronize(runner.device)
            t0 = time.perf_counter()
            runner.forward([Segment.chain(seq, [9] * chunk)])
            synchronize(runner.device)
            best = min(best, time.perf_counter() - t0)
    finally:
        seq.free()
    return 1000 * best


async def edge_part(a, url: str, draft, tok, short: list[int], long: list[int]) -> dict:
    runner = PackedRunner(draft)
    costs = forward_costs(runner, stop_ratio=2.0)
    chunk = a.edge_chunk or max(16, knee(costs))
    chunk_ms = chunk_forward_ms(runner, chunk)
    eos = eos_ids(tok, draft.config, getattr(draft, "generation_config", None))
    async with Edge(url, draft, eos, chunk, a.rtt_ms) as edge:
        await edge.session(short, 4).run()  # warm-up, excluded
        t0 = time.perf_counter()
        alone = await edge.session(short, a.short_tokens).run()
        alone_s = time.perf_counter() - t0
        forwards0 = edge.runner.forwards
        big = asyncio.create_task(edge.session(long, 8).run())
        for _ in range(60_000):  # until its prefill is under way
            if edge.runner.forwards >= forwards0 + 2:
                break
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        shared = await edge.session(short, a.short_tokens).run()
        shared_s = time.perf_counter() - t0
        still_prefilling = not big.done()
        big.cancel()
        try:
            await big
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.5)
        after_cancel = edge.runner.forwards
        await asyncio.sleep(2.0)
        stopped = edge.runner.forwards == after_cancel
    bound = 2 * alone_s + chunk_ms / 1000
    return {"chunk": chunk, "chunk_forward_ms": round(chunk_ms, 1),
            "draft_costs_ms": {n: round(c * 1000, 1) for n, c in costs.items()},
            "short_tokens": len(alone.token_ids), "short_alone_s": round(alone_s, 3),
            "short_beside_long_s": round(shared_s, 3), "bound_s": round(bound, 3),
            "within_bound": shared_s <= bound, "same_output": alone.token_ids == shared.token_ids,
            "long_still_prefilling": still_prefilling, "long_stopped_on_cancel": stopped,
            "x_alone": round(shared_s / alone_s, 3)}


async def verifier_part(a, url: str, draft, tok, jobs: list[list[int]], long: list[int]) -> dict:
    eos = eos_ids(tok, draft.config, getattr(draft, "generation_config", None))
    stamps: list[list[tuple[float, int]]] = [[] for _ in jobs]
    long_stamps: list[float] = []
    async with Edge(url, draft, eos, 512, a.rtt_ms) as edge:
        await edge.session(jobs[0], 4).run()  # warm-up, excluded
        running = [asyncio.create_task(edge.session(
            ids, a.running_tokens, on_tokens=lambda t, k=k: stamps[k].append(
                (time.perf_counter(), len(t)))).run()) for k, ids in enumerate(jobs)]
        await asyncio.sleep(a.join_after_s)
        t_join = time.perf_counter()
        joined = edge.session(long, 4, shape=TreeShape(budget=0),
                              on_tokens=lambda t: long_stamps.append(time.perf_counter()))
        await joined.run()
        results = await asyncio.gather(*running)
    t_caught = long_stamps[0]
    rounds = {"before": [], "during": [], "after": []}
    for st in stamps:
        for (t1, _), (t2, n) in zip(st, st[1:], strict=False):
            phase = "before" if t2 < t_join else "during" if t1 >= t_join and t2 <= t_caught \
                else "after" if t1 >= t_caught else None
            if phase:
                rounds[phase].append((t2 - t1, n))
    out = {"long_prompt_tokens": len(long), "catch_up_s": round(t_caught - t_join, 2),
           "running_sessions": len(jobs),
           "running_tokens": [len(r.token_ids) for r in results]}
    for phase, rs in rounds.items():
        out[f"rounds_{phase}"] = len(rs)
        out[f"round_ms_{phase}"] = (round(1000 * statistics.mean(d for d, _ in rs), 1)
                                    if rs else None)
        out[f"itl_ms_{phase}"] = (round(1000 * sum(d for d, _ in rs) / sum(n for _, n in rs), 1)
                                  if rs else None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.longprompt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    pairs.add_args(p)
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--short-tokens", type=int, default=32)
    p.add_argument("--running-tokens", type=int, default=400,
                   help="tokens the four running sessions generate (enough to outlast the join)")
    p.add_argument("--join-after-s", type=float, default=8.0)
    p.add_argument("--edge-chunk", type=int, default=0,
                   help="the edge's prefill chunk (0: its draft model's knee, as edge serve)")
    p.add_argument("--verifier-chunk", type=int, default=0,
                   help="the verifier's --prefill-chunk (0: measured by it at start-up)")
    p.add_argument("--rtt-ms", type=float, default=15.0)
    p.add_argument("--parts", nargs="*", default=["edge", "verifier"],
                   choices=["edge", "verifier"])
    p.add_argument("--out", default="bench/results/longprompt")
    a = p.parse_args(argv)
    logs.configure("warning")
    vcores, ecores = pin_edge()
    pair, draft, tok = pairs.resolve(a)
    qs = load(per_category=1)
    jobs = [prompt_ids(tok, q["prompt"], True) for q in qs[:4]]
    long = long_prompt(tok, a.prompt_tokens)
    stack = Stack(vcores, ["--prefill-chunk", str(a.verifier_chunk), "--max-batch", "8"],
                  model=pair.target, device=pair.device, dtype=pair.dtype).start()
    res: dict = {"machine": machine(pair.device, pair.dtype), "models": pair.record(),
                 "settings": {k: v for k, v in vars(a).items()}}
    try:
        if "edge" in a.parts:
            res["edge"] = asyncio.run(edge_part(a, stack.url, draft, tok, jobs[1], long))
        if "verifier" in a.parts:
            res["verifier"] = asyncio.run(verifier_part(a, stack.url, draft, tok, jobs, long))
        cal = stack._log_lines('"forward cost calibrated"')
        if cal:
            c = cal[-1]
            chunk = c.get("prefill_chunk")
            costs = {int(k): v for k, v in c.get("costs_ms", {}).items()}
            res.setdefault("verifier", {}).update({
                "verifier_chunk": chunk, "verifier_costs_ms": costs,
                "chunk_forward_ms": costs.get(chunk), "one_token_forward_ms": costs.get(1)})
    finally:
        stack.stop()
    v = res.get("verifier", {})
    if "round_ms_before" in v and v.get("round_ms_during") and v.get("chunk_forward_ms"):
        v["extra_per_round_ms"] = round(v["round_ms_during"] - v["round_ms_before"], 1)
        v["within_one_chunk"] = v["extra_per_round_ms"] <= v["chunk_forward_ms"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    lines = [f"# bench.longprompt ({pair.target} / {pair.draft}, {pair.device}, {pair.dtype})"]
    if "edge" in res:
        e = res["edge"]
        lines += ["", "## A. A short request beside a long prompt's prefill, same edge", "",
                  markdown_table([e], ["chunk", "chunk_forward_ms", "short_tokens",
                                       "short_alone_s", "short_beside_long_s", "bound_s",
                                       "within_bound", "same_output",
                                       "long_stopped_on_cancel"])]
    if "round_ms_before" in v:
        lines += ["", "## B. Four sessions while a long prompt joins the verifier", "",
                  markdown_table([v], ["long_prompt_tokens", "verifier_chunk",
                                       "chunk_forward_ms", "catch_up_s", "round_ms_before",
                                       "round_ms_during", "round_ms_after", "itl_ms_before",
                                       "itl_ms_during", "itl_ms_after", "extra_per_round_ms",
                                       "within_one_chunk"])]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
