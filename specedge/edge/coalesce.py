"""Several sessions on one edge device share its draft forwards.

Each session drafts in its own executor thread and calls forward() as if it had the model to
itself; calls that arrive while a forward runs (or within a short window of the first) are
packed into the next forward. A packed forward of a few tokens costs about as much as a
single-token one on this hardware (DESIGN section 7), so N sessions drafting together each
see roughly the latency of drafting alone. Used by an edge serving several requests at once
and by the benchmark, whose emulated edges share one core."""

from __future__ import annotations

import threading

import torch

from specedge.execution import KVSeq, PackedRunner, Segment


class CoalescingRunner:
    def __init__(self, runner: PackedRunner, window_s: float = 0.002):
        self.runner = runner
        self.model, self.vocab_size = runner.model, runner.vocab_size
        self.pool, self.device = runner.pool, runner.device
        self.window_s = window_s
        self._cond = threading.Condition()
        self._pending: list[dict] = []
        self._busy = False
        self.forwards = 0  # packed forwards actually run
        self.requests = 0  # forward() calls served

    def new_seq(self) -> KVSeq:
        return self.runner.new_seq()

    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        req: dict = {"segs": segments, "done": False}
        with self._cond:
            self._pending.append(req)
            self.requests += 1
            while not req["done"]:
                if self._busy:
                    self._cond.wait()
                    continue
                # Lead: give callers that are a moment behind a chance to join, then run
                # everything pending as one forward (outside the lock, so more can queue).
                self._busy = True
                self._cond.wait(self.window_s)
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
