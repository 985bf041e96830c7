"""Per-edge limits on the verifier side: how many sessions an edge may hold open, and how many
rounds per second it may send. Excess is refused with a Rejected (a BlockError here), never
queued: a flooding edge costs the fleet one cheap check per message and nobody else waits.

The edge is the first token of the session id, which the broker's permissions tie to the
edge's credentials, so an edge cannot spend another's allowance.

* Open sessions are counted fleet-wide: every verifier subscribes to every session's
  open/close subject, so all of them see the same opens in (nearly) the same order and agree
  on which sessions are over the limit. A session first seen through a block (e.g. opened
  before this worker started) is counted from then on. An edge that dies without closing
  stops counting after `session_idle_s` without a block.
* Rounds per second are a token bucket per edge on each verifier. Partitions spread an edge's
  sessions over the workers, so a fleet of N admits up to N times the rate in the worst case.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from specedge import subjects
from specedge.config import Limits
from workers.verifier.validate import BlockError

log = structlog.get_logger(__name__)


@dataclass
class _Open:
    admitted: bool
    seen: float


@dataclass
class _Bucket:
    tokens: float
    at: float
    refused: int = 0  # since the last warning
    warned: float = float("-inf")


class Admission:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self._open: dict[str, OrderedDict[str, _Open]] = {}  # edge -> sid -> state, open order
        self._buckets: dict[str, _Bucket] = {}
        self.refused = {"too_many_sessions": 0, "rate_limited": 0}

    def _expire(self, edge: str, now: float) -> OrderedDict[str, _Open]:
        sessions = self._open.setdefault(edge, OrderedDict())
        idle = [s for s, o in sessions.items() if now - o.seen > self.limits.session_idle_s]
        for sid in idle:
            del sessions[sid]
        return sessions

    def opened(self, sid: str) -> _Open:
        """A session opened (or was first seen): admitted if its edge is under the limit."""
        edge, now = subjects.edge_of(sid), self.clock()
        sessions = self._expire(edge, now)
        if sid in sessions:
            return sessions[sid]
        n = sum(o.admitted for o in sessions.values())
        entry = _Open(admitted=n < self.limits.max_sessions_per_edge, seen=now)
        sessions[sid] = entry
        if not entry.admitted:
            log.warning("session over its edge's limit", sid=sid, edge=edge, open=n,
                        limit=self.limits.max_sessions_per_edge)
            # refused entries are only remembered so their blocks get the same answer; bound them
            refused = [s for s, o in sessions.items() if not o.admitted]
            for s in refused[: max(0, len(refused) - 4 * self.limits.max_sessions_per_edge)]:
                del sessions[s]
        return entry

    def closed(self, sid: str) -> None:
        edge = subjects.edge_of(sid)
        sessions = self._open.get(edge)
        if sessions is not None:
            sessions.pop(sid, None)
            if not sessions:
                del self._open[edge]

    def open_count(self, edge: str) -> int:
        return sum(o.admitted for o in self._open.get(edge, {}).values())

    def admit(self, sid: str, round_no: int) -> None:
        """Called once per draft message before any work on it; raises BlockError to refuse."""
        edge, now = subjects.edge_of(sid), self.clock()
        sessions = self._open.get(edge)
        entry = sessions.get(sid) if sessions else None
        if entry is None:
            entry = self.opened(sid)
        entry.seen = now
        if not entry.admitted:
            self.refused["too_many_sessions"] += 1
            raise BlockError("too_many_sessions",
                             f"edge {edge!r} already has {self.open_count(edge)} sessions open; "
                             f"the limit is {self.limits.max_sessions_per_edge}: close one first")
        rate, burst = self.limits.edge_rounds_per_s, self.limits.edge_rounds_burst
        b = self._buckets.get(edge)
        if b is None:
            b = self._buckets[edge] = _Bucket(float(burst), now)
        b.tokens = min(float(burst), b.tokens + (now - b.at) * rate)
        b.at = now
        if b.tokens < 1.0:
            self.refused["rate_limited"] += 1
            b.refused += 1
            if now - b.warned > 5.0:  # one line per edge per 5 s, not one per message
                log.warning("edge over its round rate; refusing", sid=sid, round=round_no,
                            edge=edge, refused=b.refused, rate=rate, burst=burst)
                b.warned, b.refused = now, 0
            raise BlockError("rate_limited", f"edge {edge!r} sends more than {rate:g} rounds/s "
                             f"(burst {burst}); round {round_no} refused")
        b.tokens -= 1.0
