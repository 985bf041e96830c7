"""The edge as a local OpenAI-compatible endpoint: /v1/models, /v1/chat/completions and
/v1/completions, streamed as server-sent events, each request its own session on the fleet.

Every request becomes one EdgeSession sharing the edge's draft model (one executor thread, so
the draft model's forwards never race) and its NATS connection. Sampling parameters (penalties,
logit bias, min_p included) travel in the session's opening: the verifier applies them to the
target's logits, so the output is exactly what the target alone would give under them. Every
parameter is checked here, before any work: a bad value gets an OpenAI-shaped 400 and no
session is opened. logprobs are the target's (raw logits), asked of the verifier per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from schemas import Sampling
from specedge import metrics, subjects
from specedge.config import SUFFIX_DEPTH, SuffixConfig, TreeShape
from specedge.edge import structured, tools
from specedge.edge.coalesce import CoalescingRunner
from specedge.edge.corpus import load as suffix_corpus
from specedge.edge.drafter import Drafter
from specedge.edge.errors import rejection_status
from specedge.edge.limits import EdgeLimits, LimitError, plan
from specedge.edge.link import BrokerUnreachable, Link
from specedge.edge.proactive import Mode
from specedge.edge.routes import Routes
from specedge.edge.session import EdgeSession, SessionParams, SessionRejected, speculation
from specedge.edge.suffix import SuffixStore
from specedge.edge.suffixdraft import SuffixDrafter, SuffixSource
from specedge.edge.text import Detokenizer, eos_ids
from specedge.execution import PackedRunner
from specedge.execution.costs import forward_costs, knee
from specedge.execution.grammar import Grammars
from specedge.execution.logprobs import MAX_TOP, TokenLogprob
from specedge.execution.transforms import (
    MAX_BIAS,
    MAX_BIAS_ENTRIES,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
)
from specedge.fleet import FleetView
from specedge.vocab import fingerprint, token_count

log = structlog.get_logger(__name__)
MIN_PREFILL_CHUNK = 16


@dataclass
class ServeConfig:
    model_id: str  # the name clients pass as "model" (the target's: it decides the output)
    target_name: str = ""
    draft_name: str = ""
    shape: TreeShape = field(default_factory=TreeShape)
    proactive: Mode = Mode.SINGLE
    first_tree: bool = True  # SessionParams.first_tree
    emulate_rtt_ms: float = 0.0
    adaptive: bool = True  # follow the verifiers' tree budget hints
    max_budget: int = 16
    edge_name: str = subjects.ANON  # the broker user's name: session ids are <edge>.<nonce>
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_prompt_tokens: int | None = None  # this edge's own limit; None: the fleet's
    temperature: float = 0.0  # defaults for requests that leave a parameter out
    top_p: float = 1.0
    top_k: int = 0
    max_sessions: int = 16  # concurrent sessions; more requests wait for a slot
    max_n: int = 4  # choices per request (each its own session)
    verdict_timeout_s: float = 30.0  # the longest wait before looking for a verdict
    give_up_s: float = 60.0  # the broker out of reach this long: the request fails with a 503
    # prompt tokens per draft forward (SessionParams.prefill_chunk); 0: the draft model's knee,
    # measured at start-up, so that a long prompt's prefill costs the other requests about one
    # forward's worth of time per draft step
    prefill_chunk: int = 128
    attention: str = "auto"  # the draft runner's (specedge.cli.runner_opts)
    cuda_graphs: bool | None = None
    # draft KV kept after a request ends, for the next turn of its conversation (or a sibling
    # choice) to start from; evicted least recently used when sessions need the room. 0: off
    draft_cache_tokens: int = 32768
    # a name the verifiers share (their --shared-prefix): a chat's leading system message is
    # cached under it for every tenant that uses the same one; "": this edge's own cache only
    shared_prefix: str = ""
    # suffix drafts (specedge.edge.suffixdraft): with a draft model, the shortest match that
    # adds branches to its trees (0: off); the history kept per tenant for them (tokens)
    suffix_min_match: int = 4
    suffix_history_tokens: int = 65536
    # a model-free edge's phrase book, shared by every tenant (specedge.edge.corpus): builtin,
    # off or a file
    suffix_corpus: str = "off"


class ApiError(Exception):
    """An OpenAI-style error body with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int = -1  # -1: none; k: each token's logprob and its k most likely alternatives
    n: int = 1  # choices: sessions with seeds choice_seed(seed, i)
    shape: TreeShape = field(default_factory=TreeShape)  # within the fleet's limits
    max_budget: int = 16
    shared_len: int = 0  # prompt tokens cached under ServeConfig.shared_prefix
    # response_format and tools (specedge.edge.structured): the grammar and the tool plan
    structure: structured.Structure | None = None
    user: str = ""  # OpenAI's end-user id: the tenant of its suffix-draft history
    suffix_depth: int = 16  # the deepest suffix-drafted node (the verifiers' max_depth)


@dataclass
class Finish:
    reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    session_id: str
    # the session's rounds as (nodes, depth, accepted, committed, suffix_nodes,
    # suffix_accepted), for its speculation figures
    rounds: list[tuple[int, ...]] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens the verifier served from its prefix cache


@dataclass
class Piece:
    """Text released to the client, with the logprobs of the tokens whose text begins in it
    (offset: where the token's text begins in the completion's text)."""

    text: str
    tokens: list[tuple[int, TokenLogprob]] = field(default_factory=list)


_DONE = object()


class EdgeService:
    """What the HTTP handlers share: the NATS connection, the draft model and its thread, the
    tokenizer, the metrics and the concurrency limit."""

    def __init__(self, nc, draft_model, tokenizer, cfg: ServeConfig,
                 edge_metrics: metrics.EdgeMetrics | None = None, fleet: FleetView | None = None,
                 model_config=None, generation_config=None):
        """draft_model None: a model-free edge (suffix drafts only); `model_config` and
        `generation_config` (the target's, no weights) then give its positions, vocabulary
        and stop tokens."""
        self.nc, self.js = nc, nc.jetstream()
        self.link = Link.of(nc)  # shared by every request's session on this connection
        self.fleet = fleet  # the verifiers' limits (None: this edge's own limits only)
        self.model_free = draft_model is None
        config = model_config if self.model_free else draft_model.config
        self.draft_positions = getattr(config, "max_position_embeddings", None)
        self.tok, self.cfg = tokenizer, cfg
        self.tokenizer_id = fingerprint(tokenizer)  # checked against the fleet's targets
        # per tenant, the sequences served: what later requests' suffix drafts match against
        self.suffixes = SuffixStore(cfg.suffix_history_tokens)
        self.corpus = suffix_corpus(cfg.suffix_corpus, tokenizer) if self.model_free else None
        self.runner: CoalescingRunner | None = None
        if self.model_free:
            rows = getattr(config, "vocab_size", None)
            count = token_count(tokenizer)
            self.vocab_size = min(rows, count) if rows else count
            cfg.prefill_chunk = cfg.prefill_chunk or MIN_PREFILL_CHUNK  # nothing to prefill
        else:
            # concurrent requests draft in their own threads; coinciding draft forwards are
            # packed into one (about the cost of one on this hardware)
            self.runner = CoalescingRunner(PackedRunner(draft_model, attention=cfg.attention,
                                                        cuda_graphs=cfg.cuda_graphs,
                                                        vocab_limit=token_count(tokenizer)))
            self.vocab_size = self.runner.vocab_size
        if not cfg.prefill_chunk:
            costs = forward_costs(self.runner.runner, stop_ratio=2.0)
            cfg.prefill_chunk = max(MIN_PREFILL_CHUNK, knee(costs))
            log.info("draft forward cost measured", prefill_chunk=cfg.prefill_chunk,
                     costs_ms={n: round(c * 1000, 1) for n, c in costs.items()})
        self.executor = ThreadPoolExecutor(cfg.max_sessions, thread_name_prefix="draft")
        self.grammars = Grammars(tokenizer, self.vocab_size)  # compiled once per schema
        self.eos = eos_ids(tokenizer, config, generation_config if self.model_free else
                           getattr(draft_model, "generation_config", None))
        if self.runner is not None:
            pool = self.runner.pool
            if cfg.draft_cache_tokens:
                pool.enable_cache(-(-cfg.draft_cache_tokens // pool.block_size))
            self.routes = Routes(pool.block_size)
        else:
            self.routes = Routes()
        self.metrics = edge_metrics or metrics.EdgeMetrics()
        if draft_model is not None:  # a model-free edge computes in no number format
            metrics.set_dtype(self.metrics.model_dtype, draft_model.dtype)
        self.slots = asyncio.Semaphore(cfg.max_sessions)
        self.draining = False
        self._warned_shape = False
        # a token's own text, for logprobs (special tokens kept: they were emitted)
        self.token_text = functools.lru_cache(1 << 16)(
            lambda i: tokenizer.decode([i], skip_special_tokens=False))

    def ready(self) -> bool:
        return not self.draining and self.nc.is_connected

    def close(self) -> None:
        self.executor.shutdown(wait=False)

    async def admit(self, prompt_ids: list[int], common: dict, prompt_param: str) -> GenRequest:
        """Refuse what the fleet would refuse, right after tokenising: no session is opened and
        no draft forward runs for a request that fails here (rule: specedge/edge/limits.py)."""
        fleet = await self.fleet.current() if self.fleet else None
        cfg = self.cfg
        try:
            p = plan(len(prompt_ids), common.pop("max_tokens"),
                     default_new_tokens=cfg.default_max_tokens, shape=cfg.shape,
                     max_budget=cfg.max_budget,
                     own=EdgeLimits(cfg.max_prompt_tokens, cfg.max_tokens_limit), fleet=fleet,
                     draft_positions=self.draft_positions, draft_vocab=self.vocab_size,
                     prompt_param=prompt_param, tokenizer=self.tokenizer_id,
                     draft_name=f"the draft {cfg.draft_name}")
        except LimitError as exc:
            log.info("request refused", code=exc.code, param=exc.param,
                     prompt_tokens=len(prompt_ids), reason=exc.message)
            raise ApiError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        if p.shape != cfg.shape and not self._warned_shape:
            self._warned_shape = True
            log.warning("draft tree clamped to the verifiers' limits", configured=str(cfg.shape),
                        used=str(p.shape))
        req = GenRequest(prompt_ids, p.max_new_tokens, **common, shape=p.shape,
                         max_budget=p.max_budget,
                         suffix_depth=min(SUFFIX_DEPTH, fleet.max_depth if fleet else SUFFIX_DEPTH))
        try:  # the grammar compiled (on a thread, within its time limit) before any session
            await structured.prepare(self.grammars, req.structure, self.eos)
        except structured.RequestError as exc:
            raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
        return req

    def shared_len(self, body: dict, ids: list[int]) -> int:
        """With a shared prefix name: the tokens of the chat's leading system message as the
        template renders it (0 when there is none, or when it does not begin the prompt)."""
        msgs = body.get("messages")
        if not self.cfg.shared_prefix or not msgs or msgs[0].get("role") != "system":
            return 0
        try:
            head = self.tok.apply_chat_template([msgs[0]], tokenize=True)
        except Exception:  # a template that wants more than a system message
            return 0
        head = list(head["input_ids"] if isinstance(head, dict) or hasattr(head, "input_ids")
                    else head)
        return len(head) if ids[: len(head)] == head else 0

    def tenant(self, req: GenRequest) -> str:
        """Whose history a request's suffix drafts may read: this edge's credentials and the
        request's `user` (distinct users of one edge never see each other's sequences)."""
        return f"{self.cfg.edge_name}\x00{req.user}"

    def session_id(self, prompt_ids: list[int]) -> str:
        """A new session id, in the partition of the session that last covered the longest
        prefix of this prompt when there is one: the verifier serving that partition holds
        its KV (the previous turn of a conversation)."""
        return subjects.new_session_id(self.cfg.edge_name, self.routes.find(prompt_ids))

    async def generate(self, req: GenRequest, sid: str, after: asyncio.Event | None = None,
                       started: asyncio.Event | None = None) -> AsyncIterator[Piece | Finish]:
        """Text pieces as verdicts commit tokens, then one Finish. Stop strings are held back
        until they can no longer begin one; a hit cancels the session (it closes itself). With
        logprobs, each piece carries the tokens whose text begins in it; a stop string drops
        the tokens whose text begins after the cut. `after`: start once it is set (a sibling
        choice waits for the first choice's prefill, to share it); `started` is set at this
        session's first verdict (or its end, whatever happens)."""
        t0 = time.perf_counter()
        slog = log.bind(sid=sid)
        if after is not None:
            await after.wait()
        params = SessionParams(
            prompt_ids=req.prompt_ids, max_new_tokens=req.max_tokens, sampling=req.sampling,
            seed=req.seed, eos_ids=self.eos, shape=req.shape,
            target_name=self.cfg.target_name, draft_name=self.cfg.draft_name,
            proactive=self.cfg.proactive, first_tree=self.cfg.first_tree,
            emulate_rtt_ms=self.cfg.emulate_rtt_ms, verdict_timeout_s=self.cfg.verdict_timeout_s, give_up_s=self.cfg.give_up_s,
            adaptive=self.cfg.adaptive, max_budget=req.max_budget,
            prefill_chunk=self.cfg.prefill_chunk, tokenizer=self.tokenizer_id,
            logprobs=req.logprobs, shared_prefix=self.cfg.shared_prefix if req.shared_len else "",
            shared_len=req.shared_len, grammar=req.structure.grammar if req.structure else None,
            constraint=structured.constraint(self.grammars, req.structure, self.eos),
            suffix=SuffixConfig(min_match=self.cfg.suffix_min_match, max_depth=req.suffix_depth))
        arrivals: asyncio.Queue = asyncio.Queue()

        def on_tokens(toks: list[int]) -> None:
            arrivals.put_nowait((time.perf_counter(), toks))
            if started is not None:
                started.set()

        async with self.slots:
            self.metrics.active.inc()
            source = SuffixSource(self.suffixes, self.tenant(req),
                                  1 if self.model_free else max(1, self.cfg.suffix_min_match),
                                  corpus=self.corpus)
            drafter = (SuffixDrafter(source, self.vocab_size) if self.model_free
                       else Drafter(self.runner))
            session = EdgeSession(self.nc, self.js, drafter, self.executor, params,
                                  on_tokens=on_tokens, sid=sid, link=self.link, suffix=source)
            task = asyncio.create_task(session.run())
            task.add_done_callback(lambda _: arrivals.put_nowait(_DONE))
            detok = Detokenizer(self.tok)
            text, sent, n_tokens, last_at, last_tok = "", 0, 0, None, None
            hold = max((len(s) for s in req.stop), default=1) - 1
            scored: list[tuple[int, TokenLogprob]] = []  # (text offset, logprob), not yet sent

            def piece(end: int, rest: bool = False) -> Piece:
                """text[sent:end], with the logprobs of the tokens whose text begins before end
                (rest: of every token left, at the end of the answer)."""
                n = len(scored) if rest else next(
                    (i for i, (off, _) in enumerate(scored) if off >= end), len(scored))
                out = Piece(text[sent:end], scored[:n])
                del scored[:n]
                return out

            def finish(reason: str) -> Finish:
                return Finish(reason, len(req.prompt_ids), n_tokens, sid,
                              [(r.nodes, r.depth, r.accepted, r.committed, r.suffix_nodes,
                                r.suffix_accepted) for r in session.rounds],
                              sum(r.cached_tokens for r in session.rounds))

            outcome = "cancelled"  # unless it ends otherwise: the client went away
            try:
                while (item := await arrivals.get()) is not _DONE:
                    at, toks = item
                    self.metrics.token_times(at, last_at, t0, len(toks))
                    if req.logprobs >= 0:  # token by token, for each one's text offset
                        lps = session.token_logprobs[n_tokens : n_tokens + len(toks)]
                        for t, lp in zip(toks, lps, strict=True):
                            scored.append((len(text), lp))
                            text += detok.push([t])
                    else:
                        text += detok.push(toks)
                    last_at, n_tokens, last_tok = at, n_tokens + len(toks), toks[-1]
                    cut = _find_stop(text, req.stop, max(0, sent - hold))
                    if cut is not None:
                        if cut > sent or scored and scored[0][0] < cut:
                            yield piece(cut)
                        outcome = "stopped"
                        slog.info("stop string reached; closing session", tokens=n_tokens)
                        yield finish("stop")
                        return
                    if len(text) - hold > sent:
                        yield piece(len(text) - hold)
                        sent = len(text) - hold
                result = task.result()  # raises what the session raised
                text += detok.flush()
                cut = _find_stop(text, req.stop, max(0, sent - hold))
                end = len(text) if cut is None else cut
                if end > sent or scored and (cut is None or scored[0][0] < cut):
                    yield piece(end, rest=cut is None)
                self.metrics.session_done(result.rounds)
                outcome = "ok"
                eos_hit = last_tok is not None and last_tok in self.eos
                reason = "stop" if cut is not None or eos_hit or n_tokens < req.max_tokens \
                    else "length"
                yield finish(reason)
            except SessionRejected as exc:
                outcome = "rejected"
                r = exc.rejected
                raise ApiError(rejection_status(r.code),
                               f"the verifier rejected the request: {r.reason}",
                               code=r.code) from None
            except BrokerUnreachable as exc:
                outcome = "unreachable"
                slog.warning("request failed: broker out of reach", error=str(exc))
                raise ApiError(503, f"the edge cannot reach its broker: {exc}; retry later",
                               code="broker_unreachable") from None
            except TimeoutError:
                outcome = "timeout"
                raise ApiError(504, "no verdict from the verifier fleet in time; is a verifier "
                               "running on this broker?", code="verifier_timeout") from None
            except ApiError:
                raise
            except Exception as exc:
                outcome = "error"
                slog.exception("session failed")
                raise ApiError(500, f"generation failed: {exc!r}") from None
            finally:
                # Bookkeeping first: under a disconnect, Starlette's cancel scope cancels
                # every further await here too.
                if started is not None:
                    started.set()
                if outcome != "ok":
                    self.metrics.sessions.labels(outcome).inc()
                self.metrics.active.dec()
                self.metrics.prompt_cache(session.draft_cached,
                                          len(req.prompt_ids) - session.draft_cached)
                self.routes.add(session.committed, subjects.partition_of(sid))
                if not task.done():
                    task.cancel()  # the session publishes its SessionClosed on the way out
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.gather(task, return_exceptions=True)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


# ---------------------------------------------------------------- request parsing


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        want = " or ".join({int: "an integer", float: "a number", str: "a string",
                            bool: "a boolean", list: "an array", dict: "an object"}[k]
                           for k in kinds)
        raise ApiError(400, f"'{name}' must be {want}, got {json.dumps(v)}", param=name)
    return v


def _range(body: dict, name: str, lo: float, hi: float, default: float, *,
           integer: bool = False, lo_open: bool = False) -> float:
    """A number (an integer if `integer`) in [lo, hi] ((lo, hi] with lo_open), or a 400 in
    OpenAI's words; NaN and infinities fail every comparison or bound."""
    v = _get(body, name, (int,) if integer else (int, float), default)
    kind = "integer" if integer else "decimal"
    if math.isnan(v) or (v <= lo if lo_open else v < lo):
        raise ApiError(400, f"Invalid '{name}': {kind} below minimum value. Expected a value "
                       f"{'>' if lo_open else '>='} {lo:g}, but got {v} instead.", param=name,
                       code=f"{kind}_below_min_value")
    if v > hi:
        raise ApiError(400, f"Invalid '{name}': {kind} above maximum value. Expected a value "
                       f"<= {hi:g}, but got {v} instead.", param=name,
                       code=f"{kind}_above_max_value")
    return v


MAX_COMPLETION_LOGPROBS = 5  # the legacy endpoint's limit


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> sorted (id, bias) pairs; ids in the vocabulary, biases in
    -100..100."""
    raw = _get(body, "logit_bias", (dict,), {})
    if len(raw) > MAX_BIAS_ENTRIES:
        raise ApiError(400, f"Invalid 'logit_bias': at most {MAX_BIAS_ENTRIES} entries, got "
                       f"{len(raw)}", param="logit_bias", code="invalid_value")
    out = {}
    for key, bias in raw.items():
        try:
            tid = int(key)
        except ValueError:
            tid = -1
        if not (str(tid) == key.strip() and 0 <= tid < vocab_size):
            raise ApiError(400, f"Invalid 'logit_bias': key {json.dumps(key)} is not a token id "
                           f"in [0, {vocab_size})", param="logit_bias", code="invalid_value")
        if (isinstance(bias, bool) or not isinstance(bias, int | float)
                or not -MAX_BIAS <= bias <= MAX_BIAS):
            raise ApiError(400, f"Invalid 'logit_bias': the bias of token {tid} must be a number "
                           f"in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {json.dumps(bias)}",
                           param="logit_bias", code="invalid_value")
        out[tid] = float(bias)
    return tuple(sorted(out.items()))


def _logprobs(body: dict, chat: bool) -> int:
    """-1 (none) or k, the alternatives per token: chat's logprobs (bool) + top_logprobs
    (0..20), or the legacy endpoint's logprobs (0..5)."""
    if not chat:
        k = _get(body, "logprobs", (int,), None)
        if k is None:
            return -1
        return int(_range(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, 0, integer=True))
    on = _get(body, "logprobs", (bool,), False)
    top = _get(body, "top_logprobs", (int,), None)
    if top is not None and not on:
        raise ApiError(400, "'logprobs' must be true when 'top_logprobs' is given",
                       param="top_logprobs", code="invalid_value")
    k = int(_range(body, "top_logprobs", 0, MAX_TOP, 0, integer=True))
    return k if on else -1


def _sampling(body: dict, cfg: ServeConfig, vocab_size: int) -> Sampling:
    temperature = _range(body, "temperature", 0, 2, cfg.temperature)
    top_p = _range(body, "top_p", 0, 1, cfg.top_p, lo_open=True)
    top_k = _range(body, "top_k", 0, vocab_size, cfg.top_k, integer=True)
    return Sampling(
        temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
        min_p=float(_range(body, "min_p", 0, 1, 0.0)),
        presence_penalty=float(_range(body, "presence_penalty", -MAX_PENALTY, MAX_PENALTY, 0.0)),
        frequency_penalty=float(_range(body, "frequency_penalty", -MAX_PENALTY, MAX_PENALTY,
                                       0.0)),
        repetition_penalty=float(_range(body, "repetition_penalty", 0,
                                        MAX_REPETITION_PENALTY, 1.0, lo_open=True)),
        logit_bias=_logit_bias(body, vocab_size))


def _parse_common(body: dict, cfg: ServeConfig, vocab_size: int, chat: bool) -> dict:
    """Every parameter both endpoints take, checked before any work (a 400 otherwise)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", param="model")
    if model != cfg.model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this endpoint serves "
                       f"'{cfg.model_id}'", param="model", code="model_not_found")
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= cfg.max_n:
        raise ApiError(400, f"Invalid 'n': expected a value in [1, {cfg.max_n}] (this edge's "
                       f"configured maximum), but got {n} instead.", param="n",
                       code=f"integer_{'above_max' if n > 1 else 'below_min'}_value")
    sampling = _sampling(body, cfg, vocab_size)
    logprobs = _logprobs(body, chat)
    try:  # response_format and tools: the request's grammar, parsed and checked
        structure = structured.parse(body, chat)
    except structured.RequestError as exc:
        raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    # left out: None, and the edge's default capped by what fits (EdgeService.admit)
    max_tokens = _get(body, "max_completion_tokens", (int,), _get(body, "max_tokens", (int,)))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", param="max_tokens",
                       code="invalid_value")
    seed = _get(body, "seed", (int,), None)
    if seed is None:
        seed = secrets.randbits(31)  # like OpenAI: without a seed, sampling is not repeatable
    elif not 0 <= seed < 2**63:
        raise ApiError(400, "'seed' must be a non-negative 64-bit integer", param="seed")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or up to 4 non-empty strings", param="stop")
    stream = _get(body, "stream", (bool,), False)
    so = _get(body, "stream_options", (dict,), {})
    if so and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true",
                       param="stream_options")
    include_usage = bool(_get(so, "include_usage", (bool,), False))
    user = _get(body, "user", (str,), "")
    if len(user) > 256:
        raise ApiError(400, "'user' must be at most 256 characters", param="user")
    return dict(max_tokens=max_tokens, sampling=sampling, seed=seed, stop=stop, stream=stream,
                include_usage=include_usage, logprobs=logprobs, n=n, structure=structure,
                user=user)


def _chat_prompt(body: dict, tok, structure: structured.Structure | None = None) -> list[int]:
    if tools.uses_tools(body):  # tools in the template, tool turns in the messages
        try:
            return tools.chat_prompt(body, tok, structure.tools if structure else None)
        except structured.RequestError as exc:
            raise ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                            "assistant"):
            raise ApiError(400, f"messages[{i}]: 'role' must be system, developer, user or "
                           "assistant", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}]: 'content' must be a string",
                           param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions",
                       param="messages")
    ids = tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _completion_prompt(body: dict, tok, vocab_size: int) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        return list(tok(p)["input_ids"])
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in p):
        if not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        return p
    raise ApiError(400, "'prompt' must be a non-empty string or array of token ids "
                   "(one prompt per request)", param="prompt")


# ---------------------------------------------------------------- responses


LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for a log-probability of -inf (JSON has none)


def _lp(v: float) -> float:
    return max(v, LOGPROB_FLOOR)


def chat_logprobs(tokens: list[tuple[int, TokenLogprob]], text_of: Callable[[int], str]) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}], ...}; bytes
    are the UTF-8 bytes of the token's text."""
    def one(tid: int, lp: float) -> dict:
        s = text_of(tid)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode())}

    return {"content": [one(e.token, e.logprob) | {"top_logprobs": [one(i, v) for i, v in e.top]}
                        for _, e in tokens], "refusal": None}


def legacy_logprobs(tokens: list[tuple[int, TokenLogprob]],
                    text_of: Callable[[int], str]) -> dict:
    """The completions endpoint's shape: parallel lists, the alternatives as {text: logprob}
    (two ids with the same text keep the likelier), text_offset in the completion's text."""
    tops = []
    for _, e in tokens:
        d: dict[str, float] = {}
        for i, v in e.top:
            d.setdefault(text_of(i), _lp(v))
        tops.append(d)
    return {"tokens": [text_of(e.token) for _, e in tokens],
            "token_logprobs": [_lp(e.logprob) for _, e in tokens], "top_logprobs": tops,
            "text_offset": [off for off, _ in tokens]}


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def choice_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed: the request's own for the first (n=1 answers the same), a hash of
    (seed, index) for the others, so that the choices' draws are independent."""
    if index == 0:
        return seed
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


class _Choices:
    """The n choices of one request, each its own session, consumed concurrently (each until
    its end, so a choice never holds a session slot waiting for its siblings): items arrive as
    (index, Piece | Finish); the first failure of any choice is raised."""

    def __init__(self, gens: list[AsyncIterator[Piece | Finish]]):
        self.gens = gens
        self._q: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._pump(i, g)) for i, g in enumerate(gens)]

    async def _pump(self, i: int, gen) -> None:
        try:
            async for item in gen:
                self._q.put_nowait((i, item))
        except ApiError as exc:
            self._q.put_nowait((i, exc))
        except Exception as exc:  # generate() turns failures into ApiErrors; anything else
            log.exception("choice failed", index=i)
            self._q.put_nowait((i, ApiError(500, f"generation failed: {exc!r}")))

    async def next(self) -> tuple[int, Piece | Finish]:
        i, item = await self._q.get()
        if isinstance(item, ApiError):
            raise item
        return i, item

    async def aclose(self) -> None:
        """Cancel what still runs (each session closes itself on the broker)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for g in self.gens:
            await g.aclose()


async def _run(service: EdgeService, req: GenRequest, kind: str, model: str) -> Response:
    created = int(time.time())
    # every choice in the first one's partition (one verifier), the others starting after its
    # first verdict: both sides have the prompt's KV cached by then and only fork it
    sids = [service.session_id(req.prompt_ids)]
    sids += [subjects.new_session_id(service.cfg.edge_name, subjects.partition_of(sids[0]))
             for _ in range(req.n - 1)]
    header = {"X-SpecEdge-Session": ",".join(sids)}
    first = asyncio.Event() if req.n > 1 else None
    choices = _Choices([service.generate(dataclasses.replace(req, seed=choice_seed(req.seed, i)),
                                         sid, after=first if i else None,
                                         started=None if i else first)
                        for i, sid in enumerate(sids)])
    # errors before every choice's first item get a real status code
    early: list[tuple[int, Piece | Finish]] = []
    try:
        while len({i for i, _ in early}) < req.n:
            early.append(await choices.next())
    except ApiError as exc:  # the session ids, so that replay can show what happened
        await choices.aclose()
        return exc.response(header)
    except BaseException:
        await choices.aclose()
        raise

    def envelope(chs: list[dict], chunk: bool, rid: str) -> dict:
        obj = {"chat": "chat.completion", "text": "text_completion"}[kind]
        return {"id": rid, "object": obj + (".chunk" if chunk and kind == "chat" else ""),
                "created": created, "model": model, "system_fingerprint": None,
                "choices": chs}

    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + sids[0]  # replay finds it by this id

    def logprobs(tokens: list[tuple[int, TokenLogprob]]) -> dict | None:
        if req.logprobs < 0:
            return None
        return (chat_logprobs if kind == "chat" else legacy_logprobs)(tokens, service.token_text)

    def usage(fins: list[Finish]) -> dict:
        """usage (the prompt counted once, as OpenAI) and the speculation figures beside it
        (an extension): over all choices, and each choice's own when there are several."""
        out = {"usage": {"prompt_tokens": fins[0].prompt_tokens,
                         "completion_tokens": sum(f.completion_tokens for f in fins),
                         "total_tokens": fins[0].prompt_tokens
                         + sum(f.completion_tokens for f in fins),
                         "prompt_tokens_details": {"cached_tokens": fins[0].cached_tokens}},
               "speculation": speculation([r for f in fins for r in f.rounds])}
        if len(fins) > 1:
            out["speculation"]["choices"] = [speculation(f.rounds) | {
                "cached_tokens": f.cached_tokens} for f in fins]
        return out

    async def rest():
        """Every (index, item) from here to the last choice's Finish, the early ones first."""
        done = 0
        while early:
            i, item = early.pop(0)
            done += isinstance(item, Finish)
            yield i, item
        while done < req.n:
            i, item = await choices.next()
            done += isinstance(item, Finish)
            yield i, item

    plan = req.structure.tools if req.structure and kind == "chat" else None
    whole = plan is not None and plan.choice != "none"  # a call is parsed from the whole text
    if not req.stream:
        parts: list[list[Piece]] = [[] for _ in range(req.n)]
        fins: list[Finish | None] = [None] * req.n
        try:
            async for i, item in rest():
                if isinstance(item, Finish):
                    fins[i] = item
                else:
                    parts[i].append(item)
        except ApiError as exc:
            return exc.response(header)
        finally:
            await choices.aclose()
        out = []
        for i, (ps, fin) in enumerate(zip(parts, fins, strict=True)):
            assert fin is not None
            text = "".join(p.text for p in ps)
            lps = logprobs([t for p in ps for t in p.tokens])
            msg, reason = tools.message(text, fin.reason, plan)  # tool calls parsed out
            out.append({"index": i, "message": msg, "finish_reason": reason,
                        "logprobs": lps} if kind == "chat" else
                       {"index": i, "text": text, "finish_reason": fin.reason, "logprobs": lps})
        body = envelope(out, False, rid) | usage(fins)
        return JSONResponse(body, headers=header)

    def delta(i: int, piece: Piece | None, reason: str | None, role: bool = False) -> dict:
        text = piece.text if piece else None
        lps = logprobs(piece.tokens) if piece else None
        if kind == "chat":
            d: dict = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            c = {"index": i, "delta": d, "finish_reason": reason, "logprobs": lps}
        else:
            c = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lps}
        out = envelope([c], True, rid)
        if req.include_usage:
            out["usage"] = None
        return out

    def tool_delta(i: int, d: dict) -> dict:
        out = envelope([{"index": i, "delta": d, "finish_reason": None, "logprobs": None}],
                       True, rid)
        return out | ({"usage": None} if req.include_usage else {})

    async def events() -> AsyncIterator[bytes]:
        fins: list[Finish | None] = [None] * req.n
        held: list[list[str]] = [[] for _ in range(req.n)]  # with tools: parsed at the end
        try:
            if kind == "chat":
                for i in range(req.n):
                    yield _sse(delta(i, None, None, role=True))
            async for i, item in rest():
                if isinstance(item, Finish):
                    fins[i] = item
                    reason = item.reason
                    if whole:
                        ds, reason = tools.stream_deltas("".join(held[i]), reason, plan)
                        for d in ds:
                            yield _sse(tool_delta(i, d))
                    yield _sse(delta(i, None, reason))
                elif whole:
                    held[i].append(item.text)
                else:
                    yield _sse(delta(i, item, None))
            if req.include_usage:
                yield _sse(envelope([], True, rid) | usage(fins))
        except ApiError as exc:  # mid-stream: the status is sent already; say it in-band
            yield _sse(exc.body())
        finally:
            await choices.aclose()  # a client that went away cancels its sessions here
        yield _sse("[DONE]")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | header
    return _ClosingStream(events(), choices.aclose, media_type="text/event-stream",
                          headers=headers)


class _ClosingStream(StreamingResponse):
    """When the client goes away, Starlette abandons the body iterator where it stands
    (suspended at a yield), so its finally blocks would wait for garbage collection; close
    the generation explicitly so the session is cancelled and closed on the broker now."""

    def __init__(self, body, on_close: Callable, **kw):
        super().__init__(body, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def build_app(service: EdgeService) -> Starlette:
    cfg = service.cfg

    def counted(endpoint: str, fn: Callable) -> Callable:
        async def handler(request: Request) -> Response:
            try:
                resp = await fn(request)
            except ApiError as exc:
                resp = exc.response()
            service.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
            return resp
        return handler

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "specedge",
             "draft": cfg.draft_name}]})

    async def chat(request: Request) -> Response:
        body = await body_of(request)
        common = _parse_common(body, cfg, service.vocab_size, chat=True)
        ids = _chat_prompt(body, service.tok, common["structure"])
        req = await service.admit(ids, common, "messages")
        req.shared_len = service.shared_len(body, ids)
        return await _run(service, req, "chat", cfg.model_id)

    async def completions(request: Request) -> Response:
        body = await body_of(request)
        common = _parse_common(body, cfg, service.vocab_size, chat=False)
        for name, ok in (("echo", False), ("suffix", None)):
            if body.get(name) not in (ok, None):
                raise ApiError(400, f"'{name}' is not supported", param=name)
        if body.get("best_of") not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", param="best_of")
        ids = _completion_prompt(body, service.tok, service.vocab_size)
        req = await service.admit(ids, common, "prompt")
        return await _run(service, req, "text", cfg.model_id)

    async def http_error(_: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    async def server_error(_: Request, exc: Exception) -> Response:
        log.exception("request failed", error=repr(exc))
        return ApiError(500, "internal error; see the edge's log").response()

    return Starlette(
        routes=[
            Route("/v1/models", counted("models", models), methods=["GET"]),
            Route("/v1/chat/completions", counted("chat", chat), methods=["POST"]),
            Route("/v1/completions", counted("completions", completions), methods=["POST"]),
            *metrics.routes(service.metrics.registry, service.ready,
                            lambda: {"model": cfg.model_id}),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error})
