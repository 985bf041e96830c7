"""Progress reports: a verifier holding a session's block tells its edge it is working on it
(schemas.Progress on subjects.progress(sid), a core publish that nothing stores), so that the
edge's patience follows the work, not a fixed wait: a long prompt's prefill on a slow or busy
verifier is a stream of reports, a dead verifier is silence.

The cost stays negligible: a report goes out when a block is taken but gets no verdict in a
forward, and every `every_s` while a block is held (the worker's keep-alive), and per session
at most one every `every_s / 4` except the first of each round."""

from __future__ import annotations

import time
from collections import OrderedDict

from schemas import SCHEMA_VERSION, Progress, encode
from specedge import subjects

DEFAULT_EVERY_S = 1.0
MAX_REMEMBERED = 10_000  # sessions whose last report is remembered (least recent forgotten)


class ProgressReporter:
    def __init__(self, worker: str, every_s: float = DEFAULT_EVERY_S):
        if every_s <= 0:
            raise ValueError(f"progress interval must be > 0, got {every_s}")
        self.worker, self.every_s = worker, every_s
        self._last: OrderedDict[str, tuple[int, float]] = OrderedDict()  # sid -> (round, at)
        self.sent = 0

    def report(self, sid: str, round_no: int, stage: str, done: int = 0, total: int = 0,
               now: float | None = None) -> tuple[str, bytes] | None:
        """(subject, body) of the report to publish now, or None when this session had one
        for the same round less than every_s / 4 ago."""
        now = time.monotonic() if now is None else now
        last = self._last.get(sid)
        if last is not None and last[0] == round_no and now - last[1] < self.every_s / 4:
            return None
        self._last[sid] = (round_no, now)
        self._last.move_to_end(sid)
        while len(self._last) > MAX_REMEMBERED:
            self._last.popitem(last=False)
        self.sent += 1
        return subjects.progress(sid), encode(Progress(
            v=SCHEMA_VERSION, round=round_no, stage=stage, every_s=self.every_s, done=done,
            total=total, worker=self.worker, t=time.time()))

    def forget(self, sid: str) -> None:
        self._last.pop(sid, None)
