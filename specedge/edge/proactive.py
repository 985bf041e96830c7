"""Proactive drafting: while round r is verified, guess its outcome and draft round r+1 from it.

A guess (a head) is a root-to-node path of the in-flight tree plus the draft's next token
after it: exactly the shape of a verdict (accepted path + next token). Each head drafts in a
fork of the draft KV, so a wrong guess costs nothing to undo. Work runs one draft forward at
a time in the edge's executor and checks for cancellation between forwards, so a verdict is
never kept waiting for more than the forward in progress.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import torch

from specedge.config import TreeShape
from specedge.edge.drafter import Drafter, DraftTree, TreeBuilder
from specedge.execution.transforms import History, Rows, apply, wanted

log = structlog.get_logger(__name__)


class Mode(enum.StrEnum):
    OFF = "off"
    SINGLE = "single"  # one guess: the favourite path and the draft's top next token
    MULTI = "multi"  # the top few guesses, drafted in order of likelihood


@dataclass
class Head:
    predicted: list[int]  # C + path tokens + next token
    logp: float
    drafter: Drafter
    builder: TreeBuilder
    busy_s: float = 0.0  # draft time spent on this head


@dataclass
class Proactive:
    """The proactive work for one in-flight round."""

    committed: list[int]
    tree: DraftTree
    main: Drafter
    shape: TreeShape
    mode: Mode
    run_step: Callable[..., Awaitable]  # runs a model step in the edge's executor
    max_heads: int = 3
    heads: list[Head] = field(default_factory=list)
    busy_s: float = 0.0
    _cancel: bool = False
    _task: asyncio.Task | None = None
    _loose: list[Drafter] = field(default_factory=list)  # forks not yet in a head

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def _guesses(self) -> list[list[int]]:
        """Paths to guess from, most likely first. The likeliest outcome follows the draft's
        favourite child from the root to a leaf (best-first growth always includes a node's
        favourite child before any other), then the draft's next token. Multi also guesses
        that the last node of that path is rejected."""
        t = self.tree
        path, node = [], 0
        while True:
            kids = [i for i, p in enumerate(t.parents, 1) if p == node]
            if not kids:
                break
            node = max(kids, key=lambda i: t.logp[i - 1])
            path.append(node)
        if self.mode is Mode.SINGLE or not path:
            return [path]
        return [path, path[:-1]]

    async def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return await self.run_step(fn, *args)
        finally:
            self.busy_s += time.perf_counter() - t0

    def _fork(self, path: list[int]) -> Drafter:
        """A fork for a guess, remembered as loose (in the executor, so that a fork made while
        its awaiting task is cancelled is still found) until a head holds it."""
        d = self.main.fork(self.tree, path)
        self._loose.append(d)
        return d

    def _head(self, head: Head) -> None:
        self.heads.append(head)
        self._loose.remove(head.drafter)

    async def _run(self) -> None:
        try:
            await self._guess_and_draft()
        except BaseException as exc:  # a guess is an optimisation: its failure must not end
            if not isinstance(exc, asyncio.CancelledError):  # the session
                log.exception("proactive drafting failed; continuing without it")
            # every fork goes back to the pool, whether a head holds it yet or not
            drafters = self._loose + [h.drafter for h in self.heads]
            self._loose, self.heads = [], []
            for d in drafters:
                await self.run_step(d.close)
            if not isinstance(exc, Exception):
                raise

    async def _guess_and_draft(self) -> None:
        t = self.tree
        for path in self._guesses():
            if self._cancel:
                return
            toks = [t.tokens[i - 1] for i in path]
            t0 = time.perf_counter()
            # forks and forwards run in the executor: they take the pool's lock, which a
            # forward on another thread may hold, and the event loop must stay free
            fork = await self._timed(self._fork, path)
            base = self.committed + toks
            logits = await self._timed(fork.catch_up, base)
            last = path[-1] if path else 0
            kids = [t.tokens[i - 1] for i, p in enumerate(t.parents, 1) if p == last]
            if t.sampling is not None and wanted(t.sampling):  # the guess the target would make
                logits = apply(logits[None], [Rows(0, t.sampling, History.of(base, t.prompt_len),
                                                   [], [])])[0]
            lp = torch.log_softmax(logits.float(), -1)
            if t.constraint is not None:  # the target's row is masked to the grammar
                from specedge.execution.grammar import allowed

                if t.constraint.sync(base[t.prompt_len:]):
                    ok = allowed(t.constraint.tree_bitmask([], []), len(lp))[0]
                    lp = lp.masked_fill(~ok.to(lp.device), float("-inf"))
            if kids:
                lp[kids] = float("-inf")  # a child token would have extended the path
            k = 1 if self.mode is Mode.SINGLE else 2
            vals, idx = torch.topk(lp, k)
            pathlp = t.logp[path[-1] - 1] if path else 0.0
            for j, (v, y) in enumerate(zip(vals.tolist(), idx.tolist(), strict=True)):
                d = fork if j == 0 else await self._timed(self._fork, path)
                pred = base + [y]
                self._head(Head(pred, pathlp + v, d, TreeBuilder(
                    d, pred, self.shape, t.sampling, t.prompt_len, t.constraint)))
            self.heads[-k].busy_s += time.perf_counter() - t0
            if len(self.heads) >= self.max_heads or self.mode is Mode.SINGLE:
                break
        for h in sorted(self.heads, key=lambda h: -h.logp)[: self.max_heads]:
            while not h.builder.done:
                if self._cancel:
                    return
                t0 = time.perf_counter()
                await self._timed(h.builder.step)
                h.busy_s += time.perf_counter() - t0

    async def resolve(self, committed_after: list[int]) -> Head | None:
        """The verdict is in: stop all proactive work (waiting at most for the forward in
        progress) and return the head whose guess came true, if any."""
        self._cancel = True
        if self._task is not None:  # (one cancelled has given its forks back already)
            await asyncio.wait({self._task})
        hit = next((h for h in self.heads if h.predicted == committed_after), None)
        # the other guesses' KV goes back to the pool
        others = self._loose + [h.drafter for h in self.heads if h is not hit]
        self._loose = []
        for d in others:
            await self.run_step(d.close)
        return hit
