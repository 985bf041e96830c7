"""The SpecEdge configurations: edge sessions in this process (on the edge cores, sharing one
draft model, each with its own draft KV) against a verifier process on its own cores.

Emulating N edge devices on one core: each session drafts in its own thread and their draft
forwards are packed together when they coincide (specedge.edge.coalesce), so N edges draft in
about the time one takes, as N devices would; without it they would queue for the core and
reach the verifier one after another, which no real fleet of edges does."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from schemas import Sampling
from specedge import broker
from specedge.config import SuffixConfig, TreeShape
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.drafter import Drafter
from specedge.edge.proactive import Mode
from specedge.edge.session import EdgeSession, SessionParams, SessionResult
from specedge.edge.suffix import SuffixIndex
from specedge.edge.suffixdraft import SuffixDrafter, SuffixSource
from specedge.execution import PackedRunner


def record(q: dict, r: SessionResult) -> dict:
    judged = [x for x in r.rounds if x.hit is not None]
    return {"category": q["category"], "tokens": len(r.token_ids), "rounds": len(r.rounds),
            "accepted": sum(x.accepted for x in r.rounds),
            "drafted": sum(x.depth for x in r.rounds), "itl": r.itl, "ttft_s": r.ttft_s,
            "hits": sum(bool(x.hit) for x in judged), "judged": len(judged),
            "draft_s": sum(x.draft_s for x in r.rounds),
            "nodes": sum(x.nodes for x in r.rounds), "token_ids": r.token_ids,
            "suffix_nodes": sum(x.suffix_nodes for x in r.rounds),
            "suffix_accepted": sum(x.suffix_accepted for x in r.rounds)}


async def run_edges(url: str, runner: PackedRunner | CoalescingRunner, jobs: list[tuple[dict, list[int]]],
                    edges: int, *, sampling: Sampling, max_new_tokens: int,
                    eos: tuple[int, ...], shape: TreeShape, proactive: Mode, adaptive: bool,
                    rtt_ms: float, seed0: int = 0, progress=None,
                    logprobs: int = -1, suffix: str = "",
                    min_match: int = SuffixConfig().min_match,
                    corpus: SuffixIndex | None = None) -> list[dict]:
    """`edges` sessions at a time, each edge taking the next prompt when its session ends.
    suffix "alone": no draft model, trees from suffix matches (the runner only says the
    vocabulary); "merged": suffix branches of at least `min_match` join the model's trees.
    Each session drafts from its own tokens (no history across prompts), "alone" also from
    `corpus`."""
    ex = ThreadPoolExecutor(edges, thread_name_prefix="draft")
    nc = await broker.connect(url, "bench-edge")
    js = nc.jetstream()
    queue = list(enumerate(jobs))
    out: list[tuple[int, dict]] = []

    async def edge_loop() -> None:
        while queue:
            i, (q, ids) = queue.pop(0)
            p = SessionParams(prompt_ids=ids, max_new_tokens=max_new_tokens, sampling=sampling,
                              seed=seed0 + i, eos_ids=eos, shape=shape, proactive=proactive,
                              adaptive=adaptive, emulate_rtt_ms=rtt_ms, verdict_timeout_s=120,
                              logprobs=logprobs,
                              suffix=SuffixConfig(min_match if suffix == "merged" else 0))
            src = SuffixSource(min_match=1 if suffix == "alone" else max(1, min_match),
                               corpus=corpus if suffix == "alone" else None)
            drafter = (SuffixDrafter(src, runner.vocab_size) if suffix == "alone"
                       else Drafter(runner))
            res = await EdgeSession(nc, js, drafter, ex, p, suffix=src if suffix else None).run()
            out.append((i, record(q, res)))
            if progress:
                progress.update()

    try:
        await asyncio.gather(*(edge_loop() for _ in range(edges)))
    finally:
        ex.shutdown()
        await nc.close()
    return [r for _, r in sorted(out, key=lambda x: x[0])]
