"""Several sessions on one edge device share its draft forwards.

Each session drafts in an executor thread and calls forward() as if it had the model to
itself; calls that arrive while a forward runs are packed into the next forward. A packed
forward of a few tokens costs about as much as a single-token one on this hardware (DESIGN
section 7), so N sessions drafting together each see roughly the latency of drafting alone.
Used by an edge serving several requests at once and by the benchmark, whose emulated edges
share one core.

No fixed wait: the caller that finds the model free runs at once with whatever is pending,
unless a session known to be mid-tree (`hold`, by its draft KV sequence) has not submitted
its next forward yet; then it waits for those sessions (a step's host work, well under a
forward), for at most `window_s`. A lone session never waits."""

from __future__ import annotations

import threading
import time

import torch

from specedge.execution import KVSeq, PackedRunner, Segment


class CoalescingRunner:
    def __init__(self, runner: PackedRunner, window_s: float = 0.002):
        """window_s: the longest a forward waits for held sessions that are late; one that
        misses it is no longer waited for until it holds again."""
        self.runner = runner
        self.model, self.vocab_size = runner.model, runner.vocab_size
        self.pool, self.device = runner.pool, runner.device
        self.window_s = window_s
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._busy = False
        self._held: set[int] = set()  # id() of the KV sequences of sessions mid-tree
        self.forwards = 0  # packed forwards actually run
        self.requests = 0  # forward() calls served
        self.waits = 0  # forwards that waited for a held session
        self.late = 0  # held sessions that missed a forward's wait

    def new_seq(self) -> KVSeq:
        return self.runner.new_seq()

    def hold(self, seq: KVSeq) -> None:
        """The session drafting on `seq` will submit forward after forward until `release`:
        a forward about to run waits for it (briefly) so both share it."""
        with self._cond:
            self._held.add(id(seq))

    def release(self, seq: KVSeq) -> None:
        with self._cond:
            self._held.discard(id(seq))
            self._cond.notify_all()  # a leader may be waiting for this one

    def _missing(self) -> set[int]:
        """Held sessions with nothing pending (called with the lock held)."""
        if not self._held:
            return set()
        here = {id(s.seq) for r in self._pending for s in r["segs"]}
        return self._held - here

    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        req: dict = {"segs": segments, "done": False}
        with self._cond:
            self._pending.append(req)
            self.requests += 1
            self._cond.notify_all()  # a waiting leader counts who is here
            while not req["done"]:
                if self._busy:
                    self._cond.wait()
                    continue
                # Lead: wait only for held sessions still in their host work, then run
                # everything pending as one forward (outside the lock, so more can queue).
                self._busy = True
                if self._missing():
                    self.waits += 1
                    deadline = time.monotonic() + self.window_s
                    while (missing := self._missing()) and (
                            left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                    self.late += len(missing)
                    self._held -= missing  # stale until they hold again
                batch, self._pending = self._pending, []
                self._cond.release()
                try:
                    outs, err = self.runner.forward([s for r in batch for s in r["segs"]]), None
                except Exception as exc:  # every caller in the batch gets the error
                    outs, err = None, exc
                finally:
                    self._cond.acquire()
                i = 0
                for r in batch:
                    n = len(r["segs"])
                    r["out"], r["err"] = (outs[i:i + n] if outs is not None else None), err
                    r["done"], i = True, i + n
                self.forwards += 1
                self._busy = False
                self._cond.notify_all()
        if req["err"] is not None:
            raise req["err"]
        return req["out"]
