"""Runs the real stack in-process for tests: a verifier Worker and edge sessions, both
talking to a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

from bench.reference import reference_greedy  # noqa: F401 (re-export)
from schemas import Sampling
from specedge import broker
from specedge.config import TreeShape
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.drafter import Drafter
from specedge.edge.session import EdgeSession, SessionParams
from specedge.execution import PackedRunner
from workers.verifier.leases import lease_owners, wait_balanced  # noqa: F401 (re-export)
from workers.verifier.worker import Worker, WorkerConfig


@contextlib.asynccontextmanager
async def running_worker(model, url: str, **cfg):
    w = Worker(model, url, WorkerConfig(**cfg))
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 30)
    try:
        yield w
    finally:
        w.stop()
        await asyncio.wait_for(task, 30)


async def generate(url: str, draft_model, prompts: list[list[int]], *, max_new_tokens: int = 24,
                   shape: TreeShape | None = None, sampling: Sampling | None = None,
                   seeds: list[int] | None = None, eos_ids: tuple[int, ...] = (),
                   coalesce: bool = False, connect_opts: dict | None = None,
                   sids: list[str] | None = None, return_exceptions: bool = False,
                   vocab_limit: int | None = None, **params):
    """Run one edge session per prompt, all concurrently, sharing one draft model (over one
    connection: with `connect_opts` as one edge user, whose name `sids` must carry; with
    `coalesce`, each session in its own thread, their draft forwards packed together).
    Sessions keep the shape they are given unless adaptive=True (the verifiers' hints)."""
    nc = await broker.connect(url, "test-edge", **(connect_opts or {}))
    js = nc.jetstream()
    runner = PackedRunner(draft_model, vocab_limit=vocab_limit)
    if coalesce:
        runner = CoalescingRunner(runner, window_s=0.005)
    ex = ThreadPoolExecutor(len(prompts) if coalesce else 1)
    try:
        sessions = [
            EdgeSession(nc, js, Drafter(runner), ex, SessionParams(
                prompt_ids=p, max_new_tokens=max_new_tokens, sampling=sampling or Sampling(),
                seed=(seeds[i] if seeds else i), eos_ids=eos_ids, shape=shape or TreeShape(),
                **({"verdict_timeout_s": 20, "adaptive": False} | params)),
                sid=sids[i] if sids else None)
            for i, p in enumerate(prompts)
        ]
        return await asyncio.gather(*(s.run() for s in sessions),
                                    return_exceptions=return_exceptions)
    finally:
        ex.shutdown()
        await nc.close()


async def wait_queued(url: str, n: int, timeout: float = 30.0) -> None:
    """Wait until n draft blocks wait in the partition consumers (so a batch will be full)."""
    nc = await broker.connect(url, "test-probe")
    try:
        js = nc.jetstream()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            if await broker.queued_blocks(js) >= n:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"fewer than {n} blocks queued")
    finally:
        await nc.close()
