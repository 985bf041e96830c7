"""The edge's view of its broker link: up or down since when, and how long a round takes.

Every session on one NATS connection shares it. Three things hang off it:

* a reconnect wakes every session that waits for a verdict, which looks it up in the stream at
  once: a verdict published while the link was down never reaches the core subscription, and
  the stream (the source of truth) has it;
* the give-up clock: the link counts as down from nats-py's disconnect notice (it pings every
  `EDGE_PING_S`, so a silent link is noticed within about three pings) or from the first
  publish that got no acknowledgement, until something gets through again; a session whose
  link has been down for `give_up_s` fails with BrokerUnreachable;
* the verifier's round time as this edge measures it (block published -> verdict), from which
  a session derives how long to wait before it looks for a verdict on its own; that wait
  starts again at every progress report of a verifier working on the block (a slow verifier
  is not a dead one), so a session re-publishes or gives up only after silence.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from specedge import subjects

log = structlog.get_logger(__name__)

# The edge's keepalive: a dead link is noticed within 3 pings (nats-py declares the connection
# stale once more than max_outstanding_pings go unanswered); a ping is a few bytes.
EDGE_PING_S = 2.0
EDGE_MAX_OUTSTANDING_PINGS = 2


def connect_kwargs() -> dict:
    """broker.connect keyword arguments for an edge's connection."""
    return {"ping_interval": EDGE_PING_S, "max_outstanding_pings": EDGE_MAX_OUTSTANDING_PINGS}


async def connect(url: str, name: str, give_up_s: float, **opts):
    """An edge's connection: nats-py retries a first connect for ever (we ask it to reconnect
    for ever), so the give-up bound applies to it too."""
    from specedge import broker

    try:
        return await asyncio.wait_for(broker.connect(url, name, **connect_kwargs(), **opts),
                                      give_up_s)
    except TimeoutError:
        raise BrokerUnreachable(give_up_s, give_up_s, "at start") from None


class BrokerUnreachable(ConnectionError):
    """The broker has been out of reach for longer than the session's give-up bound."""

    def __init__(self, down_s: float, give_up_s: float, what: str = ""):
        super().__init__(f"no contact with the broker for {down_s:.0f} s (give-up bound "
                         f"{give_up_s:g} s){': ' + what if what else ''}")
        self.down_s, self.give_up_s = down_s, give_up_s


# A verifier that announced it reports a held block every E seconds (schemas.Progress) is
# taken to have lost it only after this many intervals of silence.
PROGRESS_MISSES = 3


@dataclass(frozen=True)
class WaitPolicy:
    """How long a session waits for a verdict before it looks on its own (then re-publishes):
    `factor` measured round times, at least `min_s`, at most `max_s`; `max_s` also before any
    round was measured (the first round includes the verifier's prefill of the prompt). Each
    further wait for the same round doubles, up to `max_s`."""

    factor: float = 5.0
    min_s: float = 3.0
    max_s: float = 30.0

    def wait_s(self, round_s: float | None, attempt: int = 0) -> float:
        base = self.max_s if round_s is None else min(self.max_s,
                                                      max(self.min_s, self.factor * round_s))
        return min(self.max_s, base * 2 ** attempt)


class Link:
    """One NATS connection's state as the edge's sessions see it. `Link.of(nc)` attaches one
    (chaining onto the connection's own callbacks) the first time it is asked for."""

    _links: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, nc=None):
        self.nc = nc
        self.down_since: float | None = None
        self.reconnects = 0
        self.round_s: float | None = None  # EMA of block published -> verdict, rounds >= 1
        self._listeners: set[Callable[[], None]] = set()
        self._up: asyncio.Future | None = None  # resolved at the next reconnect
        # progress reports: one wildcard subscription per edge name on this connection (the
        # broker caps subscriptions per connection), routed to each session by its id
        self._progress_subs: dict[str, asyncio.Task] = {}
        self._progress_to: dict[str, Callable[[object], Awaitable[None]]] = {}

    @classmethod
    def of(cls, nc) -> Link:
        link = cls._links.get(nc)
        if link is None:
            link = cls._links[nc] = cls(nc)
            link._attach(nc)
        return link

    def _attach(self, nc) -> None:
        down_cb, up_cb = getattr(nc, "_disconnected_cb", None), getattr(nc, "_reconnected_cb", None)

        async def on_down() -> None:
            if down_cb is not None:
                await down_cb()
            if not (nc.is_closed or nc.is_draining):
                self.went_down()

        async def on_up() -> None:
            if up_cb is not None:
                await up_cb()
            self.came_back()

        nc._disconnected_cb, nc._reconnected_cb = on_down, on_up

    # -- events -----------------------------------------------------------------------------

    def went_down(self, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        if self.down_since is None or at < self.down_since:
            self.down_since = at

    def came_back(self) -> None:
        self.down_since = None
        self.reconnects += 1
        if self._up is not None and not self._up.done():
            self._up.set_result(None)
        self._up = None
        for fn in list(self._listeners):
            fn()

    def failed(self, since: float) -> None:
        """A publish sent at `since` got no acknowledgement: nothing got through since then
        (nats-py may not have noticed a silent link yet)."""
        self.went_down(since)

    def ok(self) -> None:
        """Something got through (an acknowledgement, a verdict)."""
        self.down_since = None

    def observe_round(self, seconds: float) -> None:
        self.round_s = seconds if self.round_s is None else self.round_s + 0.3 * (
            seconds - self.round_s)

    # -- queries ----------------------------------------------------------------------------

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def connected(self) -> bool:
        return self.nc is None or bool(self.nc.is_connected)

    def next_up(self) -> asyncio.Future:
        """A future resolved at the next reconnect (shared by everyone waiting for it)."""
        if self._up is None or self._up.done():
            self._up = asyncio.get_running_loop().create_future()
        return self._up

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call fn at every reconnect; returns the function that stops it."""
        self._listeners.add(fn)
        return lambda: self._listeners.discard(fn)

    async def follow_progress(self, sid: str,
                              fn: Callable[[object], Awaitable[None]]) -> Callable[[], None]:
        """Hand session `sid`'s progress reports (raw messages) to fn; returns the function
        that stops it. Best effort: a connection that may not subscribe (an edge user whose
        permissions predate the subject) just hears none."""
        edge = subjects.edge_of(sid)
        if edge not in self._progress_subs:
            self._progress_subs[edge] = asyncio.ensure_future(
                self.nc.subscribe(subjects.progress(f"{edge}.*"), cb=self._route_progress))
        self._progress_to[sid] = fn
        try:
            await self._progress_subs[edge]
        except Exception as exc:
            log.debug("no progress subscription", edge=edge, error_type=type(exc).__name__)
            self._progress_subs.pop(edge, None)  # the next session tries again
        return lambda: self._progress_to.pop(sid, None)

    async def _route_progress(self, m) -> None:
        fn = self._progress_to.get(m.subject.split(".", 2)[-1])  # specedge.progress.<sid>
        if fn is not None:
            await fn(m)
