"""python -m specedge.edge serve: the edge as a local OpenAI-compatible endpoint.

Loads the draft model once, connects to the broker and serves /v1/models,
/v1/chat/completions and /v1/completions (plus /metrics, /health, /ready) until SIGTERM or
Ctrl-C; then it stops taking requests, lets the ones in flight finish, and exits."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import structlog

from specedge import broker, lifecycle, logs, settings, subjects
from specedge.cli import add_common, apply_threads, connect_opts
from specedge.config import is_suffix
from specedge.edge.args import add_generation_args, shape_from
from specedge.edge.proactive import Mode

log = structlog.get_logger("specedge.edge.serve")

SERVE_ONLY = frozenset({"host", "port", "served_model_name", "max_sessions", "max_n",
                        "draft_cache_tokens", "shared_prefix", "max_tokens_limit",
                        "grace_s", "suffix_history_tokens"})


def parser() -> argparse.ArgumentParser:
    from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="python -m specedge.edge serve", description=__doc__)
    p.add_argument("--model", default=DEFAULT_DRAFT,
                   help="draft model: cache name, dir or hub id; `suffix`: no model, drafts "
                        "from suffix matches (the target's tokenizer, no torch device)")
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help="target model name (what the verifiers run; the served model id)")
    add_common(p)
    add_generation_args(p)  # --max-new-tokens, --temperature... are the requests' defaults
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine "
                   "only; the endpoint has no authentication)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients pass (default: the target's name)")
    p.add_argument("--max-sessions", type=int, default=16,
                   help="requests generating at once; more wait for a slot")
    p.add_argument("--max-n", type=int, default=4,
                   help="largest n (choices per request, each its own session) a request may "
                        "ask for; more: a 400")
    p.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for (the verifier fleet's "
                        "max_new_tokens applies too)")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may take to finish")
    p.add_argument("--draft-cache-tokens", type=int, default=32768,
                   help="draft KV kept after a request for the next turn of its conversation "
                        "(or a sibling choice) to reuse, least recently used evicted first; "
                        "0: off")
    p.add_argument("--shared-prefix", default="", metavar="NAME",
                   help="a chat's leading system message is cached under NAME, shared with "
                        "every tenant that sends the same one, on verifiers started with "
                        "--shared-prefix NAME (elsewhere: this edge's own cache)")
    p.add_argument("--suffix-history-tokens", type=int, default=65536,
                   help="tokens of earlier requests (prompt and answer) kept for suffix drafts, "
                        "per tenant (the request's `user`; never shared between tenants), "
                        "least recently used evicted first; 0: each request drafts from "
                        "itself only")
    return p


def parse(argv=None) -> argparse.Namespace:
    a = settings.parse_args(parser(), "edge", argv)
    for name in ("port", "max_sessions", "max_n", "max_tokens_limit", "max_new_tokens",
                 "max_prompt_tokens", "draft_cache_tokens", "suffix_history_tokens"):
        value = getattr(a, name)
        if value is not None and value < (0 if name in ("port", "draft_cache_tokens",
                                                        "suffix_history_tokens") else 1):
            parser().error(f"--{name.replace('_', '-')} must be positive")
    return a


def serve_config(a: argparse.Namespace):
    from specedge.cli import runner_opts
    from specedge.edge.api import ServeConfig

    return ServeConfig(
        model_id=a.served_model_name or Path(a.target.rstrip("/")).name,
        target_name=a.target, draft_name=a.model, shape=shape_from(a),
        proactive=Mode(a.proactive), first_tree=getattr(a, "first_tree", True),
        emulate_rtt_ms=a.emulate_rtt_ms,
        adaptive=a.adaptive, max_budget=a.max_tree_budget,
        edge_name=getattr(a, "edge_name", subjects.ANON),
        default_max_tokens=a.max_new_tokens, max_tokens_limit=a.max_tokens_limit,
        max_prompt_tokens=a.max_prompt_tokens,
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_sessions=a.max_sessions,
        max_n=getattr(a, "max_n", 4), draft_cache_tokens=getattr(a, "draft_cache_tokens", 0),
        shared_prefix=getattr(a, "shared_prefix", ""),
        prefill_chunk=getattr(a, "prefill_chunk", 0), give_up_s=a.give_up_s,
        verdict_timeout_s=a.verdict_timeout_s, suffix_min_match=a.suffix_draft,
        suffix_history_tokens=getattr(a, "suffix_history_tokens", 65536),
        suffix_corpus=getattr(a, "suffix_corpus", "off"), **runner_opts(a))


async def serve(a: argparse.Namespace, stop: asyncio.Event, draft=None, tokenizer=None,
                started: asyncio.Future | None = None) -> None:
    """Serve until `stop` is set. `started` (if given) receives the HttpServer once listening."""
    from specedge.edge.api import EdgeService, build_app
    from specedge.edge.link import connect
    from specedge.fleet import FleetView
    from specedge.httpserver import HttpServer
    from specedge.models import load_model, load_tokenizer

    loop = asyncio.get_running_loop()
    config = gen_config = None
    if is_suffix(a.model):  # no model: the target's tokenizer and config, no weights
        from specedge.edge.__main__ import generation_config, model_config

        tokenizer, config, gen_config = await loop.run_in_executor(None, lambda: (
            tokenizer or load_tokenizer(a.target), model_config(a.target),
            generation_config(a.target)))
    elif draft is None:  # one thread: transformers' lazy imports are not safe to race
        tokenizer, draft = await loop.run_in_executor(None, lambda: (
            load_tokenizer(a.model), load_model(a.model, dtype=a.dtype, device=a.device)))
    edge = getattr(a, "edge_name", subjects.ANON)
    nc = await connect(a.nats, f"edge-api-{edge}", a.give_up_s,
                       **connect_opts(a, subjects.edge_inbox(edge)))
    fleet = FleetView(nc)
    service = EdgeService(nc, draft, tokenizer, serve_config(a), fleet=fleet,
                          model_config=config, generation_config=gen_config)
    server = HttpServer(build_app(service), a.host, a.port, "edge-api")
    server.server.config.timeout_graceful_shutdown = a.grace_s
    try:
        await fleet.start()  # the verifiers' limits, so requests they would refuse get a 400 now
        await server.start()
        log.info("serving", url=f"{server.url}/v1", model=service.cfg.model_id,
                 draft=a.model,
                 dtype=str(draft.dtype).removeprefix("torch.") if draft is not None else None,
                 broker=settings.mask("nats", a.nats))
        if started is not None:
            started.set_result(server)
        await stop.wait()
        service.draining = True  # /ready turns 503 first, so a balancer stops sending work
        log.info("stopping: finishing requests in flight", grace_s=a.grace_s)
    finally:
        await server.stop()
        service.close()
        await fleet.close()
        await broker.close(nc)


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    lifecycle.dump_stacks_on_signal()  # SIGUSR2: every thread's stack, for a stuck process
    log.info("config", command="edge serve", **settings.effective(a))
    apply_threads(a.threads)
    if not a.nats:
        print("specedge.edge serve: no broker given; pass --nats nats://HOST:PORT or set "
              "SPECEDGE_NATS (or run `python -m specedge.demo --serve`)", file=sys.stderr)
        return 2
    logs.install_uvloop()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        def on_signal(sig: signal.Signals) -> None:
            log.info("stop signal; draining", signal=sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await serve(a, stop)

    import nats.errors

    from specedge.edge.corpus import CorpusError
    from specedge.execution.support import UnsupportedModel

    try:
        asyncio.run(run())
    except UnsupportedModel as exc:  # the draft, refused at load: nothing to serve
        print(f"specedge.edge serve: {exc}", file=sys.stderr)
        return exc.exit_code
    except CorpusError as exc:  # --suffix-corpus read, but over the size bound
        print(f"specedge.edge serve: {exc}", file=sys.stderr)
        return 2  # specedge.edge.__main__.EXIT_USAGE
    except (nats.errors.Error, OSError) as exc:  # no broker at that address at start
        print(f"specedge.edge serve: cannot reach the broker at {settings.mask('nats', a.nats)}"
              f": {type(exc).__name__}: {exc}", file=sys.stderr)
        return 5  # specedge.edge.__main__.EXIT_UNREACHABLE
    return 0
