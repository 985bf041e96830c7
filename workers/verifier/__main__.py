"""python -m workers.verifier: a stateless verifier worker. Start as many as you like against
one broker; they share the work through a durable pull consumer."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog

from specedge import broker, lifecycle, logs, settings, subjects
from specedge.broker import ConsumerSettings, StreamSettings
from specedge.cli import add_common, apply_threads, connect_opts
from specedge.config import AdaptiveBudget, Limits, add_limit_args
from specedge.execution.support import UnsupportedModel
from workers.verifier.state import Reclaim
from workers.verifier.worker import Worker, WorkerConfig

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_budget(text: str) -> tuple[int | None, int | None, float | None]:
    """'200000' -> (tokens, None, None); '8GiB' -> (None, bytes, None); '50%' -> (None, None,
    0.5), a fraction of the device memory free after the weights (GPU)."""
    t = text.strip().lower()
    if t.isdigit():
        return int(t), None, None
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise argparse.ArgumentTypeError(f"bad KV budget {text!r}: a percentage in (0, 100]")
        return None, None, pct / 100
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in _UNITS or not num:
        raise argparse.ArgumentTypeError(f"bad KV budget {text!r}: use tokens (200000), bytes "
                                         f"with a unit (512MiB, 8GB) or a share of free GPU "
                                         f"memory (50%)")
    return None, int(float(num) * _UNITS[unit]), None


def shared_names(value: str | list[str] | None) -> tuple[str, ...]:
    """--shared-prefix as given: repeated flags, or one comma-separated string."""
    if isinstance(value, str):
        value = [value]
    return tuple(n.strip() for v in value or () for n in v.split(",") if n.strip())


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.verifier", description=__doc__)
    from specedge.models import DEFAULT_TARGET

    p.add_argument("--model", default=DEFAULT_TARGET, help="target model: cache name, dir or hub id")
    add_common(p)
    p.add_argument("--max-batch", type=int, default=8, help="blocks per batched forward")
    p.add_argument("--kv-budget", type=parse_budget, default=(None, None, None),
                   help="KV pool size: tokens (e.g. 200000), bytes with a unit (e.g. 8GiB, "
                        "512MB) or a share of the GPU memory free after the weights (e.g. "
                        "50%%); default: half the free memory on a GPU, a growing pool on the "
                        "CPU. When it is full, least recently used sessions lose their KV")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="committed tokens a session catching up (a long prompt, a rebuilt "
                        "cache) may add to one forward; the others in that forward wait for "
                        "one such chunk per round (0, the default: measured at start-up)")
    p.add_argument("--prefix-cache-tokens", type=int, default=None,
                   help="KV of ended sessions kept for sessions whose prompt starts the same way "
                        "(a conversation's next turn, n > 1 choices): they reuse it instead of "
                        "prefilling it; evicted least recently used, and only when live "
                        "sessions need the room. Default: any free room of a fixed pool, "
                        "65536 tokens of a growing (CPU) pool; 0: off. Per tenant: one edge "
                        "identity's prompts never match another's")
    p.add_argument("--shared-prefix", action="append", default=None, metavar="NAME",
                   help="a system prompt name (SessionOpened.shared_prefix) whose cached KV "
                        "every tenant may reuse (repeatable; in a config file, one string, names "
                        "separated by commas)")
    add_limit_args(p)  # --max-nodes, --max-message-bytes, --max-sessions-per-edge, ...
    ad = AdaptiveBudget()
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=ad.enabled,
                   help="suggest a draft tree budget in every verdict from this worker's load")
    p.add_argument("--adaptive-batch-tokens", type=int, default=ad.batch_tokens,
                   help="batch size in tokens the suggested budgets aim at (the forward's knee; "
                        "0, the default: measured at start-up)")
    p.add_argument("--adaptive-max-budget", type=int, default=ad.hi,
                   help="largest tree budget suggested")
    p.add_argument("--batch-hold", type=float, default=WorkerConfig.batch_hold,
                   help="wait for blocks of active sessions that are due within this many "
                        "forwards, so out-of-phase sessions share a forward (0: never wait)")
    rc = Reclaim()
    p.add_argument("--reclaim-rounds", type=float, default=rc.rounds,
                   help="forget a session (its state and KV) once its edge has sent no block "
                        "for this many of the session's own round intervals (an edge killed, "
                        "or whose link never came back); it is rebuilt from its log if it "
                        "returns")
    p.add_argument("--reclaim-min-s", type=float, default=rc.min_s,
                   help="... but never sooner than this many seconds")
    p.add_argument("--reclaim-max-s", type=float, default=rc.max_s,
                   help="... and at the latest after this many seconds")
    p.add_argument("--max-sessions", type=int, default=WorkerConfig.max_sessions,
                   help="sessions remembered at most (least recently used forgotten first)")
    p.add_argument("--name", default=None, help="worker name in verdicts and logs")
    p.add_argument("--partitions", type=int, default=subjects.PARTITIONS,
                   help="partition count of the stream (fixed when the stream is created)")
    p.add_argument("--replicas", type=int, default=1,
                   help="stream replicas if this worker creates the stream (3 on a cluster)")
    p.add_argument("--ack-wait", type=float, default=ConsumerSettings.ack_wait_s,
                   help="seconds before an unacked block is redelivered")
    p.add_argument("--max-deliver", type=int, default=ConsumerSettings.max_deliver)
    p.add_argument("--lease-ttl", type=float, default=6.0,
                   help="seconds after which a silent worker's partitions move")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics, /health and /ready on this port (0: any free port; "
                        "default: off)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="address for --metrics-port")
    # the demo's: it starts this process before it has timed the dtypes (specedge/demo.py)
    p.add_argument("--dtype-from-stdin", action="store_true", help=argparse.SUPPRESS)
    return settings.parse_args(p, "verifier", argv)


def dtype_from_stdin() -> str:
    """--dtype-from-stdin: the first line of stdin names the dtype (the demo writes it once
    it has chosen); ValueError for anything else, an end of file included."""
    from specedge.cli import DTYPE_NAMES

    name = sys.stdin.readline().strip()
    if name not in DTYPE_NAMES:
        raise ValueError(f"no dtype on stdin (got {name[:40]!r}; want one of "
                         f"{', '.join(DTYPE_NAMES)})")
    return name


async def amain(a: argparse.Namespace) -> int:
    log = structlog.get_logger("workers.verifier")
    embedded = None
    url = a.nats
    try:
        if not url:
            embedded = broker.EmbeddedNats()
            url = embedded.start().url
            log.info("no --nats given: started an embedded broker", url=url,
                     pid=embedded.proc.pid if embedded.proc else None)
        from specedge.models import load_model, tokenizer_identity

        # a signal while loading raises lifecycle.Interrupted here: the finally stops the broker
        model = load_model(a.model, dtype=a.dtype, device=a.device)
        tokenizer, vocab_limit = tokenizer_identity(a.model)
        limits = Limits.from_args(a)
        adaptive = AdaptiveBudget(a.adaptive_batch_tokens, AdaptiveBudget.lo,
                                  a.adaptive_max_budget, a.adaptive)
        cfg = WorkerConfig(max_batch=a.max_batch, limits=limits, adaptive=adaptive,
                           batch_hold=a.batch_hold, kv_budget_tokens=a.kv_budget[0],
                           kv_budget_bytes=a.kv_budget[1], kv_budget_fraction=a.kv_budget[2],
                           attention=a.attention, cuda_graphs=a.cuda_graphs,
                           prefill_chunk=a.prefill_chunk, partitions=a.partitions,
                           reclaim=Reclaim(a.reclaim_rounds, a.reclaim_min_s, a.reclaim_max_s),
                           max_sessions=a.max_sessions,
                           lease_ttl_s=a.lease_ttl,
                           lease_renew_s=max(0.2, a.lease_ttl / 5),
                           stream=StreamSettings(replicas=a.replicas, partitions=a.partitions),
                           consumer=ConsumerSettings(ack_wait_s=a.ack_wait,
                                                     max_deliver=a.max_deliver),
                           metrics_port=a.metrics_port, metrics_host=a.metrics_host,
                           connect_opts=connect_opts(a), tokenizer=tokenizer,
                           vocab_limit=vocab_limit, prefix_cache_tokens=a.prefix_cache_tokens,
                           shared_prefixes=shared_names(a.shared_prefix))
        if a.name:
            cfg.name = a.name
        w = Worker(model, url, cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # drain: finish the batch in hand, exit
            loop.add_signal_handler(sig, w.stop, sig.name)
        loop.add_signal_handler(signal.SIGUSR1, w.log_stats)  # counters on demand (benchmarks)
        await w.run()
    finally:
        if embedded:
            embedded.cleanup()
    return 0


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    log = structlog.get_logger("workers.verifier")
    if a.dtype_from_stdin:
        try:
            a.dtype = dtype_from_stdin()
        except ValueError as exc:
            print(f"workers.verifier: {exc}", file=sys.stderr)
            return 2
    log.info("config", **settings.effective(a))
    apply_threads(a.threads)
    logs.install_uvloop()
    lifecycle.raise_on_signals()  # until the drain handlers are in place (after loading)
    lifecycle.dump_stacks_on_signal()  # SIGUSR2: every thread's stack, for a stuck process
    try:
        return asyncio.run(amain(a))
    except lifecycle.Interrupted as exc:  # before serving: nothing to drain
        log.info("stopped before serving", signal=str(exc))
        return exc.exit_code
    except UnsupportedModel as exc:  # refused at load: one line, no traceback
        print(f"workers.verifier: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
