"""One user's generation as a session over the broker: open, draft, publish, apply verdicts,
stream, close. The round is a small loop of thin async steps; model work runs in an executor
thread so the event loop always stays free to take a verdict."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    DraftTimings,
    Rejected,
    Sampling,
    SessionClosed,
    SessionOpened,
    Verdict,
    WireError,
    decode,
    encode,
    pack_ids,
    unpack_ids,
)
from specedge import subjects
from specedge.config import TreeShape
from specedge.edge.drafter import Drafter, DraftTree, TreeBuilder

log = structlog.get_logger(__name__)


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
    draft_s: float
    wait_s: float  # block published -> verdict received
    verify_s: float
    queued_s: float
    batch_size: int
    kv_hit: bool


@dataclass
class SessionResult:
    session_id: str
    token_ids: list[int]
    text: str
    rounds: list[RoundRecord]
    ttft_s: float
    wall_s: float
    itl: list[float] = field(default_factory=list)  # one per token after the first

    def summary(self) -> dict:
        n = len(self.rounds)
        drafted = sum(r.depth for r in self.rounds)
        itl = sorted(self.itl)
        return {
            "session_id": self.session_id,
            "text": self.text,
            "token_ids": self.token_ids,
            "rounds": n,
            "tokens_per_round": len(self.token_ids) / n if n else 0.0,
            # accepted draft tokens / drafted depth: how much of the tree's reach was used
            "acceptance": sum(r.accepted for r in self.rounds) / drafted if drafted else 0.0,
            "ttft_s": self.ttft_s,
            "itl_s": statistics.median(itl) if itl else 0.0,
            "itl_p90_s": itl[int(0.9 * (len(itl) - 1))] if itl else 0.0,
            "wall_s": self.wall_s,
            "draft_s": sum(r.draft_s for r in self.rounds),
            "wait_s": sum(r.wait_s for r in self.rounds),
            "verify_s": sum(r.verify_s for r in self.rounds),
        }


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
    verdict_timeout_s: float = 30.0
    max_retries: int = 5


class EdgeSession:
    def __init__(self, nc, js, drafter: Drafter, executor: ThreadPoolExecutor,
                 params: SessionParams, on_tokens: Callable[[list[int]], None] | None = None,
                 sid: str | None = None):
        self.nc, self.js, self.drafter, self.ex = nc, js, drafter, executor
        self.p = params
        self.sid = sid or subjects.new_session_id()
        self.on_tokens = on_tokens
        self.committed = list(params.prompt_ids)
        self.generated: list[int] = []
        self.round = 0
        self.log = log.bind(sid=self.sid)
        self._inbox: dict[int, Verdict | Rejected] = {}
        self._arrived = asyncio.Event()

    async def _on_verdict(self, m) -> None:
        try:
            msg = decode(m.data)
        except WireError as exc:
            self.log.warning("undecodable verdict ignored", error=str(exc))
            return
        if isinstance(msg, Verdict | Rejected) and msg.round >= self.round:
            self._inbox.setdefault(msg.round, msg)
            self._arrived.set()

    async def _publish(self, subject: str, msg, kind: str, round_no: int) -> None:
        await self.js.publish(subject, encode(msg),
                              headers={"Nats-Msg-Id": subjects.msg_id(self.sid, round_no, kind)})

    async def _await_verdict(self, block: DraftBlock) -> Verdict:
        """Wait for this round's verdict; re-publish the same block (same message id, so the
        broker deduplicates) if none arrives in time."""
        for attempt in range(self.p.max_retries + 1):
            deadline = time.monotonic() + self.p.verdict_timeout_s
            while self.round not in self._inbox:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            if self.round in self._inbox:
                msg = self._inbox.pop(self.round)
                if isinstance(msg, Rejected):
                    raise SessionRejected(msg)
                return msg
            self.log.warning("no verdict yet; re-publishing block", round=self.round,
                             attempt=attempt + 1)
            await self._publish(subjects.draft(self.sid), block, "draft", self.round)
        raise TimeoutError(f"session {self.sid}: no verdict for round {self.round} after "
                           f"{self.p.max_retries + 1} attempts")

    async def _run_model(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.ex, fn, *args)

    async def _draft(self) -> tuple[DraftTree, float]:
        t0 = time.perf_counter()
        builder = TreeBuilder(self.drafter, self.committed, self.p.shape)
        while not builder.done:
            await self._run_model(builder.step)
        return builder.tree, time.perf_counter() - t0

    async def run(self) -> SessionResult:
        t_start = time.perf_counter()
        sub = await self.nc.subscribe(subjects.verdict(self.sid), cb=self._on_verdict)
        rounds: list[RoundRecord] = []
        t_first, t_last, itl = None, None, []
        try:
            opened = SessionOpened(
                v=SCHEMA_VERSION, prompt=pack_ids(self.p.prompt_ids), sampling=self.p.sampling,
                seed=self.p.seed, max_new_tokens=self.p.max_new_tokens,
                eos_ids=pack_ids(self.p.eos_ids), target=self.p.target_name,
                draft=self.p.draft_name, vocab_size=self.drafter.vocab_size, t=time.time())
            await self._publish(subjects.session(self.sid), opened, "open", 0)
            self.log.info("session opened", prompt_tokens=len(self.p.prompt_ids))
            # Prefill everything but the last prompt token; the first round recomputes it.
            await self._run_model(self.drafter.catch_up, self.committed[:-1] or self.committed)
            finished = False
            while not finished:
                tree, draft_s = await self._draft()
                block = DraftBlock(
                    v=SCHEMA_VERSION, round=self.round, committed_len=len(self.committed),
                    root=self.committed[-1], tokens=pack_ids(tree.tokens),
                    parents=pack_ids(tree.parents), t=time.time(),
                    timings=DraftTimings(draft_s=draft_s))
                t_pub = time.perf_counter()
                await self._publish(subjects.draft(self.sid), block, "draft", self.round)
                v = await self._await_verdict(block)
                wait_s = time.perf_counter() - t_pub
                toks = unpack_ids(v.tokens)
                accepted = unpack_ids(v.accepted)
                await self._run_model(self.drafter.rollback, tree, accepted)
                self.committed.extend(toks)
                self.generated.extend(toks)
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
                    v.timings.batch_size, v.timings.kv_hit))
                self.log.debug("round done", round=self.round, accepted=len(accepted),
                               nodes=tree.size, draft_s=round(draft_s, 4), wait_s=round(wait_s, 4))
                if self.on_tokens and toks:
                    self.on_tokens(toks)
                finished = v.finished
                self.round += 1
            await self._publish(subjects.session(self.sid),
                                SessionClosed(v=SCHEMA_VERSION, reason="done", t=time.time()),
                                "close", self.round)
        except BaseException:
            try:
                await asyncio.shield(self._publish(
                    subjects.session(self.sid),
                    SessionClosed(v=SCHEMA_VERSION, reason="error", t=time.time()),
                    "close", self.round))
            except Exception:
                pass
            raise
        finally:
            await sub.unsubscribe()
        wall = time.perf_counter() - t_start
        self.log.info("session finished", tokens=len(self.generated), rounds=len(rounds),
                      wall_s=round(wall, 3))
        return SessionResult(self.sid, self.generated, "", rounds,
                             (t_first - t_start) if t_first else wall, wall, itl)
