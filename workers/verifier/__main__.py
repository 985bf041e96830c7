"""python -m workers.verifier: a stateless verifier worker. Start as many as you like against
one broker; they share the work through a durable pull consumer."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from specedge import broker, logs
from specedge.cli import DTYPES, add_common, apply_threads
from specedge.config import Limits
from workers.verifier.worker import Worker, WorkerConfig


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.verifier", description=__doc__)
    from specedge.models import DEFAULT_TARGET

    p.add_argument("--model", default=DEFAULT_TARGET, help="target model: cache name, dir or hub id")
    add_common(p)
    p.add_argument("--max-batch", type=int, default=8, help="blocks per batched forward")
    p.add_argument("--kv-budget", type=int, default=None, help="KV cache budget in tokens")
    p.add_argument("--max-nodes", type=int, default=Limits.max_nodes)
    p.add_argument("--max-depth", type=int, default=Limits.max_depth)
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.max_prompt_tokens)
    p.add_argument("--max-new-tokens", type=int, default=Limits.max_new_tokens)
    p.add_argument("--name", default=None, help="worker name in verdicts and logs")
    return p.parse_args(argv)


async def amain(a: argparse.Namespace) -> int:
    log = structlog.get_logger("workers.verifier")
    embedded = None
    url = a.nats
    if not url:
        embedded = broker.EmbeddedNats().start()
        url = embedded.url
        log.info("no --nats given: started an embedded broker", url=url)
    from specedge.models import load_model

    model = load_model(a.model, dtype=DTYPES[a.dtype], device=a.device)
    limits = Limits(a.max_nodes, a.max_depth, a.max_prompt_tokens, a.max_new_tokens)
    cfg = WorkerConfig(max_batch=a.max_batch, limits=limits, kv_budget_tokens=a.kv_budget)
    if a.name:
        cfg.name = a.name
    w = Worker(model, url, cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, w.stop)  # drain: finish the batch in hand, then exit
    loop.add_signal_handler(signal.SIGUSR1, w.log_stats)  # counters on demand (benchmarks)
    try:
        await w.run()
    finally:
        if embedded:
            embedded.cleanup()
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    apply_threads(a.threads)
    logs.install_uvloop()
    return asyncio.run(amain(a))


if __name__ == "__main__":
    sys.exit(main())
