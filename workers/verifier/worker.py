"""The verifier worker: pull draft blocks in batches, verify them in one forward, publish
verdicts, ack. Handlers stay thin; validation lives in validate.py, the model in engine.py."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import nats.errors
import structlog

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    Rejected,
    SessionClosed,
    SessionOpened,
    Verdict,
    VerifyTimings,
    WireError,
    decode,
    encode,
    pack_ids,
)
from specedge import broker, metrics, subjects
from specedge.config import AdaptiveBudget, Limits
from specedge.devices import synchronize
from specedge.execution.costmodel import CostModel
from specedge.execution.costs import Probe, forward_costs
from specedge.execution.logprobs import to_wire
from specedge.execution.walk import commit
from specedge.httpserver import HttpServer
from specedge.sessionlog import LogError, committed_sequence, read_session
from workers.verifier.admission import Admission
from workers.verifier.board import Board
from workers.verifier.engine import Engine
from workers.verifier.leases import Leases
from workers.verifier.load import LoadMeter
from workers.verifier.progress import DEFAULT_EVERY_S, ProgressReporter
from workers.verifier.state import Openings, Reclaim, SessionState, SessionTable, kv_budget
from workers.verifier.validate import (
    BlockError,
    CheckedBlock,
    check_block,
    check_opened,
    check_size,
)

log = structlog.get_logger(__name__)

DEFAULT_PREFILL_CHUNK = 256  # when the forward's cost is not measured (a GPU's knee is larger)
CLOSED_MEMORY = 10_000  # closed session ids remembered, to drop their leftover blocks
SETTLE_TURNS = 16  # loop turns at most for blocks already on their way to join a batch


@dataclass
class WorkerStats:
    batches: int = 0
    blocks: int = 0
    rejected: int = 0
    dropped: int = 0  # bad messages dropped with a log line (nowhere to answer)
    failed_batches: int = 0  # forwards that raised (their sessions then tried apart)
    faulty: int = 0  # sessions answered internal_error: their block failed a forward alone
    kv_hits: int = 0
    kv_misses: int = 0
    tokens: int = 0  # committed by this worker's verdicts
    busy_s: float = 0.0  # in the model forward (the executor's verify call)
    batch_s: float = 0.0  # from taking a batch to its verdicts handed to the broker
    ready_at: float = 0.0  # monotonic time the worker started taking work
    budget: int = 0  # the last load hint sent
    hold_s: float = 0.0  # time spent waiting for due blocks to join a batch
    prefill_chunks: int = 0  # forwards in which a session only caught up (no verdict)
    probes: int = 0  # forwards timed for the cost model alone (no session in them)
    # (batches so far, probes so far, batch_tokens, prefill_chunk) each time the cost model
    # moved them
    cost_changes: list[tuple[int, int, int, int]] = field(default_factory=list)
    reclaimed: int = 0  # sessions forgotten because their edge went silent
    prepared: int = 0  # blocks decoded while a forward ran (prepare_ahead)
    log_reads: int = 0  # session states rebuilt from the log (not from a broadcast opening)
    batch_sizes: list[int] = field(default_factory=list)


@dataclass
class WorkerConfig:
    max_batch: int = 8
    fetch_timeout_s: float = 1.0
    # wait for blocks of active sessions due within this many forwards (0: never wait;
    # see load.py for why)
    batch_hold: float = 1.0
    limits: Limits = field(default_factory=Limits)
    adaptive: AdaptiveBudget = field(default_factory=AdaptiveBudget)
    # the KV pool: tokens, bytes, or a fraction of the device memory free after the weights;
    # none of them: a pool that grows on the CPU, half the free memory on a GPU
    kv_budget_tokens: int | None = None
    kv_budget_bytes: int | None = None
    kv_budget_fraction: float | None = None
    attention: str = "auto"  # attention backend: auto, sdpa or flex (specedge/execution)
    cuda_graphs: bool | None = None  # None: on CUDA with flex and a fixed pool
    # committed tokens a session may prefill per forward while it catches up (0: measured at
    # start-up from the forward's cost and kept up to date, else DEFAULT_PREFILL_CHUNK)
    prefill_chunk: int = 0
    # with the cost measured: time one forward of a size no recent forward supports (the
    # cost model's probe) at most once per this many forwards, and only when idle (0: never)
    probe_every: int = 4
    # decode and check the next batch's blocks while a forward runs (None: where the forward
    # runs on an accelerator; on a CPU the forward wants the cores the event loop would take,
    # and bench.scaling measured fewer verdicts per second with it on)
    prepare_ahead: bool | None = None
    # forget sessions whose edge went silent (state and KV), after a bound derived from each
    # session's own round interval (state.Reclaim)
    reclaim: Reclaim = field(default_factory=Reclaim)
    # sessions remembered at most (least recently used forgotten first; their next block
    # rebuilds them from the log)
    max_sessions: int = 100_000
    partitions: int = subjects.PARTITIONS
    lease_ttl_s: float = 6.0
    lease_renew_s: float = 1.0
    consumer: broker.ConsumerSettings = field(default_factory=broker.ConsumerSettings)
    stream: broker.StreamSettings = field(default_factory=broker.StreamSettings)
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    metrics_port: int | None = None  # /metrics /health /ready; None: off, 0: any free port
    metrics_host: str = "0.0.0.0"
    connect_opts: dict = field(default_factory=dict)  # credentials, TLS, inbox prefix
    # the target's tokenizer (specedge.vocab): its fingerprint, published and checked against
    # every session's draft, and its id count, past which no logit is picked ("", None: unknown)
    tokenizer: str = ""
    vocab_limit: int | None = None
    # the KV prefix cache (engine.py): unused blocks kept for sessions that start the same way
    # (0: off; None: any free room of a fixed pool, engine.GROWING_POOL_CACHE_TOKENS of a
    # growing one), and the SessionOpened.shared_prefix names every tenant may hit
    prefix_cache_tokens: int | None = None
    shared_prefixes: tuple[str, ...] = ()
    # a held block's edge hears that it is being worked on at least this often (progress.py)
    progress_every_s: float = DEFAULT_EVERY_S


class Worker:
    def __init__(self, model, url: str, cfg: WorkerConfig | None = None):
        self.cfg = cfg or WorkerConfig()
        self.url = url
        self.engine = Engine(model, kv_budget_tokens=kv_budget(model, self.cfg),
                             attention=self.cfg.attention, cuda_graphs=self.cfg.cuda_graphs,
                             vocab_limit=self.cfg.vocab_limit,
                             prefix_cache_tokens=self.cfg.prefix_cache_tokens,
                             shared_prefixes=frozenset(self.cfg.shared_prefixes))
        self.sessions = SessionTable(self.engine.pool, self.cfg.max_sessions)
        pool, lim = self.engine.pool, self.cfg.limits
        longest = lim.max_prompt_tokens + lim.max_new_tokens + lim.max_nodes
        if pool.fixed and pool.capacity_tokens < longest:
            log.warning("KV pool is smaller than one session at the limits; sessions that "
                        "outgrow it are refused", pool_tokens=pool.capacity_tokens,
                        longest_session=longest)
        self.stats = WorkerStats()
        self.metrics = metrics.VerifierMetrics(self.cfg.max_batch)
        self.dtype = str(model.dtype).removeprefix("torch.")  # in every verdict, for the replay
        metrics.set_dtype(self.metrics.model_dtype, self.dtype)
        # read at scrape time: summing every session's KV is no work for the batch step
        self.metrics.watch_kv(self.sessions.kv_bytes, lambda: len(self.sessions))
        self.http: HttpServer | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify")
        self._stop = asyncio.Event()
        self._ack_wait_s = self.cfg.consumer.ack_wait_s
        self._deferred: list = []  # blocks held back because their session was already batched
        self._compiling: dict[str, float] = {}  # sid -> when its block first waited for its grammar
        self._publishing: set[asyncio.Future] = set()  # verdicts still being published
        self.progress = ProgressReporter(self.cfg.name, self.cfg.progress_every_s)
        # this step's sessions without a verdict yet: sid -> (stage, done, total) (Progress)
        self._stage: dict[str, tuple[str, int, int]] = {}
        self._outbox: list[tuple[str, bytes]] = []  # progress reports to publish
        self._chunked_last = False  # the last forward carried a prefill chunk beside others
        self._inbox: asyncio.Queue = asyncio.Queue()
        self.prefill_chunk = self.cfg.prefill_chunk or DEFAULT_PREFILL_CHUNK
        # measured (and followed) unless the user set them
        self._follow_knee = self.cfg.adaptive.enabled and self.cfg.adaptive.batch_tokens <= 0
        self._follow_chunk = not self.cfg.prefill_chunk
        self.costs: CostModel | None = None  # None: not measured (both were set)
        self._probe: Probe | None = None  # the cost model's scratch sequence (forward thread)
        self._since_probe = 0  # forwards since the last probe
        self._ready: list[tuple[object, tuple[str, DraftBlock]]] = []  # decoded ahead
        self._preparing: asyncio.Task | None = None  # decoding them (see _prepare)
        self._prepare_ahead = (self.cfg.prepare_ahead if self.cfg.prepare_ahead is not None
                               else self.engine.runner.device.type != "cpu")
        self._room = asyncio.Event()  # the inbox was drained: pullers may fetch again
        self._pullers: dict[int, tuple[asyncio.Task, asyncio.Event]] = {}  # partition -> (loop, quit)
        self.metrics.costs(self.cfg.adaptive.batch_tokens, self.prefill_chunk, {})
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed sessions
        self._openings = Openings()  # sessions opened and not yet seen here (state.Openings)
        self.load = LoadMeter(self.cfg.adaptive)
        self.admission = Admission(self.cfg.limits)
        self.ready = asyncio.Event()
        self._swept = 0.0  # monotonic time of the last reclaim sweep

    def stop(self, reason: str = "stop()") -> None:
        """Drain: stop pulling, finish and publish the batch in hand, release leases, return.
        `reason`: what asked (a signal's name), for the log."""
        if not self._stop.is_set():
            log.info("stop requested; draining", worker=self.cfg.name, reason=reason)
        self._stop.set()

    async def run(self) -> None:
        nc = await broker.connect(self.url, f"verifier-{self.cfg.name}", **self.cfg.connect_opts)
        js = nc.jetstream()
        self.nc, self.js = nc, js
        for attempt in range(60):  # a fresh cluster answers JetStream calls only once ready
            try:
                await broker.ensure_stream(js, self.cfg.stream)
                break
            except Exception as exc:
                if attempt == 59:
                    raise
                log.warning("stream not ready; retrying", error=repr(exc))
                await asyncio.sleep(0.5)
        self.board = await Board.join(self)  # effective limits: enforced here, shown to edges
        if self._follow_knee or self._follow_chunk:
            # before taking partitions: their blocks must not wait on it
            await self._calibrate()
        self.leases = Leases(js, self.cfg.name, self.cfg.partitions, self.cfg.lease_ttl_s,
                             self.cfg.lease_renew_s, before_release=self._stop_pulling)
        await self.leases.start()
        csub = await nc.subscribe(subjects.all_sessions(), cb=self._on_session_msg)
        inbox = self._inbox
        lease_task = asyncio.create_task(self.leases.run(self._stop))
        await self._sync_pullers()
        follow = asyncio.create_task(self._follow_leases())
        observers = await self._start_observability()
        log.info("verifier ready", worker=self.cfg.name, max_batch=self.cfg.max_batch,
                 dtype=self.dtype,
                 vocab=self.engine.vocab_size, partitions=sorted(self.leases.owned))
        self.ready.set()
        self.stats.ready_at = time.monotonic()
        try:
            while not self._stop.is_set():
                self._reclaim()
                self.metrics.queue_depth.set(self._waiting() + len(self._deferred))
                msgs, self._ready = self._ready, []  # decoded while the last forward ran
                if not msgs and not self._deferred and inbox.empty():
                    await self._maybe_probe()  # idle: time a size the cost model lacks
                    try:
                        msgs.append((await asyncio.wait_for(inbox.get(),
                                                            self.cfg.fetch_timeout_s), None))
                    except TimeoutError:
                        continue
                await self._settle(len(msgs))
                while not inbox.empty() and len(msgs) + len(self._deferred) < self.cfg.max_batch:
                    msgs.append((inbox.get_nowait(), None))
                self._room.set()
                await self._hold(msgs)
                await self._process(msgs)
        finally:
            await self._drain(follow, lease_task, csub, observers)

    async def _drain(self, follow: asyncio.Task, lease_task: asyncio.Task, csub,
                     observers: list[asyncio.Task]) -> None:
        """The way out, one bounded and logged step at a time: a step that overruns its bound
        is cut short and the drain goes on (the broker redelivers what was not acked, leases
        and board entries expire by themselves)."""
        t0 = time.monotonic()
        follow.cancel()
        # no more pulls; whatever was pulled but not started goes back at once
        await _drain_step("stop pulling", self._stop_pulling(list(self._pullers)),
                          self.cfg.fetch_timeout_s + 2.0)
        leftovers = [m for m, _ in self._deferred + self._ready]
        while not self._inbox.empty():
            leftovers.append(self._inbox.get_nowait())
        await _drain_step("return unstarted blocks", asyncio.gather(
            *(_quietly(m.nak()) for m in leftovers)), 3.0, blocks=len(leftovers))
        # the last verdicts out before we go (each publish retries within its own bound)
        await _drain_step("publish last verdicts", asyncio.gather(*self._publishing), 10.0,
                          verdicts=len(self._publishing))
        await _drain_step("stop lease renewal", lease_task, 2.0)
        await _drain_step("leave the limits board", self.board.leave(), 4.0)
        await _drain_step("release leases", self.leases.release_all(), 4.0)
        await _drain_step("unsubscribe", csub.unsubscribe(), 2.0)
        await _drain_step("close the connection", broker.close(self.nc), 6.0)
        if self._probe is not None:
            self._executor.submit(self._probe.close)
        # the forward thread is idle here (the batch loop awaited its last forward)
        await _drain_step("stop the forward thread",
                          asyncio.to_thread(self._executor.shutdown, True), 10.0)
        for t in observers:
            t.cancel()
        if self.http:
            await _drain_step("stop the HTTP server", self.http.stop(), 3.0)
        log.info("drained", worker=self.cfg.name, took_s=round(time.monotonic() - t0, 3))
        self.log_stats("verifier stopped")

    async def _calibrate(self) -> None:
        """Measure this machine's forward cost against the tokens in it: its knee (the batch
        size the budget hints aim at; a CPU's is a few dozen tokens, a GPU's hundreds) and
        the prefill chunk (what one forward may add for a session catching up). The
        measurement is the cost model's prior: the forwards run later keep it current."""
        loop = asyncio.get_running_loop()
        costs = await loop.run_in_executor(self._executor, self._measure)
        self.costs = CostModel(costs)
        self._apply_costs()
        self.metrics.costs(self.cfg.adaptive.batch_tokens, self.prefill_chunk, self.costs.costs())
        log.info("forward cost calibrated", batch_tokens=self.cfg.adaptive.batch_tokens,
                 prefill_chunk=self.prefill_chunk,
                 costs_ms={n: round(c * 1000, 1) for n, c in costs.items()})

    def _apply_costs(self) -> None:
        """The budget target and the prefill chunk from the cost model's current estimates
        (those the user did not set)."""
        cm = self.costs
        if cm is None:
            return
        old = (self.cfg.adaptive.batch_tokens, self.prefill_chunk)
        if self._follow_knee and (k := cm.knee()) != old[0]:
            self.cfg.adaptive = dataclasses.replace(self.cfg.adaptive, batch_tokens=k)
            self.load.policy = self.cfg.adaptive
        if self._follow_chunk:
            self.prefill_chunk = cm.prefill_chunk()
        new = (self.cfg.adaptive.batch_tokens, self.prefill_chunk)
        if new != old:
            self.stats.cost_changes.append((self.stats.batches, self.stats.probes, *new))
            if self.stats.batches:
                log.info("forward cost moved", batch_tokens=new[0], prefill_chunk=new[1],
                         forwards=self.stats.batches)
            self.metrics.costs(new[0], new[1], cm.costs())
        elif cm.observations % 16 == 0:
            self.metrics.costs(new[0], new[1], cm.costs())

    def _timed_verify(self, work: list, chunk: int) -> tuple[list, float]:
        """The batch's forward and its device-synchronised seconds (forward thread)."""
        dev = self.engine.runner.device
        synchronize(dev)
        t0 = time.perf_counter()
        out = self.engine.verify_isolating(work, chunk)
        synchronize(dev)
        return out, time.perf_counter() - t0

    def _measure(self) -> dict[int, float]:
        """The start-up costs, through the scratch sequence later probes reuse (forward
        thread)."""
        self._probe = Probe(self.engine.runner)
        return forward_costs(self.engine.runner, probe=self._probe)

    def _time_probe(self, n: int) -> float | None:
        """Seconds of one scratch forward of n tokens; None if the pool has no room for it
        (forward thread)."""
        assert self._probe is not None  # made with the cost model (_measure)
        if not self._probe.fits(n):
            return None
        try:
            return self._probe.time(n)
        finally:
            self._probe.release()  # the sessions keep the whole pool between probes

    async def _maybe_probe(self) -> None:
        """With nothing to verify between rounds of live sessions (the edges that follow the
        hint): one timed forward of the size the cost model asks for, at most once per
        probe_every forwards (a block that arrives meanwhile waits for it)."""
        cm = self.costs
        if cm is None or not self.cfg.probe_every or self._since_probe < self.cfg.probe_every:
            return
        if not self.load.active(time.monotonic()):
            return
        n = cm.probe(self._follow_knee, self._follow_chunk)
        if n is None:
            return
        self._since_probe = 0
        loop = asyncio.get_running_loop()
        keepalive = asyncio.create_task(self._keep_alive([]))  # blocks arriving meanwhile
        try:
            seconds = await loop.run_in_executor(self._executor, self._time_probe, n)
        finally:
            keepalive.cancel()
        if seconds is not None:
            self.stats.probes += 1
            self.metrics.cost_probes.inc()
            cm.observe(n, seconds)
            self._apply_costs()

    def _waiting(self) -> int:
        """Blocks pulled and not yet in a batch (the deferred aside)."""
        return self._inbox.qsize() + len(self._ready)

    async def _settle(self, have: int) -> None:
        """Partitions are pulled in parallel: let blocks already on their way from other
        partitions land (a fetch hands its messages over within a few loop turns), stopping
        as soon as a few turns bring nothing; never wait for blocks not yet sent."""
        quiet = 0
        for _ in range(SETTLE_TURNS):
            if have + self._inbox.qsize() + len(self._deferred) >= self.cfg.max_batch:
                return
            n = self._inbox.qsize()
            await asyncio.sleep(0)
            quiet = quiet + 1 if self._inbox.qsize() == n else 0
            if quiet >= 3:
                return

    async def _prepare(self, done: asyncio.Event) -> None:
        """While a forward runs: take the blocks that arrive for the next one and decode and
        check what needs no session state, so the next forward can start right after."""
        while len(self._ready) + len(self._deferred) < self.cfg.max_batch:
            get = asyncio.ensure_future(self._inbox.get())
            end = asyncio.ensure_future(done.wait())
            await asyncio.wait((get, end), return_when=asyncio.FIRST_COMPLETED)
            end.cancel()
            if not get.done():
                get.cancel()  # a cancelled get leaves its message in the queue
                return
            self._room.set()
            m = get.result()
            parsed = await self._parse(m)
            if parsed is not None:
                self._ready.append((m, parsed))
                self.stats.prepared += 1
            if done.is_set():
                return

    async def _hold(self, msgs: list) -> None:
        """Wait (briefly, and only with nothing else queued) for blocks of active sessions
        that are due now, so that they share this forward instead of the next one."""
        in_hand = {sid for _, (sid, _) in self._deferred}
        for m, _ in msgs:
            try:
                in_hand.add(subjects.sid_of(m.subject))
            except ValueError:
                pass
        t0 = time.monotonic()
        while len(msgs) + len(self._deferred) < self.cfg.max_batch:
            until = self.load.hold_until(time.monotonic(), in_hand, self.cfg.batch_hold)
            left = (until or 0) - time.monotonic()
            if left <= 0:
                break
            try:
                m = await asyncio.wait_for(self._inbox.get(), left)
            except TimeoutError:
                break
            self._room.set()
            msgs.append((m, None))
            try:
                in_hand.add(subjects.sid_of(m.subject))
            except ValueError:
                pass
        self.stats.hold_s += time.monotonic() - t0
        self.metrics.hold_seconds.inc(time.monotonic() - t0)

    async def _start_observability(self) -> list[asyncio.Task]:
        """/metrics, /health and /ready (ready while pulling; 503 once draining), and the
        consumer-lag poll behind the lag gauges."""
        if self.cfg.metrics_port is None:
            return []
        app = metrics.app(self.metrics.registry,
                          lambda: self.ready.is_set() and not self._stop.is_set(),
                          lambda: {"worker": self.cfg.name,
                                   "partitions": sorted(self.leases.owned)})
        self.http = await HttpServer(app, self.cfg.metrics_host, self.cfg.metrics_port,
                                     "verifier-metrics").start()
        return [asyncio.create_task(metrics.poll_forever(
            lambda: self.metrics.poll_consumers(self.js, self.leases.owned), 2.0, "lag"))]

    async def _bind(self, p: int):
        await broker.ensure_partition_consumer(self.js, p, self.cfg.consumer)
        psub = await self.js.pull_subscribe_bind(subjects.partition_durable(p),
                                                 stream=subjects.STREAM)
        # the consumer's real ack wait (it may predate this worker's settings)
        info = await psub.consumer_info()
        if info.config.ack_wait:
            self._ack_wait_s = min(self._ack_wait_s, info.config.ack_wait)
        return psub

    async def _follow_leases(self) -> None:
        """Pull what the leases say, as soon as they change (not when the batch step is next
        free: a partition taken over would otherwise wait a whole forward)."""
        while True:
            await self.leases.changed.wait()
            self.leases.changed.clear()
            await self._sync_pullers()

    async def _sync_pullers(self) -> None:
        await self._stop_pulling([p for p in self._pullers if p not in self.leases.owned])
        new = sorted(set(self.leases.owned) - set(self._pullers))
        # bind them all first, so their first pulls go out together
        bound = await asyncio.gather(*(self._bind(p) for p in new), return_exceptions=True)
        for p, psub in zip(new, bound, strict=True):
            quit = asyncio.Event()
            task = asyncio.create_task(self._pull(p, self._inbox, quit,
                                                  None if isinstance(psub, BaseException) else psub))
            self._pullers[p] = (task, quit)

    async def _stop_pulling(self, parts: list[int]) -> None:
        """Stop pulling these partitions, letting a fetch in flight finish: a pull request
        cancelled on our side stays open on the server, which would hand its messages to an
        inbox nobody reads (they would wait out the ack wait). Called before a lease goes, so
        the next owner is the only one pulling once it can claim the partition."""
        stopping = [self._pullers.pop(p) for p in parts if p in self._pullers]
        for _, quit in stopping:
            quit.set()
        self._room.set()  # wake pullers waiting for room, so they see quit
        tasks = [t for t, _ in stopping]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.cfg.fetch_timeout_s + 1.0)
            for t in late:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pull(self, p: int, inbox: asyncio.Queue, quit: asyncio.Event, psub=None) -> None:
        """One partition's pull loop: keeps at most a batch's worth waiting locally, and
        survives broker outages (fetches fail until the connection is back)."""
        while not (self._stop.is_set() or quit.is_set()):
            try:
                if psub is None:
                    psub = await self._bind(p)
                room = self.cfg.max_batch - self._waiting()
                if room <= 0:  # wait until the batch step takes some
                    self._room.clear()
                    await self._room.wait()
                    continue
                for m in await psub.fetch(batch=room, timeout=self.cfg.fetch_timeout_s):
                    inbox.put_nowait(m)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pull failed; retrying", partition=p, error_type=type(exc).__name__,
                            error=str(exc))
                await asyncio.sleep(0.5)

    def log_stats(self, event: str = "verifier stats") -> None:
        st = self.stats
        up = time.monotonic() - st.ready_at if st.ready_at else 0.0
        log.info(event, worker=self.cfg.name, batches=st.batches, blocks=st.blocks,
                 tokens=st.tokens, busy_s=round(st.busy_s, 4), rejected=st.rejected,
                 kv_hits=st.kv_hits, kv_misses=st.kv_misses, sessions=len(self.sessions),
                 budget=st.budget, hold_s=round(st.hold_s, 4),
                 kv_bytes=self.sessions.kv_bytes(), batch_s=round(st.batch_s, 4),
                 # the control path's share: time per batch outside the forward, and how much
                 # of its life the worker spent in forwards
                 outside_per_batch_ms=round(1000 * (st.batch_s - st.busy_s)
                                            / max(1, st.batches), 3),
                 busy_fraction=round(st.busy_s / up, 4) if up else 0.0,
                 prefill_chunks=st.prefill_chunks, attention=self.engine.runner.attention,
                 cuda_graphs=self.engine.runner.graphs is not None)

    async def _on_session_msg(self, m) -> None:
        """Every session's open and close: per-edge session counts, and KV freed on close.
        Nothing here answers (the partition's owner rejects the session's blocks)."""
        try:
            sid = subjects.sid_of(m.subject)
            check_size(m.data, self.cfg.limits)
            msg = decode(m.data)
        except (ValueError, WireError) as exc:  # BlockError is a ValueError
            self.stats.dropped += 1
            log.warning("bad session message dropped", subject=m.subject, round=None,
                        error=str(exc)[:200])
            return
        if isinstance(msg, SessionOpened):
            self.admission.opened(sid)
            if sid not in self._closed and self.sessions.get(sid) is None:
                self._openings.add(sid, msg)
        elif isinstance(msg, SessionClosed):
            self._openings.discard(sid)
            self._closed[sid] = None  # its blocks still queued or prefilling are dropped
            while len(self._closed) > CLOSED_MEMORY:
                self._closed.popitem(last=False)
            self.admission.closed(sid)
            if (st := self.sessions.pop(sid)) is not None:
                self._release_on_forward_thread(st)
            self.load.forget(sid)
            log.debug("session closed", sid=sid)

    def _reclaim(self) -> None:
        """Forget sessions whose edge has gone silent (kill -9, a link that never came back:
        no SessionClosed will come). Their KV is freed on the forward thread and a growable
        pool gives the memory back; a session that returns is rebuilt from its log."""
        now = time.monotonic()
        if now - self._swept < min(1.0, self.cfg.reclaim.min_s / 4):
            return
        self._swept = now
        idle = self.sessions.idle(now, self.cfg.reclaim)
        for st in idle:
            self.sessions.pop(st.sid)
            self._release_on_forward_thread(st)
            self.load.forget(st.sid)
            self.stats.reclaimed += 1
            self.metrics.sessions_reclaimed.inc()
            log.info("session reclaimed", sid=st.sid, round=st.round,
                     idle_s=round(now - st.last_seen, 1),
                     interval_s=round(st.interval_s, 3) if st.interval_s else None,
                     after_s=round(self.cfg.reclaim.after_s(st), 1))
        if idle and not self.engine.pool.fixed:
            try:
                self._executor.submit(self.engine.pool.shrink)
            except RuntimeError:  # shut down: nothing runs any more
                pass

    def _release_on_forward_thread(self, st: SessionState) -> None:
        """A close may arrive while the session's block is in the forward: freeing its KV here
        would pull the cache from under that forward (and wait on the pool's lock, stalling the
        event loop). Queued on the forward thread, it runs once that batch is done."""
        try:
            self._executor.submit(SessionTable.release, st)
        except RuntimeError:  # the executor is shut down: no forward runs any more
            SessionTable.release(st)

    # -- one batch -----------------------------------------------------------------------

    async def _process(self, msgs) -> None:
        t_begin = time.perf_counter()
        try:
            await self._batch(msgs)
        finally:
            if self._preparing is not None:  # after this batch's verdicts are on their way
                await self._preparing
                self._preparing = None
            self.stats.batch_s += time.perf_counter() - t_begin

    async def _batch(self, msgs) -> None:
        t_pick = time.time()
        candidates = self._deferred + msgs
        self._deferred = []
        self._stage = {}
        work: list[tuple[object, SessionState, CheckedBlock, float]] = []
        raw: dict[int, DraftBlock] = {}  # the decoded block of each message, should it wait
        seen: set[str] = set()
        for m, pre in candidates:
            sid, block = pre if pre else (None, None)
            if block is None:
                parsed = await self._parse(m)
                if parsed is None:
                    continue
                sid, block = parsed
            if sid in self._closed:  # e.g. a client that hung up: no more work for it
                log.info("block of a closed session dropped", sid=sid, round=block.round)
                await _quietly(m.term())
                continue
            if sid in seen:  # one block per session per forward; the rest wait a step
                self._deferred.append((m, (sid, block)))
                continue
            try:
                item = await self._admit(m, sid, block)
            except Exception as exc:  # e.g. the broker went away while reading the log
                log.warning("could not admit block; it will be redelivered", sid=sid,
                            round=block.round, error=repr(exc))
                await _quietly(m.nak(delay=1.0))
                continue
            if item is not None:
                raw[id(m)] = block
                seen.add(sid)
                queued = max(0.0, t_pick - m.metadata.timestamp.timestamp())
                work.append((m, item[0], item[1], queued))
        work = await self._fit(work, raw)
        work = self._pace_chunks(work, raw)
        work = await self._compiled(work, raw)
        for _, st, _, _ in work:
            self._stage.setdefault(st.sid, ("verifying", 0, 0))
        await self._send_progress()
        if not work:
            return
        self.load.observe([st.sid for _, st, _, _ in work],
                          self._inbox.qsize() + len(self._deferred), time.monotonic())
        budget = self.stats.budget = self.load.budget(time.monotonic(), len(work))
        self.metrics.suggested_budget.set(budget)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        keepalive = asyncio.create_task(self._keep_alive(work))
        done = asyncio.Event()
        if self._prepare_ahead:
            self._preparing = asyncio.create_task(self._prepare(done))
        try:
            outcomes, forward_s = await loop.run_in_executor(
                self._executor, self._timed_verify, [(st, blk) for _, st, blk, _ in work],
                self.prefill_chunk)
        except Exception:  # outside any one session (verify_isolating catches theirs)
            self.stats.failed_batches += 1
            log.exception("batch forward failed; blocks will be redelivered",
                          sids=[st.sid for _, st, _, _ in work])
            for m, st, _, _ in work:
                self.sessions.free_kv(st.sid)
                await _quietly(m.nak(delay=1.0))
            return
        finally:
            keepalive.cancel()
            done.set()  # the next batch's decoding ends with the message in hand
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, Exception)]
        if failed:
            work, outcomes = await self._isolate(work, outcomes, failed)
            if not work:
                return
            forward_s = None  # retries inside: no measure of one forward's cost
        verify_s = time.perf_counter() - t0
        self.load.observe_verify(verify_s)
        self.stats.batches += 1
        self.stats.busy_s += verify_s
        self.stats.batch_sizes.append(len(work))
        batch_tokens = sum(o.new_tokens for o in outcomes)
        self.metrics.batch(len(work), batch_tokens, verify_s,
                           verify_s if forward_s is None else forward_s)
        # cached: what the verdicts report (each reused prompt token once per session)
        self.metrics.prompt_cache(sum(st.cached_tokens for (_, st, _, _), o in zip(
            work, outcomes, strict=True) if o.walk is not None), sum(o.computed for o in outcomes))
        if self.costs is not None and forward_s is not None:
            self.costs.observe(batch_tokens, forward_s)
            self._since_probe += 1
            self._apply_costs()
        pubs = []
        prefilling = []
        counted: list[tuple[int, int, int, bool]] = []  # for the metrics, once per forward
        for (m, st, blk, queued), out in zip(work, outcomes, strict=True):
            res = out.walk
            if res is None:  # still catching up: no verdict; its block goes first next step
                prefilling.append((m, (st.sid, raw[id(m)])))
                self.stats.prefill_chunks += 1
                self.metrics.prefill_chunks.inc()
                pubs.append(_quietly(m.in_progress()))
                self._note(st.sid, blk.round, "prefilling", st.kv.length if st.kv else 0,
                           len(st.committed))
                continue
            new = [blk.tokens[i - 1] for i in res.accepted] + [res.next_token]
            toks, finished = commit(new, st.generated, st.max_new_tokens, st.eos_ids)
            v = Verdict(
                v=SCHEMA_VERSION, round=blk.round, committed_len=len(st.committed),
                accepted=pack_ids(res.accepted), tokens=pack_ids(toks),
                next_token=res.next_token, bonus=res.bonus, finished=finished,
                worker=self.cfg.name, budget=budget, t=time.time(),
                timings=VerifyTimings(queued_s=queued, verify_s=verify_s, batch_size=len(work),
                                      batch_tokens=batch_tokens, kv_hit=out.kv_hit),
                # prompt tokens first reused since the last verdict (prefill chunks too)
                cached_tokens=st.cached_tokens,
                dtype=self.dtype,
                # exactly the committed tokens' (the round may be cut at EOS or the limit)
                **(to_wire(out.logprobs, len(toks)) if out.logprobs is not None else {}),
            )
            st.committed.extend(toks)
            st.cached_tokens = 0
            self.stats.tokens += len(toks)
            st.round += 1
            st.finished = finished
            data = encode(v)
            st.remember(blk.round, data)
            if finished:
                self.sessions.free_kv(st.sid)
                self.progress.forget(st.sid)
            self.stats.blocks += 1
            self.stats.kv_hits += out.kv_hit
            self.stats.kv_misses += not out.kv_hit
            counted.append((len(toks), len(res.accepted), max(blk.depths, default=0),
                            out.kv_hit))
            pubs.append(self._publish_then_ack(m, st.sid, blk.round, "verdict", data))
        self.metrics.verdicts(counted)
        # one line per forward: a line per verdict cost more than the verdict's own bookkeeping
        log.debug("verdicts", sids=[st.sid for _, st, _, _ in work],
                  rounds=[blk.round for _, _, blk, _ in work],
                  accepted=[c[1] for c in counted])
        for _, st, _, _ in work:  # closed while this batch was being formed: the forward
            if st.sid in self._closed:  # gave it a cache again, which nobody else would free
                SessionTable.release(st)
        self._deferred[:0] = prefilling
        pubs.append(self._send_progress())
        # Publishing and acking run beside the next batch (each handles its own failure): the
        # next forward need not wait for the broker's acknowledgements of this one's verdicts.
        task = asyncio.ensure_future(asyncio.gather(*pubs))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _compiled(self, work: list, raw: dict[int, DraftBlock]) -> list:
        """Blocks whose session's grammar is still compiling wait a step (compiles run on the
        grammar threads): a slow schema costs its own session, never the others in the batch.
        A compile that fails, or outlasts the grammar time limit, rejects the session."""
        ready, waiting = [], False
        for w in work:
            m, st, blk, _ = w
            try:
                fut = self.engine.grammar_compile(st)
                if fut is not None and fut.done():
                    fut.result()  # raises what the compile raised
            except Exception as exc:
                self._compiling.pop(st.sid, None)
                await self._reject(m, st.sid, blk.round, "invalid_grammar",
                                   f"the grammar did not compile: {exc}")
                continue
            if fut is None or fut.done():
                self._compiling.pop(st.sid, None)
                ready.append(w)
                continue
            limit = self.engine.grammars.timeout_s
            if time.monotonic() - self._compiling.setdefault(st.sid, time.monotonic()) > limit:
                self._compiling.pop(st.sid)
                await self._reject(m, st.sid, blk.round, "invalid_grammar",
                                   f"the grammar took longer than {limit:g} s to compile")
                continue
            waiting = True
            self._deferred.append((m, (st.sid, raw[id(m)])))
            self._note(st.sid, blk.round, "compiling")
        if waiting and not ready:
            await asyncio.sleep(0.05)  # nothing else to run: do not spin on the deferred
        return ready

    def _pace_chunks(self, work: list, raw: dict[int, DraftBlock]) -> list:
        """Sessions catching up add their chunk to every other forward while others are being
        verified. A running session's round meets at most two forwards (the one in progress
        when its block arrives and its own), so it pays for at most one chunk per round."""
        chunk = self.prefill_chunk
        have = {st.sid: self.engine.prefilled(st) for _, st, _, _ in work}
        catching = [w for w in work
                    if chunk and len(w[1].committed) - have[w[1].sid] > chunk]
        for _, st, blk, _ in catching:  # no verdict from this forward: say what it does
            self._note(st.sid, blk.round, "prefilling", have[st.sid], len(st.committed))
        if catching and len(catching) < len(work) and self._chunked_last:
            for m, st, _, _ in catching:
                self._deferred.append((m, (st.sid, raw[id(m)])))
            work = [w for w in work if w not in catching]
            catching = []
        self._chunked_last = bool(catching) and len(catching) < len(work)
        return work

    async def _fit(self, work: list, raw: dict[int, DraftBlock]) -> list:
        """Make room in the KV pool for the batch by evicting least recently used sessions'
        KV. A batch that does not fit even then is cut: the tail waits a step. A single
        session that can never fit is refused."""
        while work:
            need = self.engine.blocks_needed([(st, blk) for _, st, blk, _ in work])
            if self.sessions.make_room(need, keep={st.sid for _, st, _, _ in work}):
                return work
            if len(work) == 1:
                m, st, blk, _ = work.pop()
                pool = self.engine.pool
                await self._reject(m, st.sid, blk.round, "too_large",
                                   f"the session needs {len(st.committed) + len(blk.tokens)} KV "
                                   f"tokens; this verifier's pool holds {pool.capacity_tokens}")
                continue
            m, st, blk, _ = work.pop()
            self._deferred.append((m, (st.sid, raw[id(m)])))
            self._note(st.sid, blk.round, "waiting_room")
        return work

    async def _keep_alive(self, work: list) -> None:
        """A long forward (a long prompt's prefill on a CPU, a probe) must not look like a dead
        worker: while it runs, every block held here is marked in progress every third of the
        ack wait (JetStream keeps it ours), and its edge hears that it is being worked on every
        progress interval (its patience follows that, not a fixed wait)."""
        third = self._ack_wait_s / 3
        tick = min(self.progress.every_s, third)
        marked = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            held = self._held(work)
            for _, sid, round_no in held:
                self._note(sid, round_no, *self._stage.get(sid, ("queued", 0, 0)))
            calls = [self._send_progress()]
            if time.monotonic() - marked >= third - tick / 2:
                marked = time.monotonic()
                calls += [_quietly(m.in_progress()) for m, _, _ in held]
            await asyncio.gather(*calls)

    def _held(self, work: list) -> list[tuple[object, str, int]]:
        """Every block this worker holds now, as (message, session, round): in the forward,
        set aside for the next one, or pulled and waiting (the inbox: rounds read from bodies
        not checked yet; a report for a wrong round is ignored by its edge)."""
        held = [(m, st.sid, blk.round) for m, st, blk, _ in work]
        held += [(m, sid, blk.round) for m, (sid, blk) in self._deferred + self._ready]
        for m in list(self._inbox._queue):  # asyncio.Queue has no peek
            try:
                sid = subjects.sid_of(m.subject)
                check_size(m.data, self.cfg.limits)
                block = decode(m.data)
            except ValueError:  # WireError and BlockError are ValueErrors
                continue
            if isinstance(block, DraftBlock):
                held.append((m, sid, block.round))
        return held

    def _note(self, sid: str, round_no: int, stage: str, done: int = 0, total: int = 0) -> None:
        """What a held block without a verdict is doing; its edge is told (rate-limited)."""
        self._stage[sid] = (stage, done, total)
        if (report := self.progress.report(sid, round_no, stage, done, total)) is not None:
            self._outbox.append(report)

    async def _send_progress(self) -> None:
        """Publish the reports noted: core messages, best effort (a lost one costs its edge
        nothing but patience)."""
        out, self._outbox = self._outbox, []
        if out:
            await asyncio.gather(*(_quietly(self.nc.publish(subject, data))
                                   for subject, data in out))

    async def _isolate(self, work: list, outcomes: list, failed: list[int]) -> tuple[list, list]:
        """A forward raised and verify_isolating tried the sessions apart: those that failed
        alone are at fault. Each gets an internal_error rejection and its block is terminated
        (never redelivered to fail again), its state forgotten; the others keep their
        outcomes. If every session of a batch of several failed alone, the fault is not
        theirs (the device, the pool): they are redelivered, as a failed batch always was."""
        self.stats.failed_batches += 1
        if len(failed) == len(work) > 1:
            log.error("every session of the batch failed alone; blocks will be redelivered",
                      sids=[st.sid for _, st, _, _ in work], exc_info=outcomes[0])
            for m, st, _, _ in work:
                self.sessions.free_kv(st.sid)
                await _quietly(m.nak(delay=1.0))
            return [], []
        for i in failed:
            m, st, blk, _ = work[i]
            exc = outcomes[i]
            self.stats.faulty += 1
            log.error("session failed its forward alone; rejected", sid=st.sid,
                      round=blk.round, batch=len(work), exc_info=exc)
            self._closed[st.sid] = None  # over for its edge: its copies still queued go too
            if (gone := self.sessions.pop(st.sid)) is not None:
                self._release_on_forward_thread(gone)
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            await self._reject(m, st.sid, blk.round, "internal_error",
                               f"the verifier failed on this session: "
                               f"{type(exc).__name__}: {first_line}")
        bad = set(failed)
        keep = [i for i in range(len(work)) if i not in bad]
        return [work[i] for i in keep], [outcomes[i] for i in keep]

    async def _parse(self, m) -> tuple[str, DraftBlock] | None:
        try:
            sid = subjects.sid_of(m.subject)
        except ValueError:
            self.stats.dropped += 1
            log.warning("draft on a malformed subject; terminated", subject=m.subject, round=None)
            await _quietly(m.term())
            return None
        if m.metadata.num_delivered > 1:
            self.metrics.redeliveries.inc()
        block, err = None, None
        try:
            check_size(m.data, self.cfg.limits)
            block = decode(m.data)
            if not isinstance(block, DraftBlock):
                raise WireError(f"expected a draft block, got {type(block).__name__}")
        except BlockError as exc:
            err = exc
        except WireError as exc:
            err = BlockError("bad_message", str(exc)[:500])
        round_no = block.round if isinstance(block, DraftBlock) else -1
        try:  # per-edge limits before any real work; bad messages spend the allowance too
            self.admission.admit(sid, round_no)
        except BlockError as exc:
            err = exc
        if err is not None:
            await self._reject(m, sid, round_no, err.code, err.reason)
            return None
        age = time.time() - m.metadata.timestamp.timestamp()
        if age > self.cfg.limits.max_block_age_s:
            await self._reject(m, sid, block.round, "expired", f"block is {age:.0f}s old")
            return None
        return sid, block

    async def _admit(self, m, sid: str, block: DraftBlock):
        """Session state for the block (rebuilt from the log if needed) and its checks."""
        st = self.sessions.get(sid)
        if st is not None:
            st.saw(block.round, time.monotonic())
        if st is not None and block.round == st.round and block.digest and (
                block.digest != st.digest()):
            st = None  # our cached state diverged from the log (e.g. another worker's verdict)
        if st is None and block.round == 0 and (opened := self._openings.take(sid)):
            try:  # a new session: its state is its opening, as its log would say
                st = self._open(sid, opened)
            except BlockError as exc:
                await self._reject(m, sid, block.round, exc.code, str(exc))
                return None
        if st is None or block.round > st.round:
            try:
                st = await self._load(sid)
            except (LogError, BlockError) as exc:
                code = exc.code if isinstance(exc, BlockError) else "unknown_session"
                await self._reject(m, sid, block.round, code, str(exc))
                return None
            st.saw(block.round, time.monotonic())
        if block.round < st.round and block.round in st.last_verdicts:
            # A redelivery of a block we answered: answer again (same bytes and id; the
            # broker deduplicates, the edge ignores a round it has).
            await self._publish_then_ack(m, sid, block.round, "verdict",
                                         st.last_verdicts[block.round])
            return None
        try:
            checked = check_block(block, st, self.cfg.limits, self.engine.vocab_size)
        except BlockError as exc:
            await self._reject(m, sid, block.round, exc.code, exc.reason)
            return None
        return st, checked

    def _open(self, sid: str, opened: SessionOpened) -> SessionState:
        """A session that has had no verdict yet, from its opening."""
        check_opened(opened, self.cfg.limits, self.engine.vocab_size, self.cfg.tokenizer,
                     getattr(self.engine.model.config, "name_or_path", ""))
        st = SessionState.from_opened(sid, opened)
        self.sessions.put(st)
        return st

    async def _load(self, sid: str) -> SessionState:
        self.stats.log_reads += 1
        slog = await read_session(self.js, sid, drafts=False)
        if slog.opened is None:
            raise LogError(f"no SessionOpened for session {sid}")
        check_opened(slog.opened, self.cfg.limits, self.engine.vocab_size, self.cfg.tokenizer,
                     getattr(self.engine.model.config, "name_or_path", ""))
        self._openings.discard(sid)
        seq, next_round, finished = committed_sequence(slog)
        st = SessionState.from_opened(sid, slog.opened)
        st.committed, st.round, st.finished = seq, next_round, finished
        # reused prompt tokens its verdicts reported already (a rebuild does not count them)
        st.cached_reported = sum(v.cached_tokens for v in slog.verdicts())
        st._digest_len = -1  # C was replaced wholesale: forget the memoised digest
        for v in slog.verdicts()[-4:]:  # a redelivered block gets its verdict again, not "stale"
            st.remember(v.round, encode(v))
        self.sessions.put(st)
        log.info("session state rebuilt from log", sid=sid, round=next_round, length=len(seq))
        return st

    async def _reject(self, m, sid: str, round_no: int, code: str, reason: str) -> None:
        self.stats.rejected += 1
        self.progress.forget(sid)
        self.metrics.rejects.labels(code).inc()
        r = Rejected(v=SCHEMA_VERSION, round=round_no, code=code, reason=reason,
                     worker=self.cfg.name, t=time.time())
        try:
            if code == "rate_limited":
                # A flood must cost one cheap answer each: a core publish (the edge listens with
                # a core subscription), not logged per message (Admission logs the edge once).
                log.debug("block rejected", sid=sid, round=round_no, code=code)
                await self.nc.publish(subjects.verdict(sid), encode(r))
            else:
                log.warning("block rejected", sid=sid, round=round_no, code=code, reason=reason)
                await self.js.publish(
                    subjects.verdict(sid), encode(r),
                    headers={"Nats-Msg-Id": subjects.msg_id(sid, round_no, "rejected")})
        except Exception as exc:  # the rejection is advisory; never let it stop the worker
            log.warning("could not publish rejection", sid=sid, error_type=type(exc).__name__,
                        error=str(exc))
        await _quietly(m.term())

    async def _publish_then_ack(self, m, sid: str, round_no: int, kind: str, data: bytes) -> None:
        """Publish first, ack second: a crash in between costs a redelivery, never a verdict.
        If the broker is unreachable the block stays unacked and comes back; the session state
        remembers the verdict, so the redelivery is answered with the same bytes and id."""
        headers = {"Nats-Msg-Id": subjects.msg_id(sid, round_no, kind)}
        for attempt in range(3):
            try:
                await self.js.publish(subjects.verdict(sid), data, headers=headers, timeout=2.0)
                await m.ack()
                return
            except Exception as exc:
                log.warning("verdict publish failed", sid=sid, round=round_no,
                            attempt=attempt + 1, error=repr(exc))
                await asyncio.sleep(0.2 * (attempt + 1))


async def _drain_step(step: str, aw, timeout_s: float, **info) -> None:
    """Await one step of a drain for at most timeout_s (cancelling it then), logging it."""
    t0 = time.monotonic()
    log.info("drain step", step=step, **info)
    try:
        await asyncio.wait_for(aw, timeout_s)
    except TimeoutError:
        log.warning("drain step timed out; going on", step=step, timeout_s=timeout_s)
    except Exception as exc:
        log.warning("drain step failed; going on", step=step, error_type=type(exc).__name__,
                    error=str(exc))
    else:
        log.debug("drain step done", step=step, took_s=round(time.monotonic() - t0, 3))


async def _quietly(aw) -> None:
    """Acks, naks and progress marks are best effort: the broker redelivers on its own."""
    try:
        await aw
    except Exception as exc:
        log.debug("ack-side call failed", error=repr(exc))
