"""The fleet's limits, as edges see them: what the verifiers would refuse, known before any work.

Every verifier publishes its effective limits (its `Limits`, its model's positions and
vocabulary, its name) as one entry of the `specedge_fleet` KV bucket, renewed like a lease and
gone with the bucket's TTL when the worker dies (workers/verifier/board.py). A session may be
verified by any of them, so the fleet's limits are the strictest over the live entries.

Edges cannot read KV (no `$JS.API` for an edge user), so the verifiers also serve the merged
view on plain subjects: a request on `specedge.fleet.query` is answered by one verifier (a
queue group), and every verifier broadcasts on `specedge.fleet.limits` when the view changes.
The wire form is JSON, so `nats kv get specedge_fleet verifier.<name>` is readable as is.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats.errors
import structlog

from specedge import subjects
from specedge.config import Limits

log = structlog.get_logger(__name__)

FLEET_VERSION = 1


class FleetLimits(msgspec.Struct, frozen=True, kw_only=True):
    """One verifier's effective limits (a board entry), or the strictest over several."""

    v: int = FLEET_VERSION
    verifiers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    vocab_sizes: tuple[int, ...] = ()
    tokenizers: tuple[str, ...] = ()  # their targets' tokenizer fingerprints (specedge.vocab)
    max_positions: int = 0  # 0: unknown (no model positions): no position check
    max_nodes: int
    max_depth: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_eos_ids: int
    max_message_bytes: int
    min_temperature: float
    max_temperature: float
    t: float = 0.0  # when the entry was published (unix seconds)

    @classmethod
    def of(cls, limits: Limits, name: str, model: str, vocab_size: int,
           tokenizer: str = "") -> FleetLimits:
        """A verifier's entry from its effective limits (max_positions already resolved)."""
        return cls(verifiers=(name,), models=(model,) if model else (),
                   vocab_sizes=(vocab_size,), tokenizers=(tokenizer,) if tokenizer else (),
                   t=time.time(),
                   **{f: getattr(limits, f) for f in _MIN_FIELDS + _MAX_FIELDS})

    def same_limits(self, other: FleetLimits | None) -> bool:
        """Equal but for the publication time."""
        return other is not None and msgspec.structs.replace(self, t=0.0) == \
            msgspec.structs.replace(other, t=0.0)


# merged by the smallest value (upper bounds) or the largest (lower bounds)
_MIN_FIELDS = ("max_nodes", "max_depth", "max_prompt_tokens", "max_new_tokens", "max_eos_ids",
               "max_message_bytes", "max_temperature", "max_positions")
_MAX_FIELDS = ("min_temperature",)


def strictest(entries: list[FleetLimits]) -> FleetLimits | None:
    """What every verifier in `entries` accepts. max_positions 0 (unknown) is ignored."""
    if not entries:
        return None
    merged: dict = {}
    for f in _MIN_FIELDS:
        vals = [getattr(e, f) for e in entries]
        if f == "max_positions":
            vals = [x for x in vals if x > 0] or [0]
        merged[f] = min(vals)
    for f in _MAX_FIELDS:
        merged[f] = max(getattr(e, f) for e in entries)
    return FleetLimits(
        verifiers=tuple(sorted({n for e in entries for n in e.verifiers})),
        models=tuple(sorted({m for e in entries for m in e.models})),
        vocab_sizes=tuple(sorted({s for e in entries for s in e.vocab_sizes})),
        tokenizers=tuple(sorted({s for e in entries for s in e.tokenizers})),
        t=max(e.t for e in entries), **merged)


def encode(fl: FleetLimits) -> bytes:
    return msgspec.json.encode(fl)


def decode(data: bytes) -> FleetLimits:
    """Raises msgspec.DecodeError / ValidationError on a malformed body."""
    return msgspec.json.decode(data, type=FleetLimits)


class FleetView:
    """An edge's view of the fleet's limits: asked for once at start (request/reply, which a
    restricted edge user may do), kept current by the verifiers' broadcasts, and asked for
    again when it is missing or old (a broadcast missed while disconnected)."""

    def __init__(self, nc, refresh_s: float = 60.0, retry_s: float = 5.0):
        self.nc = nc
        self.limits: FleetLimits | None = None
        self.refresh_s, self.retry_s = refresh_s, retry_s
        self._at = float("-inf")  # monotonic time of the last answer or broadcast
        self._tried = float("-inf")  # ... of the last request
        self._sub = None
        self._pending: asyncio.Task | None = None

    async def start(self, timeout_s: float = 2.0) -> FleetLimits | None:
        self._sub = await self.nc.subscribe(subjects.fleet_limits(), cb=self._on_broadcast)
        return await self.refresh(timeout_s)

    async def close(self) -> None:
        if self._pending:
            self._pending.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is closing anyway
                pass

    def _take(self, data: bytes, source: str) -> None:
        try:
            fl = decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("bad fleet limits ignored", source=source, error=str(exc)[:200])
            return
        if not fl.same_limits(self.limits):
            log.info("fleet limits", source=source, verifiers=len(fl.verifiers),
                     max_prompt_tokens=fl.max_prompt_tokens, max_new_tokens=fl.max_new_tokens,
                     max_positions=fl.max_positions, max_nodes=fl.max_nodes,
                     max_depth=fl.max_depth)
        self.limits = fl
        self._at = time.monotonic()

    async def _on_broadcast(self, m) -> None:
        self._take(m.data, "broadcast")

    async def refresh(self, timeout_s: float = 1.0) -> FleetLimits | None:
        """Ask the fleet; keep the last view if nobody answers (no verifier up yet)."""
        self._tried = time.monotonic()
        try:
            m = await self.nc.request(subjects.fleet_query(), b"", timeout=timeout_s)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError) as exc:
            log.info("no verifier answered the fleet limits query; using this edge's own "
                     "limits until one does", error=type(exc).__name__)
            return self.limits
        self._take(m.data, "query")
        return self.limits

    async def current(self, wait_s: float = 1.0) -> FleetLimits | None:
        """The view for a new session: asked for (briefly) when there is none, refreshed in
        the background when old."""
        now = time.monotonic()
        if self.limits is None:
            if now - self._tried >= self.retry_s:
                return await self.refresh(wait_s)
        elif now - self._at > self.refresh_s and (self._pending is None or self._pending.done()):
            self._pending = asyncio.create_task(self.refresh(wait_s))
        return self.limits


async def fetch(nc, timeout_s: float = 2.0) -> FleetLimits | None:
    """One-shot read (the CLI edge): the fleet's limits, or None if no verifier answers."""
    view = FleetView(nc)
    try:
        return await view.refresh(timeout_s)
    finally:
        await view.close()
