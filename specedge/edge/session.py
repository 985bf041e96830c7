"""One user's generation as a session over the broker: open, draft, publish, apply verdicts,
stream, close. The round is a small loop of thin async steps; model work runs in an executor
thread so the event loop always stays free to take a verdict."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
import structlog

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    DraftTimings,
    Progress,
    Rejected,
    Sampling,
    SessionClosed,
    SessionOpened,
    Verdict,
    WireError,
    decode,
    digest_ids,
    encode,
    pack_ids,
    unpack_ids,
)
from specedge import subjects
from specedge.config import SuffixConfig, TreeShape
from specedge.edge.drafter import Drafter, DraftTree, TreeBuilder
from specedge.edge.link import PROGRESS_MISSES, BrokerUnreachable, Link, WaitPolicy
from specedge.edge.proactive import Mode, Proactive
from specedge.edge.suffixdraft import (
    SuffixBuilder,
    SuffixDrafter,
    SuffixSource,
    accepted_by_source,
    merge,
    model_shape,
)
from specedge.execution.logprobs import TokenLogprob, from_wire

if TYPE_CHECKING:
    from schemas.wire import GrammarSpec
    from specedge.execution.grammar import Constraint

log = structlog.get_logger(__name__)

MAX_PROGRESS_EVERY_S = 60.0  # a reporting interval announced past this counts as this


class SessionRejected(RuntimeError):
    def __init__(self, r: Rejected):
        super().__init__(f"verifier rejected round {r.round}: {r.code}: {r.reason}")
        self.rejected = r


@dataclass
class RoundRecord:
    round: int
    nodes: int
    depth: int
    accepted: int
    committed: int
    draft_s: float  # drafting on the critical path (after the previous verdict)
    wait_s: float  # block published -> verdict received
    verify_s: float
    queued_s: float
    batch_size: int
    kv_hit: bool
    proactive_s: float = 0.0  # proactive drafting done while this round was in flight
    hidden_s: float = 0.0  # of which went into the tree the next round actually used
    hit: bool | None = None  # did the proactive guess come true (None: proactive off)
    react_s: float = 0.0  # verdict arrival -> the edge acting on it
    worker: str = ""  # which verifier answered
    cached_tokens: int = 0  # prompt tokens the verifier took from its prefix cache this round
    suffix_nodes: int = 0  # of `nodes`, those a suffix match proposed (not the draft model)
    suffix_accepted: int = 0  # of `accepted`, those a suffix match proposed


@dataclass
class SessionResult:
    session_id: str
    token_ids: list[int]
    text: str
    rounds: list[RoundRecord]
    ttft_s: float
    wall_s: float
    itl: list[float] = field(default_factory=list)  # one per token after the first
    # with SessionParams.logprobs >= 0: one per token of token_ids (the target's values)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    draft_cached_tokens: int = 0  # prompt tokens whose draft KV came from the edge's cache

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the verifiers served from their prefix caches: each verdict reports
        those first reused in its round (a rebuild's reuse of the same tokens is not counted
        again), so the sum is the session's, as the replay and the metrics count it."""
        return sum(r.cached_tokens for r in self.rounds)

    def summary(self) -> dict:
        sp = speculation([(r.nodes, r.depth, r.accepted, r.committed, r.suffix_nodes,
                           r.suffix_accepted) for r in self.rounds])
        itl = sorted(self.itl)
        return {
            "session_id": self.session_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "rounds": sp["rounds"],
            "tokens_per_round": sp["tokens_per_round"],
            "acceptance": sp["acceptance"],
            "accepted_by_source": sp["accepted_by_source"],
            "draft_tokens_by_source": sp["draft_tokens_by_source"],
            "ttft_s": self.ttft_s,
            "itl_s": statistics.median(itl) if itl else 0.0,
            "itl_p90_s": itl[int(0.9 * (len(itl) - 1))] if itl else 0.0,
            "wall_s": self.wall_s,
            "draft_s": sum(r.draft_s for r in self.rounds),
            "wait_s": sum(r.wait_s for r in self.rounds),
            "verify_s": sum(r.verify_s for r in self.rounds),
            "proactive_hit_rate": (sum(bool(r.hit) for r in self.rounds if r.hit is not None)
                                   / max(1, sum(r.hit is not None for r in self.rounds))),
            "hidden_s": sum(r.hidden_s for r in self.rounds),
            "proactive_s": sum(r.proactive_s for r in self.rounds),
            "react_max_s": max((r.react_s for r in self.rounds), default=0.0),
            "cached_tokens": self.cached_tokens,
            "draft_cached_tokens": self.draft_cached_tokens,
            "round_records": [dataclasses.asdict(r) for r in self.rounds],
        }


def speculation(rounds: list[tuple[int, ...]]) -> dict:
    """A session's speculation figures from its rounds' (nodes, depth, accepted, committed[,
    suffix_nodes, suffix_accepted]): rounds; draft_tokens, the tree nodes sent; accepted_tokens,
    the draft tokens the target accepted; tokens_per_round, committed tokens per round
    (accepted + the target's own next token, less any cut at EOS or the limit); acceptance,
    accepted_tokens over the summed tree depths: the share of the trees' reach that was used
    (for a chain, the usual per-token acceptance rate; 0 when nothing was drafted); and the
    drafted and accepted tokens by source: the draft model's or a suffix match's."""
    n = len(rounds)
    depth = sum(r[1] for r in rounds)
    nodes = sum(r[0] for r in rounds)
    accepted = sum(r[2] for r in rounds)
    s_nodes = sum(r[4] for r in rounds if len(r) > 5)
    s_acc = sum(r[5] for r in rounds if len(r) > 5)
    return {"rounds": n, "draft_tokens": nodes,
            "accepted_tokens": accepted,
            "tokens_per_round": sum(r[3] for r in rounds) / n if n else 0.0,
            "acceptance": accepted / depth if depth else 0.0,
            "draft_tokens_by_source": {"model": nodes - s_nodes, "suffix": s_nodes},
            "accepted_by_source": {"model": accepted - s_acc, "suffix": s_acc}}


@dataclass
class SessionParams:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    eos_ids: tuple[int, ...] = ()
    shape: TreeShape = field(default_factory=TreeShape)
    target_name: str = ""
    draft_name: str = ""
    # the longest wait for a verdict before looking for it (and re-publishing the block); the
    # wait itself is `verdict_wait_factor` measured round times, at least `verdict_wait_min_s`
    verdict_timeout_s: float = 30.0
    verdict_wait_factor: float = 5.0
    verdict_wait_min_s: float = 3.0
    max_retries: int = 5  # re-publishes of one block (each wait doubles) before TimeoutError
    # the broker out of reach this long (publishes unacknowledged, the connection down): the
    # session fails with BrokerUnreachable instead of retrying for ever
    give_up_s: float = 60.0
    publish_ack_s: float = 2.0  # one publish attempt waits this long for the broker's ack
    proactive: Mode = Mode.SINGLE
    # False: the first round carries the prompt alone (the first token after the target's
    # prefill only, not after the draft's prefill and tree too); the draft prefills after
    # publishing it (proactive) or after its verdict (proactive off: one machine's cores)
    first_tree: bool = True
    emulate_rtt_ms: float = 0.0  # half of it delays each publish, half each received verdict
    adaptive: bool = True  # resize the tree to the budget the verifier suggests (load hint)
    max_budget: int = 16  # never draft more nodes than this, whatever the hint
    # prompt tokens per draft forward while prefilling: other sessions sharing the draft model
    # (edge serve) wait at most one such forward, and a cancelled session stops between them
    prefill_chunk: int = 128
    tokenizer: str = ""  # the draft's tokenizer fingerprint (specedge.vocab); "" unknown
    # -1: none; k in 0..20: the verdicts carry each token's logprob and k alternatives
    logprobs: int = -1
    # the first shared_len prompt tokens cached under a name the verifiers share (their
    # --shared-prefix) instead of this edge's own scope ("": none)
    shared_prefix: str = ""
    shared_len: int = 0
    # structured output: the grammar (sent with the opening; the verifier masks the target
    # with it) and the edge's own matcher for it (specedge.execution.grammar.Constraint:
    # drafts masked alike; None drafts unmasked, still exact)
    grammar: GrammarSpec | None = None
    constraint: Constraint | None = None
    # with a draft model and a SuffixSource given to the session: how suffix-match branches
    # join the model's tree (specedge.edge.suffixdraft)
    suffix: SuffixConfig = field(default_factory=SuffixConfig)


class State(enum.StrEnum):
    """Where a session is; each transition is logged (debug) and timed in the round records."""

    OPENING = "opening"
    DRAFTING = "drafting"  # building this round's tree on the critical path
    IN_FLIGHT = "in_flight"  # block published; proactive drafting runs meanwhile
    APPLYING = "applying"  # verdict in: stop proactive work, commit, roll back or adopt
    CLOSED = "closed"


class EdgeSession:
    def __init__(self, nc, js, drafter: Drafter, executor: ThreadPoolExecutor,
                 params: SessionParams, on_tokens: Callable[[list[int]], None] | None = None,
                 sid: str | None = None, keep_draft_kv: bool = False, link: Link | None = None,
                 suffix: SuffixSource | None = None):
        """The session owns `drafter`: its KV goes back to the runner's pool when the session
        ends (keep_draft_kv keeps it, for inspection). `link`: the connection's shared state
        (Link.of(nc) if not given). `drafter` may be a SuffixDrafter (no model: every tree
        from a suffix match); with a draft model, `suffix` adds suffix-match branches to its
        trees as params.suffix says."""
        self.nc, self.js, self.drafter, self.ex = nc, js, drafter, executor
        self.model_free = isinstance(drafter, SuffixDrafter)
        self.suffix = drafter.source if self.model_free else (
            suffix if suffix is not None and params.suffix.on else None)
        self.link = link or Link.of(nc)
        self.keep_draft_kv = keep_draft_kv
        self._inflight: concurrent.futures.Future | None = None  # the model step running
        self._pro: Proactive | None = None
        self.p = params
        self.sid = sid or subjects.new_session_id()
        self.on_tokens = on_tokens
        self.committed = list(params.prompt_ids)
        self.generated: list[int] = []
        self.token_logprobs: list[TokenLogprob] = []  # per generated token, if asked for
        self.draft_cached = 0  # prompt tokens whose draft KV the pool's cache supplied
        self.rounds: list[RoundRecord] = []  # grows as verdicts come (read by a stopped caller)
        self.round = 0
        self.shape = params.shape.check()  # the tree shape of the next round
        self.state = State.OPENING
        self.log = log.bind(sid=self.sid)
        self._inbox: dict[int, Verdict | Rejected] = {}
        self._arrived = asyncio.Event()
        self._arrival: dict[int, float] = {}
        # Stream lookups stop after this many failed on a link that stayed up (an edge user
        # without $JS.API access: the broker refuses, the request times out); a lookup that
        # fails while the link is down says nothing about that and does not count.
        self._lookup_strikes = 0
        self.lookups_failed = 0  # counted or not
        self._look_now = False  # a reconnect or a duplicate ack: look the verdict up at once
        self.waits = WaitPolicy(params.verdict_wait_factor, params.verdict_wait_min_s,
                                params.verdict_timeout_s)
        # the verifier's progress reports (schemas.Progress): the round last reported on and
        # when, the longest reporting interval a verifier announced, the last report
        self._heard: tuple[int, float] = (-1, 0.0)
        self._every_s = 0.0
        self.progress: Progress | None = None
        self.progress_heard = 0
        self.republished = 0  # blocks published again: nobody reported working on them

    def _to(self, state: State) -> None:
        self.log.debug("state", round=self.round, state=str(state), was=str(self.state))
        self.state = state

    async def _on_verdict(self, m) -> None:
        if self.p.emulate_rtt_ms:
            await asyncio.sleep(self.p.emulate_rtt_ms / 2000)
        try:
            msg = decode(m.data)
        except WireError as exc:
            self.log.warning("undecodable verdict ignored", error=str(exc))
            return
        if isinstance(msg, Verdict | Rejected) and msg.round >= self.round:
            have = self._inbox.get(msg.round)
            # a verdict beats a rejection of the same round (e.g. a worker that saw a stale copy)
            if have is None or (isinstance(have, Rejected) and isinstance(msg, Verdict)):
                self._inbox[msg.round] = msg
                self._arrival.setdefault(msg.round, time.perf_counter())
            self._arrived.set()

    async def _on_progress(self, m) -> None:
        """A verifier holding this round's block is working on it: the wait starts again."""
        try:
            msg = decode(m.data)
        except WireError:
            return
        if not isinstance(msg, Progress) or msg.round != self.round:
            return
        self._heard = (msg.round, time.monotonic())
        self._every_s = max(self._every_s, min(msg.every_s, MAX_PROGRESS_EVERY_S))
        if self.progress is None or (self.progress.round, self.progress.stage) != (
                msg.round, msg.stage):
            self.log.debug("verifier working", round=msg.round, stage=msg.stage,
                           done=msg.done, total=msg.total, worker=msg.worker)
        self.progress = msg
        self.progress_heard += 1

    def _patience(self, round_s: float | None, attempt: int = 0) -> float:
        """How long silence may last before the block counts as lost: the wait policy's, and
        never less than a few of the reporting intervals a verifier announced (silence
        shorter than that says nothing)."""
        return max(self.waits.wait_s(round_s, attempt), PROGRESS_MISSES * self._every_s)

    def _wake(self) -> None:
        """The link came back: whatever we wait for may have been missed while it was down."""
        self._look_now = True
        self._arrived.set()

    def _check_link(self, what: str) -> None:
        down = self.link.down_for()
        if down > self.p.give_up_s:
            raise BrokerUnreachable(down, self.p.give_up_s, what)

    def _left_s(self) -> float:
        """Until the give-up bound if the link stays down (a little past it, to be sure)."""
        return max(0.05, self.p.give_up_s - self.link.down_for() + 0.05)

    async def _publish(self, subject: str, msg, kind: str, round_no: int) -> bool:
        """Publish to the stream, retrying through broker outages until the link has been down
        for `give_up_s` (then BrokerUnreachable). The message id makes a retry of an
        already-stored message a no-op; returns whether the broker said it was a duplicate (it
        had the message before: its answer may have been published while we were away). A
        reconnect cuts the wait for an acknowledgement short: a request sent on the old
        connection is answered on no connection."""
        if self.p.emulate_rtt_ms:
            await asyncio.sleep(self.p.emulate_rtt_ms / 2000)
        data = encode(msg)
        headers = {"Nats-Msg-Id": subjects.msg_id(self.sid, round_no, kind)}
        delay = 0.1
        while True:
            self._check_link(f"publishing {kind} of round {round_no}")
            up, sent = self.link.next_up(), time.monotonic()
            pub = asyncio.ensure_future(self.js.publish(subject, data, headers=headers,
                                                        timeout=self.p.publish_ack_s))
            try:  # ... and not past the give-up bound
                await asyncio.wait({pub, up}, timeout=self._left_s(),
                                   return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                pub.cancel()
                raise
            if not pub.done():
                pub.cancel()
                if up.done():  # reconnected meanwhile: send it again on the new connection
                    self.log.info("reconnected; publishing again", kind=kind, round=round_no)
                continue
            try:
                ack = pub.result()
            except (TimeoutError, nats.errors.Error) as exc:
                self.link.failed(sent)
                self.log.warning("publish failed; retrying", kind=kind, round=round_no,
                                 error_type=type(exc).__name__, error=str(exc),
                                 down_s=round(self.link.down_for(), 1))
                # back off, but not past a reconnect
                await asyncio.wait({self.link.next_up()}, timeout=min(delay, self._left_s()))
                delay = min(2.0, delay * 2)
                continue
            self.link.ok()
            return bool(getattr(ack, "duplicate", False))

    async def _close_on_broker(self, reason: str) -> None:
        """Tell the verifiers the session is over. With the link up: one acknowledged publish;
        otherwise (or if that fails) a plain publish, which nats-py holds while reconnecting
        and sends once the link is back (the stream stores it either way; the message id
        deduplicates)."""
        closed = SessionClosed(v=SCHEMA_VERSION, reason=reason, t=time.time())
        subject, data = subjects.session(self.sid), encode(closed)
        headers = {"Nats-Msg-Id": subjects.msg_id(self.sid, self.round, "close")}
        if self.link.connected() and not self.link.down_since:
            try:
                await self.js.publish(subject, data, headers=headers,
                                      timeout=self.p.publish_ack_s)
                return
            except Exception as exc:
                self.log.info("close not acknowledged; sent when the link allows",
                              error_type=type(exc).__name__, error=str(exc))
        try:
            await self.nc.publish(subject, data, headers=headers)
        except Exception as exc:  # closed connection, full reconnect buffer: the verifier
            self.log.info("close not sent", error_type=type(exc).__name__,  # reclaims it
                          error=str(exc))

    async def _lookup_verdict(self) -> None:
        """A verdict published while we were disconnected never reaches our subscription; the
        stream has it. An edge user without JetStream API access cannot read it (the broker
        refuses, the request times out): after two such failures on a link that stayed up,
        rely on the re-publish, which a verifier answers by replaying the verdict it remembers
        or rebuilds from the log."""
        if self._lookup_strikes >= 2:
            return
        reconnects, was_up, t0 = self.link.reconnects, self.link.connected(), time.monotonic()
        try:
            raw = await asyncio.wait_for(
                self.js.get_last_msg(subjects.STREAM, subjects.verdict(self.sid)), 2.0)
        except nats.js.errors.NotFoundError:
            return
        except Exception as exc:
            # It counts only if the link itself answers (a PING's PONG): a lookup lost on a
            # silent link (nats-py has not noticed yet) says nothing about our permissions.
            counted = False
            if was_up and self.link.connected() and self.link.reconnects == reconnects:
                try:
                    await self.nc.flush(timeout=1)
                    counted = True
                except Exception:
                    self.link.failed(t0)
            self._lookup_strikes += counted
            self.lookups_failed += 1
            self.log.info("stream lookup failed", round=self.round, error_type=type(exc).__name__,
                          error=str(exc), counted=counted, disabled=self._lookup_strikes >= 2)
            return
        try:
            msg = decode(raw.data)
        except WireError:
            return
        if isinstance(msg, Verdict | Rejected) and msg.round == self.round:
            self._lookup_strikes = 0
            if self.round not in self._inbox:
                self.log.info("verdict found in the stream", round=self.round)
            self._inbox.setdefault(msg.round, msg)
            self._arrival.setdefault(msg.round, time.perf_counter())

    async def _await_verdict(self, block: DraftBlock, t_sent: float) -> tuple[Verdict, float]:
        """Wait for this round's verdict. At a reconnect or a duplicate acknowledgement, look it
        up in the stream at once. If none arrives within the wait derived from the measured
        round time (counted from the block's first publish, and again from every progress
        report of a verifier working on it), look it up, then re-publish the block; with the
        link down, wait for it (up to the give-up bound) instead. Only silence counts: the
        re-publishes before TimeoutError are those with nobody reporting in between."""
        attempt = 0
        round_s = self.link.round_s if self.round > 0 else None  # round 0 includes the prefill
        deadline = t_sent + self._patience(round_s)
        while True:
            if self.round in self._inbox:
                msg = self._inbox.pop(self.round)
                if isinstance(msg, Rejected):
                    raise SessionRejected(msg)
                self.link.ok()
                return msg, self._arrival.pop(self.round)
            if self._look_now:
                self._look_now = False
                await self._lookup_verdict()
                continue
            self._check_link(f"waiting for the verdict of round {self.round}")
            left = deadline - time.monotonic()
            if left > 0:
                self._arrived.clear()
                if self.round in self._inbox or self._look_now:
                    continue
                try:  # wake at least every second to check the give-up clock
                    await asyncio.wait_for(self._arrived.wait(), min(left, 1.0))
                except TimeoutError:
                    pass
                continue
            if not self.link.connected():  # a re-publish waits for the link anyway
                deadline = time.monotonic() + 1.0
                continue
            heard_round, heard_at = self._heard
            if heard_round == self.round and heard_at + self._patience(round_s) > time.monotonic():
                # a verifier reported working on it since: slow, not lost; wait afresh
                deadline, attempt = heard_at + self._patience(round_s), 0
                continue
            await self._lookup_verdict()
            if self.round in self._inbox:
                continue
            if attempt >= self.p.max_retries:
                raise TimeoutError(f"session {self.sid}: no verdict for round {self.round} "
                                   f"after {attempt} re-publishes")
            attempt += 1
            self.republished += 1
            self.log.warning("no verdict yet; re-publishing block", round=self.round,
                             attempt=attempt)
            # A fresh id: the first copy is stored (its publish was acknowledged) but was lost
            # downstream (e.g. delivery attempts ran out during an outage), so the same id
            # would be dropped as a duplicate. A second copy is harmless: the verifier
            # answers a round it has already answered with the same verdict. (Numbered per
            # session: `attempt` starts again after progress, an id must not.)
            if await self._publish(subjects.draft(self.sid), block,
                                   f"draft.{self.republished}", self.round):
                self._look_now = True
            deadline = time.monotonic() + self._patience(round_s, attempt)

    async def _run_model(self, fn, *args):
        self._inflight = self.ex.submit(fn, *args)
        return await asyncio.wrap_future(self._inflight)

    async def _release(self) -> None:
        """Stop this session's model work and give its draft KV back: proactive work stops
        between forwards, a forward already running is waited for (it may not be torn out
        from under other sessions it is packed with), then the KV is freed."""
        if self._pro is not None:
            pro, self._pro = self._pro, None
            await pro.resolve([])
        if self._inflight is not None and not self._inflight.done():
            await asyncio.wrap_future(self._inflight)
        if not self.keep_draft_kv:
            try:  # what it computed stays cached for a follow-up turn (if the pool caches)
                await self._run_model(self._remember_and_close)
            except RuntimeError:  # the executor is shut down (the process is stopping)
                self.drafter.close()

    def _remember_and_close(self) -> None:
        self.drafter.remember(self.committed)
        self.drafter.close()
        if self.suffix is not None:  # the tenant's next requests draft from this one too
            self.suffix.finish(self.committed)

    async def _prefill_draft(self) -> None:
        """The draft's KV of the context but its last token (the next tree's first forward
        recomputes that), in prefill_chunk pieces; what the pool's cache holds is reused."""
        prompt = self.committed[:-1] or self.committed
        self.draft_cached = await self._run_model(self.drafter.reuse, self.committed)
        chunk = max(1, self.p.prefill_chunk)
        for end in range(min(self.draft_cached + chunk, len(prompt)), len(prompt) + chunk,
                         chunk):
            await self._run_model(self.drafter.catch_up, prompt[:end])
        await self._run_model(self.drafter.remember, prompt)

    def _builder(self, plain: bool = False) -> TreeBuilder | SuffixBuilder:
        """This round's tree builder: a suffix match's alone, or the draft model's (its share
        of the budget when suffix branches join it); `plain`: the root alone."""
        args = (self.committed, self.shape, self.p.sampling, len(self.p.prompt_ids),
                self.p.constraint)
        if plain:
            return TreeBuilder(self.drafter, self.committed,
                               TreeShape(0, self.shape.depth, self.shape.width, self.shape.topk),
                               *args[2:])
        if self.model_free:
            shape = self.shape
            left = max(1, self.p.max_new_tokens - len(self.generated))
            if shape.depth > left:  # nodes past the token limit would never be committed
                shape = TreeShape(shape.budget, left, shape.width, shape.topk)
            return SuffixBuilder(self.suffix, self.committed, shape, *args[2:])
        return TreeBuilder(self.drafter, self.committed, self._model_shape(), *args[2:])

    def _suffix_depth(self) -> int:
        """How deep suffix branches reach: a copied span may run past the model's depth, but
        never past the tokens left to generate (nor past the verifiers' depth)."""
        left = max(1, self.p.max_new_tokens - len(self.generated))
        return min(max(self.shape.depth, self.p.suffix.max_depth), left)

    def _model_shape(self):
        return model_shape(self.shape, self.suffix, self.p.suffix, self.committed,
                           self._suffix_depth())

    def _merge_suffix(self, tree: DraftTree) -> None:
        """Suffix-match branches into the model's finished tree, up to the round's budget."""
        if self.suffix is None or self.model_free or not self.shape.budget:
            return
        p = self.suffix.propose(self.committed, self.shape.budget, self._suffix_depth())
        if p.match_len >= self.p.suffix.min_match:
            merge(tree, p, self.shape.budget)

    async def _finish(self, builder: TreeBuilder | SuffixBuilder, merge: bool = True
                      ) -> tuple[DraftTree, float]:
        t0 = time.perf_counter()
        if self.model_free:  # well under a millisecond a round: no thread hop for it
            builder.run()
        while not builder.done:
            await self._run_model(builder.step)
        if merge:  # not into a plain first round
            self._merge_suffix(builder.tree)  # likewise
        return builder.tree, time.perf_counter() - t0

    async def run(self) -> SessionResult:
        t_start = time.perf_counter()
        self._check_link("opening the session")
        sub = await self.nc.subscribe(subjects.verdict(self.sid), cb=self._on_verdict)
        unfollow = await self.link.follow_progress(self.sid, self._on_progress)
        unlisten = self.link.listen(self._wake)
        rounds = self.rounds
        t_first, t_last, itl = None, None, []
        try:
            opened = SessionOpened(
                v=SCHEMA_VERSION, prompt=pack_ids(self.p.prompt_ids), sampling=self.p.sampling,
                seed=self.p.seed, max_new_tokens=self.p.max_new_tokens,
                eos_ids=pack_ids(self.p.eos_ids), target=self.p.target_name,
                draft=self.p.draft_name, vocab_size=self.drafter.vocab_size, t=time.time(),
                tokenizer=self.p.tokenizer, logprobs=self.p.logprobs, grammar=self.p.grammar,
                shared_prefix=self.p.shared_prefix, shared_len=self.p.shared_len)
            await self._publish(subjects.session(self.sid), opened, "open", 0)
            self.log.info("session opened", prompt_tokens=len(self.p.prompt_ids))
            # budget 0: plain decoding, no draft prefill
            prefill = bool(self.shape.budget) and not self.model_free
            plain_first = prefill and not self.p.first_tree
            late_prefill = plain_first  # still to run after the plain first round
            if prefill and not plain_first:
                await self._prefill_draft()
            finished = False
            pending = self._builder(plain=plain_first)
            hidden_s, hit = 0.0, None
            while not finished:
                if late_prefill and self.round == 1:  # the prompt's first token is in
                    await self._prefill_draft()
                self._to(State.DRAFTING)  # fresh tree, or the rest of the proactive head's
                tree, draft_s = await self._finish(pending,
                                                   merge=not (plain_first and self.round == 0))
                block = DraftBlock(
                    v=SCHEMA_VERSION, round=self.round, committed_len=len(self.committed),
                    root=self.committed[-1], tokens=pack_ids(tree.tokens),
                    parents=pack_ids(tree.parents), digest=digest_ids(self.committed),
                    t=time.time(), suffix=pack_ids(tree.suffix),
                    timings=DraftTimings(
                        draft_s=draft_s, proactive=hit is True,
                        proactive_s=hidden_s if hit else 0.0,
                        guess="" if self.round == 0 else
                        ("off" if self.p.proactive is Mode.OFF else
                         {True: "hit", False: "miss", None: ""}[hit])))
                t_pub, t_sent = time.perf_counter(), time.monotonic()
                if await self._publish(subjects.draft(self.sid), block, "draft", self.round):
                    self._look_now = True  # stored before: its verdict may be out already
                self._to(State.IN_FLIGHT)  # draft ahead on a guess while the verifier works
                if late_prefill and self.round == 0 and self.p.proactive is not Mode.OFF:
                    await self._prefill_draft()  # the edge's own cores: beside the verifier
                    late_prefill = False
                pro = self._pro = None
                # the model drafted this round (a merged tree may be all suffix branches:
                # then the draft KV lacks the context's tail, nothing to fork from)
                if (self.p.proactive is not Mode.OFF and tree.size and not self.model_free
                        and self.drafter.kv_len >= tree.committed_len):
                    pro = self._pro = Proactive(self.committed, tree, self.drafter,
                                                self._model_shape(), self.p.proactive,
                                                self._run_model)
                    pro.start()
                v, t_arrival = await self._await_verdict(block, t_sent)
                self._to(State.APPLYING)
                wait_s = t_arrival - t_pub
                if self.round > 0:
                    self.link.observe_round(wait_s)
                toks = unpack_ids(v.tokens)
                accepted = unpack_ids(v.accepted)
                lps = (from_wire(toks, v.logprobs, v.top_ids, v.top_logprobs)
                       if self.p.logprobs >= 0 else [])  # before any state changes
                after = self.committed + toks
                head = await pro.resolve(after) if pro else None
                self._pro = None
                react_s = time.perf_counter() - t_arrival
                if head is not None:
                    old, self.drafter, pending = self.drafter, head.drafter, head.builder
                    await self._run_model(old.close)
                    hidden_s, hit = head.busy_s, True
                else:
                    if tree.size:
                        await self._run_model(self.drafter.rollback, tree, accepted)
                    hit = None if pro is None or v.finished else False
                    hidden_s = 0.0
                if self.suffix is not None:  # its proposal for this round, judged
                    self.suffix.judge(len(self.committed), toks)
                self.committed.extend(toks)
                self.generated.extend(toks)
                self.token_logprobs.extend(lps)
                if self.p.adaptive and v.budget > 0 and self.shape.budget > 0:
                    self.shape = self.p.shape.with_budget(min(v.budget, self.p.max_budget))
                if head is None:
                    pending = self._builder()
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    itl.extend([(now - t_first) / max(len(toks) - 1, 1)] * (len(toks) - 1))
                else:
                    itl.extend([(now - t_last) / max(len(toks), 1)] * len(toks))
                t_last = now
                rounds.append(RoundRecord(
                    self.round, tree.size, max(tree.depths, default=0), len(accepted), len(toks),
                    draft_s, wait_s, v.timings.verify_s, v.timings.queued_s,
                    v.timings.batch_size, v.timings.kv_hit,
                    proactive_s=pro.busy_s if pro else 0.0, hidden_s=hidden_s, hit=hit,
                    react_s=react_s, worker=v.worker, cached_tokens=v.cached_tokens,
                    suffix_nodes=len(tree.suffix),
                    suffix_accepted=accepted_by_source(tree, accepted)))
                self.log.debug("round done", round=self.round, accepted=len(accepted),
                               nodes=tree.size, draft_s=round(draft_s, 4), wait_s=round(wait_s, 4),
                               hit=hit)
                if self.on_tokens and toks:
                    self.on_tokens(toks)
                finished = v.finished
                self.round += 1
            # the answer is complete: a link lost now costs the verifier a reclaim, not the user
            await self._close_on_broker("done")
        except BaseException as exc:
            reason = "unreachable" if isinstance(exc, BrokerUnreachable) else "error"
            try:
                await asyncio.shield(self._close_on_broker(reason))
            except Exception:
                pass
            raise
        finally:
            unlisten()
            await asyncio.shield(self._release())
            unfollow()
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection: nothing to unsubscribe from
                self.log.debug("unsubscribe failed", error_type=type(exc).__name__)
        self._to(State.CLOSED)
        wall = time.perf_counter() - t_start
        self.log.info("session finished", tokens=len(self.generated), rounds=len(rounds),
                      wall_s=round(wall, 3))
        return SessionResult(self.sid, self.generated, "", rounds,
                             (t_first - t_start) if t_first else wall, wall, itl,
                             logprobs=self.token_logprobs, draft_cached_tokens=self.draft_cached)
