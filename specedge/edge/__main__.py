"""python -m specedge.edge: generate with the draft model here and verification on the
verifier fleet, streaming the committed text. `python -m specedge.edge serve` runs the same
as a local OpenAI-compatible endpoint (see specedge/edge/serve.py)."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import structlog

from schemas import Sampling
from specedge import broker, fleet, lifecycle, logs, settings, subjects
from specedge.cli import add_common, apply_threads, connect_opts, runner_opts
from specedge.config import is_suffix
from specedge.edge.args import LONE_PREFILL_CHUNK, add_generation_args, shape_from
from specedge.edge.limits import EdgeLimits, LimitError, Plan, plan
from specedge.edge.proactive import Mode

# exit codes of the one-shot edge (a signal: 128 + its number, e.g. 143 for SIGTERM)
EXIT_USAGE = 2  # bad flags or configuration, no broker given, a model that cannot run exactly
EXIT_REJECTED = 3  # a verifier rejected the session (e.g. too_many_sessions, rate_limited)
EXIT_REFUSED = 4  # refused before any work: over the fleet's or the models' limits
# the fleet out of reach: no contact with the broker for --give-up-s (or none at start), or no
# verdict after every re-publish
EXIT_UNREACHABLE = 5


def parse(argv=None) -> argparse.Namespace:
    from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="python -m specedge.edge", description=__doc__)
    p.add_argument("--model", default=DEFAULT_DRAFT,
                   help="draft model: cache name, dir or hub id; `suffix`: no model, drafts "
                        "from suffix matches (the target's tokenizer, no torch device)")
    p.add_argument("--target", default=DEFAULT_TARGET, help="target model name (for the record)")
    add_common(p)
    add_generation_args(p)
    from specedge.edge.serve import SERVE_ONLY

    return settings.parse_args(p, "edge", argv, sibling_keys=SERVE_ONLY)


def model_config(ref: str):
    """A model's config without its weights (specedge.models.config_of)."""
    from specedge.models import config_of

    return config_of(ref)


def generation_config(ref: str):
    """A model's generation config without its weights (its stop tokens), or None."""
    from specedge import synthetic

    if synthetic.is_synthetic(ref):
        return None
    try:
        from transformers import GenerationConfig

        from specedge.models import resolve

        return GenerationConfig.from_pretrained(resolve(ref))
    except (OSError, ValueError):  # none shipped: the tokenizer's and config's stop tokens
        return None


def admit(a: argparse.Namespace, prompt_tokens: int, limits: fleet.FleetLimits | None,
          draft_config, tokenizer: str = "", token_count: int | None = None) -> Plan:
    """The session this edge may run, or LimitError: what the fleet would refuse is refused
    here, before the draft model does any work (specedge/edge/limits.py). tokenizer,
    token_count: the draft's tokenizer's fingerprint and id count (specedge.vocab)."""
    rows = getattr(draft_config, "vocab_size", None)
    return plan(prompt_tokens, a.max_new_tokens, default_new_tokens=a.max_new_tokens,
                shape=shape_from(a), max_budget=a.max_tree_budget,
                own=EdgeLimits(max_prompt_tokens=a.max_prompt_tokens), fleet=limits,
                draft_positions=getattr(draft_config, "max_position_embeddings", None),
                draft_vocab=min(rows, token_count) if rows and token_count else rows,
                # a model-free edge's depth is its own default, not the user's: fitted
                clamp_shape=is_suffix(a.model), prompt_param="--prompt",
                new_param="--max-new-tokens",
                tokenizer=tokenizer, draft_name=f"the draft {a.model}")


async def run_edge(a: argparse.Namespace, url: str, draft=None, tokenizer=None,
                   runner=None, lazy_runner=None) -> dict:
    """One session, streamed. `runner`: the draft's PackedRunner, built (and its model checked)
    beforehand; the demo builds it while the verifier loads, and reuses it. `lazy_runner`: or
    a callable that builds it when the session first needs the draft (specedge.edge.drafter.
    LazyDrafter: after a plain first round)."""
    from specedge.config import SUFFIX_DEPTH, SuffixConfig
    from specedge.edge.corpus import OFF
    from specedge.edge.corpus import load as suffix_corpus
    from specedge.edge.drafter import Drafter, LazyDrafter
    from specedge.edge.link import connect
    from specedge.edge.session import EdgeSession, SessionParams
    from specedge.edge.suffixdraft import SuffixDrafter, SuffixSource
    from specedge.edge.text import Detokenizer, eos_ids, prompt_ids
    from specedge.execution import PackedRunner
    from specedge.models import load_model, load_tokenizer
    from specedge.vocab import fingerprint, token_count

    log = structlog.get_logger("specedge.edge")
    # no draft model: the target's tokenizer and config (no weights) say what to send
    model_free = is_suffix(a.model)
    ref = a.target if model_free else a.model
    tokenizer = tokenizer or load_tokenizer(ref)
    ids = prompt_ids(tokenizer, a.prompt, a.chat)
    detok = Detokenizer(tokenizer)
    # a model-free edge's phrase book (read before connecting: a bad file is a usage error,
    # not a failed session)
    corpus = suffix_corpus(getattr(a, "suffix_corpus", OFF), tokenizer) if model_free else None

    def stream(toks: list[int]) -> None:
        if not a.json:
            sys.stdout.write(detok.push(toks))
            sys.stdout.flush()

    edge = getattr(a, "edge_name", subjects.ANON)  # the demo has no --edge-name
    nc = await connect(url, f"edge-{edge}", getattr(a, "give_up_s", 60.0),
                       **connect_opts(a, subjects.edge_inbox(edge)))
    ex = ThreadPoolExecutor(1, thread_name_prefix="draft")
    try:
        # its config is enough to refuse; load the weights only if admitted
        draft_config = model_config(ref) if draft is None else draft.config
        limits = await fleet.fetch(nc)
        fp, count = fingerprint(tokenizer), token_count(tokenizer)
        p = admit(a, len(ids), limits, draft_config, fp, count)
        if limits is None:
            log.warning("no verifier answered the limits query; checked against this edge's own "
                        "limits only", prompt_tokens=len(ids))
        if model_free or lazy_runner is not None:
            gen_config = generation_config(ref)
        else:
            draft = draft or load_model(a.model, dtype=a.dtype, device=a.device)
            gen_config = getattr(draft, "generation_config", None)
        params = SessionParams(
            prompt_ids=ids, max_new_tokens=p.max_new_tokens,
            sampling=Sampling(a.temperature, a.top_p, a.top_k), seed=a.seed,
            eos_ids=eos_ids(tokenizer, draft_config, gen_config),
            shape=p.shape, target_name=a.target, draft_name=a.model,
            proactive=Mode(a.proactive), first_tree=getattr(a, "first_tree", True),
            emulate_rtt_ms=a.emulate_rtt_ms, adaptive=a.adaptive, max_budget=p.max_budget,
            prefill_chunk=a.prefill_chunk or LONE_PREFILL_CHUNK,
            give_up_s=getattr(a, "give_up_s", 60.0),
            verdict_timeout_s=getattr(a, "verdict_timeout_s", 30.0), tokenizer=fp,
            suffix=SuffixConfig(min_match=a.suffix_draft, max_depth=min(
                SUFFIX_DEPTH, limits.max_depth if limits else SUFFIX_DEPTH)))
        rows = getattr(draft_config, "vocab_size", None)
        vocab = min(rows, count) if rows else count  # what a built runner will say
        if model_free:
            drafter = SuffixDrafter(SuffixSource(corpus=corpus), vocab)
            suffix = None
        else:
            if lazy_runner is not None:
                drafter = LazyDrafter(lambda: Drafter(lazy_runner()), vocab)
            else:
                drafter = Drafter(runner or PackedRunner(draft, vocab_limit=count,
                                                         **runner_opts(a)))
            suffix = SuffixSource(min_match=a.suffix_draft) if a.suffix_draft else None
        session = EdgeSession(nc, nc.jetstream(), drafter, ex, params,
                              on_tokens=stream, sid=subjects.new_session_id(edge),
                              suffix=suffix)
        result = await session.run()
    finally:
        ex.shutdown(wait=False)
        await broker.close(nc)
    result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    summary = result.summary()
    if a.json:
        print(json.dumps(summary), flush=True)
    else:
        sys.stdout.write(detok.flush() + "\n")
        s = summary
        print(f"[{len(result.token_ids)} tokens, {s['rounds']} rounds, "
              f"{s['tokens_per_round']:.2f} tokens/round, acceptance {s['acceptance']:.2f}, "
              f"TTFT {s['ttft_s']:.2f}s, ITL p50 {s['itl_s'] * 1000:.0f}ms, "
              f"wall {s['wall_s']:.1f}s{_by_source(s)}]", file=sys.stderr)
    return summary


def _by_source(s: dict) -> str:
    """", accepted: model a, suffix b" when suffix matches drafted anything."""
    if not s["draft_tokens_by_source"]["suffix"]:
        return ""
    by = s["accepted_by_source"]
    return f", accepted: model {by['model']}, suffix {by['suffix']}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from specedge.edge import serve

        return serve.main(argv[1:])
    a = parse(argv)
    logs.configure(a.log_level)
    lifecycle.dump_stacks_on_signal()  # SIGUSR2: every thread's stack, for a stuck process
    structlog.get_logger("specedge.edge").info("config", command="edge", **settings.effective(a))
    apply_threads(a.threads)
    if not a.nats:
        print("specedge.edge: no broker given; pass --nats nats://HOST:PORT or set SPECEDGE_NATS "
              "(or run `python -m specedge.demo` for a self-contained stack)", file=sys.stderr)
        return EXIT_USAGE
    logs.install_uvloop()
    import nats.errors

    from specedge.edge.corpus import CorpusError
    from specedge.edge.link import BrokerUnreachable
    from specedge.edge.session import SessionRejected
    from specedge.execution.support import UnsupportedModel

    try:
        lifecycle.run(run_edge(a, a.nats))
    except BrokerUnreachable as exc:
        print(f"specedge.edge: gave up: {exc} (tune with --give-up-s)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (nats.errors.Error, OSError) as exc:  # e.g. no broker at that address at start
        print(f"specedge.edge: cannot reach the broker at {settings.mask('nats', a.nats)}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TimeoutError as exc:  # the broker answers, no verifier does
        print(f"specedge.edge: no verdict: {exc}; is a verifier running on this broker?",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except SessionRejected as exc:  # e.g. too_many_sessions, rate_limited: say why and stop
        print(f"specedge.edge: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    except LimitError as exc:
        print(f"specedge.edge: refused before any work ({exc.code}): {exc.message}",
              file=sys.stderr)
        return EXIT_REFUSED
    except lifecycle.Interrupted as exc:  # the session was closed on the broker on the way out
        print(f"\nspecedge.edge: {exc}", file=sys.stderr)
        return exc.exit_code
    except (UnsupportedModel, CorpusError) as exc:  # refused at load
        print(f"specedge.edge: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
