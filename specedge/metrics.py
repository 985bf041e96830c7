"""Prometheus metrics for the verifier and the edge, and the small ASGI app that serves them
with /health and /ready. Each component owns its own registry, so several workers or edges
in one process (the tests) never share or collide on a series."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = structlog.get_logger(__name__)

# Seconds: a round on a CPU verifier is 0.05-2 s, a token on the edge 5 ms-1 s.
_LATENCY = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SMALL_COUNTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
_FILL = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


def dtype_gauge(prefix: str, registry: CollectorRegistry) -> Gauge:
    """1 for the number format the model runs in (`--dtype auto` picks it at start-up:
    specedge/precision.py), labelled by it."""
    return Gauge(prefix + "model_dtype", "The model's number format (label dtype; value 1)",
                 ["dtype"], registry=registry)


def set_dtype(gauge: Gauge, dtype: object) -> None:
    gauge.labels(str(dtype).removeprefix("torch.")).set(1)


class VerifierMetrics:
    def __init__(self, max_batch: int, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.max_batch = max_batch
        p = "specedge_verifier_"
        self.model_dtype = dtype_gauge(p, r)
        self.rounds = Counter(p + "rounds", "Draft blocks verified (one verdict each)",
                              registry=r)
        self.batches = Counter(p + "batches", "Batched target forwards", registry=r)
        self.prefill_chunks = Counter(p + "prefill_chunks", "Blocks whose session only caught "
                                      "up on its prompt in a forward (no verdict yet; the "
                                      "block is verified in a later one)", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Committed tokens put into sessions' "
                                     "KV when it was built (a first round, a rebuild), by "
                                     "source: the prefix cache (cached) or a prefill (computed)",
                                     ["source"], registry=r)
        for source in ("cached", "computed"):
            self.prompt_tokens.labels(source)
        self.batch_size = Histogram(p + "batch_size", "Blocks per batched forward",
                                    buckets=_SMALL_COUNTS, registry=r)
        self.batch_fill = Histogram(p + "batch_fill", "Blocks per forward / --max-batch",
                                    buckets=_FILL, registry=r)
        self.batch_tokens = Histogram(p + "batch_tokens", "Tokens in one batched forward "
                                      "(missing prefixes plus tree nodes)",
                                      buckets=(1, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
                                      registry=r)
        self.verify_seconds = Histogram(p + "verify_seconds", "Time of one batched verification",
                                        buckets=_LATENCY, registry=r)
        self.forward_seconds = Histogram(p + "forward_seconds", "Time of one batch's target "
                                         "forward alone (the rest of verify_seconds is the host "
                                         "work around it)", buckets=_LATENCY, registry=r)
        self.busy_seconds = Counter(p + "busy_seconds", "Time spent in batched verification",
                                    registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Blocks pulled by this worker and waiting "
                                 "for a forward", registry=r)
        self.consumer_lag = Gauge(p + "consumer_lag", "Blocks in the stream not yet delivered, "
                                  "per partition this worker holds", ["partition"], registry=r)
        self.consumer_ack_pending = Gauge(p + "consumer_ack_pending", "Blocks delivered and not "
                                          "yet acked, per partition this worker holds",
                                          ["partition"], registry=r)
        self.partitions = Gauge(p + "partitions", "Partitions leased by this worker", registry=r)
        self.kv_bytes = Gauge(p + "kv_cache_bytes", "Bytes of target KV cache held", registry=r)
        self.kv_sessions = Gauge(p + "kv_cache_sessions", "Sessions with state in this worker",
                                 registry=r)
        self.kv_lookups = Counter(p + "kv_cache_lookups", "Blocks whose session KV was warm (hit)"
                                  " or had to be (partly) rebuilt (miss)", ["result"], registry=r)
        self.kv_hit_rate = Gauge(p + "kv_cache_hit_rate", "KV hits / lookups since start",
                                 registry=r)
        self.rejects = Counter(p + "rejects", "Blocks rejected, by reason code", ["reason"],
                               registry=r)
        self.tokens = Counter(p + "tokens", "Tokens committed by this worker's verdicts",
                              registry=r)
        self.tokens_per_round = Histogram(p + "tokens_per_round", "Tokens committed per verdict "
                                          "(accepted draft tokens + 1)", buckets=_SMALL_COUNTS,
                                          registry=r)
        self.position_drafted = Counter(p + "position_drafted", "Blocks whose tree reached this "
                                        "depth", ["position"], registry=r)
        self.position_accepted = Counter(p + "position_accepted", "Blocks whose accepted path "
                                         "reached this depth (acceptance at a position = "
                                         "accepted / drafted)", ["position"], registry=r)
        self.sessions_reclaimed = Counter(p + "sessions_reclaimed", "Sessions forgotten (state "
                                          "and KV freed) because their edge went silent",
                                          registry=r)
        self.redeliveries = Counter(p + "redeliveries", "Draft blocks delivered more than once",
                                    registry=r)
        self.suggested_budget = Gauge(p + "suggested_budget", "Tree budget (nodes) suggested "
                                      "in the last verdicts: the load hint", registry=r)
        self.hold_seconds = Counter(p + "hold_seconds", "Time batches waited for blocks of "
                                    "active sessions due within a forward", registry=r)
        # the forward's cost model (specedge/execution/costmodel.py), kept current from the
        # forwards run: a verifier started on a busy machine recovers its budget here
        self.knee_tokens = Gauge(p + "knee_tokens", "Batch tokens the budget hints aim at (the "
                                 "forward's knee, as currently estimated, or as set)", registry=r)
        self.prefill_chunk_tokens = Gauge(p + "prefill_chunk_tokens", "Tokens a session "
                                          "catching up may add to one forward", registry=r)
        self.forward_cost = Gauge(p + "forward_cost_seconds", "Estimated seconds of one forward "
                                  "by its new tokens (the cost model's buckets)", ["tokens"],
                                  registry=r)
        self.cost_probes = Counter(p + "cost_probes", "Idle-time forwards timed for the cost "
                                   "model alone (sizes no recent forward had)", registry=r)
        for result in ("hit", "miss"):
            self.kv_lookups.labels(result)
        self._lookups = {True: 0, False: 0}
        self._children: dict[tuple[int, int], object] = {}  # labelled counters, by depth

    def batch(self, size: int, tokens: int, seconds: float, forward_s: float) -> None:
        self.batches.inc()
        self.batch_size.observe(size)
        self.batch_fill.observe(size / max(1, self.max_batch))
        self.batch_tokens.observe(tokens)
        self.verify_seconds.observe(seconds)
        self.forward_seconds.observe(forward_s)
        self.busy_seconds.inc(seconds)

    def prompt_cache(self, cached: int, computed: int) -> None:
        self.prompt_tokens.labels("cached").inc(cached)
        self.prompt_tokens.labels("computed").inc(computed)

    def costs(self, knee: int, chunk: int, seconds: dict[int, float]) -> None:
        self.knee_tokens.set(knee)
        self.prefill_chunk_tokens.set(chunk)
        for n, c in seconds.items():
            self.forward_cost.labels(str(n)).set(c)

    def verdicts(self, rounds: Sequence[tuple[int, int, int, bool]]) -> None:
        """A forward's verdicts, each (committed, accepted, tree_depth, kv_hit): summed here and
        written once per label (a labelled inc per verdict and depth cost more than the rest of
        the verdict's bookkeeping)."""
        if not rounds:
            return
        drafted: dict[int, int] = {}
        accepted: dict[int, int] = {}
        hits = 0
        for committed, acc, depth, kv_hit in rounds:
            self.tokens_per_round.observe(committed)
            for d in range(1, depth + 1):
                drafted[d] = drafted.get(d, 0) + 1
            for d in range(1, min(acc, depth) + 1):
                accepted[d] = accepted.get(d, 0) + 1
            hits += bool(kv_hit)
        self.rounds.inc(len(rounds))
        self.tokens.inc(sum(r[0] for r in rounds))
        for d, n in drafted.items():
            self._position(self.position_drafted, d).inc(n)
        for d, n in accepted.items():
            self._position(self.position_accepted, d).inc(n)
        if hits:
            self.kv_lookups.labels("hit").inc(hits)
        if hits < len(rounds):
            self.kv_lookups.labels("miss").inc(len(rounds) - hits)
        self._lookups[True] += hits
        self._lookups[False] += len(rounds) - hits
        self.kv_hit_rate.set(self._lookups[True] / sum(self._lookups.values()))

    def _position(self, family: Counter, d: int):
        key = (id(family), d)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(str(d))
        return child

    def watch_kv(self, nbytes: Callable[[], float], sessions: Callable[[], float]) -> None:
        self.kv_bytes.set_function(nbytes)
        self.kv_sessions.set_function(sessions)

    async def poll_consumers(self, js, owned: Iterable[int]) -> None:
        """Consumer lag of the partitions this worker serves (what KEDA scales on, seen from
        inside). Stale partitions are dropped from the gauge."""
        from specedge import subjects

        owned = sorted(owned)
        self.partitions.set(len(owned))
        self.consumer_lag.clear()
        self.consumer_ack_pending.clear()
        for p in owned:
            info = await js.consumer_info(subjects.STREAM, subjects.partition_durable(p))
            self.consumer_lag.labels(str(p)).set(info.num_pending)
            self.consumer_ack_pending.labels(str(p)).set(info.num_ack_pending)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        p = "specedge_edge_"
        self.model_dtype = dtype_gauge(p, r)  # the draft model's
        self.itl = Histogram(p + "inter_token_seconds", "Time between streamed tokens (a "
                             "verdict's tokens share its interval)", buckets=_LATENCY, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Request start to first token",
                              buckets=_LATENCY, registry=r)
        self.tokens = Counter(p + "tokens", "Tokens committed from verdicts", registry=r)
        self.rounds = Counter(p + "rounds", "Rounds (verdicts applied)", registry=r)
        self.tokens_per_round = Histogram(p + "tokens_per_round", "Tokens committed per round",
                                          buckets=_SMALL_COUNTS, registry=r)
        self.round_trip = Histogram(p + "round_trip_seconds", "Draft block published -> verdict "
                                    "received", buckets=_LATENCY, registry=r)
        self.draft_seconds = Histogram(p + "draft_seconds", "Drafting on the critical path per "
                                       "round", buckets=_LATENCY, registry=r)
        self.proactive = Counter(p + "proactive_guesses", "Proactive drafts whose guess came "
                                 "true (hit) or not (miss)", ["outcome"], registry=r)
        self.proactive_hit_rate = Gauge(p + "proactive_hit_rate", "Proactive hits / guesses "
                                        "since start", registry=r)
        self.sessions = Counter(p + "sessions", "Sessions ended, by outcome", ["outcome"],
                                registry=r)
        self.active = Gauge(p + "sessions_active", "Sessions running now", registry=r)
        self.requests = Counter(p + "http_requests", "API requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of ended sessions by "
                                     "how the draft KV got them: cached (an earlier turn's or a "
                                     "sibling choice's) or computed", ["source"], registry=r)
        for source in ("cached", "computed"):
            self.prompt_tokens.labels(source)
        self.draft_tokens = Counter(p + "draft_tokens", "Draft tree nodes sent, by who proposed "
                                    "them: the draft model or a suffix match", ["source"],
                                    registry=r)
        self.accepted_tokens = Counter(p + "accepted_tokens", "Draft tokens the target "
                                       "accepted, by who proposed them: the draft model or a "
                                       "suffix match", ["source"], registry=r)
        for source in ("model", "suffix"):
            self.draft_tokens.labels(source)
            self.accepted_tokens.labels(source)
        for outcome in ("hit", "miss"):
            self.proactive.labels(outcome)
        self._guesses = {True: 0, False: 0}

    def token_times(self, now: float, last: float | None, start: float, n: int) -> None:
        """n tokens arrived at `now`; `last` is when the previous ones did (None: first)."""
        self.tokens.inc(n)
        if last is None:
            self.ttft.observe(now - start)
            return
        for _ in range(n):
            self.itl.observe((now - last) / n)

    def prompt_cache(self, cached: int, computed: int) -> None:
        self.prompt_tokens.labels("cached").inc(cached)
        self.prompt_tokens.labels("computed").inc(computed)

    def session_done(self, rounds: Iterable, outcome: str = "ok") -> None:
        """Per-round figures from the session's records (RoundRecord)."""
        for r in rounds:
            self.rounds.inc()
            self.tokens_per_round.observe(r.committed)
            self.round_trip.observe(r.wait_s)
            self.draft_seconds.observe(r.draft_s)
            self.draft_tokens.labels("model").inc(r.nodes - r.suffix_nodes)
            self.draft_tokens.labels("suffix").inc(r.suffix_nodes)
            self.accepted_tokens.labels("model").inc(r.accepted - r.suffix_accepted)
            self.accepted_tokens.labels("suffix").inc(r.suffix_accepted)
            if r.hit is not None:
                self.proactive.labels("hit" if r.hit else "miss").inc()
                self._guesses[r.hit] += 1
        if any(self._guesses.values()):
            self.proactive_hit_rate.set(self._guesses[True] / sum(self._guesses.values()))
        self.sessions.labels(outcome).inc()


def routes(registry: CollectorRegistry, ready: Callable[[], bool],
           detail: Callable[[], dict] | None = None) -> list[Route]:
    """/metrics, /health (the process answers) and /ready (it can take work: 503 until then,
    and again while draining, so a load balancer or Kubernetes stops sending work)."""

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def is_ready(_: Request) -> Response:
        ok = ready()
        body = {"status": "ready" if ok else "not ready"} | (detail() if detail else {})
        return JSONResponse(body, status_code=200 if ok else 503)

    return [Route("/metrics", metrics), Route("/health", health), Route("/ready", is_ready)]


def app(registry: CollectorRegistry, ready: Callable[[], bool],
        detail: Callable[[], dict] | None = None) -> Starlette:
    return Starlette(routes=routes(registry, ready, detail))


async def poll_forever(fn: Callable[[], object], every_s: float, what: str) -> None:
    """Refresh gauges that need a broker call; a failure is logged and retried next time."""
    while True:
        try:
            await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("metrics poll failed", what=what, error=repr(exc))
        await asyncio.sleep(every_s)
