"""Read one session's log back from the stream: the one reader shared by verifier recovery
(rebuild the committed sequence on a cache miss) and replay."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import structlog
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import (
    DraftBlock,
    Rejected,
    SessionClosed,
    SessionOpened,
    Verdict,
    WireError,
    decode,
    unpack_ids,
)
from specedge import subjects

log = structlog.get_logger(__name__)


@dataclass
class LogEntry:
    seq: int
    kind: str  # session | draft | verdict
    time: datetime | None
    msg: object  # a decoded message, or a WireError for an undecodable body


@dataclass
class SessionLog:
    """A message counts only on its own kind's subject: an edge may publish anything to its
    session and draft subjects (a Verdict body included), but only verifiers publish verdicts."""

    sid: str
    entries: list[LogEntry] = field(default_factory=list)

    def _of(self, kind: str, cls: type) -> list:
        return [e.msg for e in self.entries if e.kind == kind and isinstance(e.msg, cls)]

    @property
    def opened(self) -> SessionOpened | None:
        return next(iter(self._of("session", SessionOpened)), None)

    @property
    def closed(self) -> SessionClosed | None:
        return next(iter(self._of("session", SessionClosed)), None)

    def verdicts(self) -> list[Verdict]:
        """One verdict per round (the first; a duplicate is a redelivery), in round order."""
        by_round: dict[int, Verdict] = {}
        for v in self._of("verdict", Verdict):
            by_round.setdefault(v.round, v)
        return [by_round[r] for r in sorted(by_round)]

    def drafts(self) -> dict[int, DraftBlock]:
        out: dict[int, DraftBlock] = {}
        for d in self._of("draft", DraftBlock):
            out.setdefault(d.round, d)
        return out

    def rejections(self) -> list[Rejected]:
        return self._of("verdict", Rejected)


class LogError(ValueError):
    pass


def committed_sequence(slog: SessionLog) -> tuple[list[int], int, bool]:
    """Rebuild (C, next round, finished) from the opening and the verdicts, checking that the
    verdicts chain (round r hangs off the length round r-1 left)."""
    opened = slog.opened
    if opened is None:
        raise LogError(f"session {slog.sid} has no SessionOpened in the log")
    seq = unpack_ids(opened.prompt)
    finished, next_round = False, 0
    for v in slog.verdicts():
        if v.round != next_round or v.committed_len != len(seq):
            raise LogError(f"session {slog.sid}: verdict for round {v.round} at length "
                           f"{v.committed_len} does not follow round {next_round} at {len(seq)}")
        seq.extend(unpack_ids(v.tokens))
        finished = v.finished
        next_round += 1
    return seq, next_round, finished


async def read_session(js, sid: str, *, timeout: float = 5.0,
                       drafts: bool = True) -> SessionLog:
    """Every message of one session, in stream order, through an ephemeral consumer. Without
    drafts: just what rebuilds the committed sequence (an edge's drafts, hostile ones
    included, then cost a rebuild nothing)."""
    slog = SessionLog(sid)
    filters = subjects.log_filters(sid)
    if not drafts:
        filters = [f for f in filters if ".draft." not in f]
    sub = await js.pull_subscribe(
        "",
        stream=subjects.STREAM,
        config=ConsumerConfig(
            filter_subjects=filters,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    try:
        pending = (await sub.consumer_info()).num_pending
        while pending > 0:
            try:
                msgs = await sub.fetch(batch=min(pending, 512), timeout=timeout)
            except TimeoutError:
                raise LogError(f"session {sid}: log read timed out with {pending} left") from None
            for m in msgs:
                md = m.metadata
                kind = m.subject.split(".")[1]
                try:
                    body: object = decode(m.data)
                except WireError as exc:
                    body = exc
                slog.entries.append(LogEntry(md.sequence.stream, kind, md.timestamp, body))
                pending = md.num_pending
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # the ephemeral consumer expires by itself anyway
            pass
    return slog
