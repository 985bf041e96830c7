"""A small deterministic TCP forwarder on 127.0.0.1 that impairs the link between a client (the
edge) and a server (the broker) on command: delay and jitter, loss, an outage, resets.

There is no netem or iptables here, so the impairment happens in user space:

* delay/jitter: every chunk is delivered `delay_s` plus a uniform draw in [0, jitter_s) after
  it was read, never before the chunk ahead of it (TCP keeps order);
* loss: TCP retransmits a lost segment, so what the application sees is a late chunk: with
  probability `loss`, a chunk waits `rto_s` more;
* outage: nothing is delivered either way, and new connections are accepted but not passed
  on (a peer's SYN going unanswered looks the same to the client: a connect that hangs); on
  restore the held data flows and the held connections go through, as after a real outage
  shorter than the peers' timeouts;
* reset: every connection is aborted with an RST at once;
* `after(pattern, action)` resets or starts an outage right after forwarding (client to
  server) the nth chunk that carries `pattern`: a fault with a draft block in flight;
  `before(pattern)` starts an outage just before delivering (server to client) a chunk that
  carries it, which is then held: a verdict on its way back.

Draws come from one seeded generator, so a run's impairments repeat."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from dataclasses import dataclass, field


@dataclass
class Impairment:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rto_s: float = 0.2  # the extra wait of a "lost" (retransmitted) chunk


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int = 0, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.rng = random.Random(seed)
        self.imp = Impairment()
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._up = asyncio.Event()
        self._up.set()
        self._trigger: tuple[bytes, int, str] | None = None  # (pattern, hits left, action)
        self._hold: tuple[bytes, int] | None = None  # outage before delivering the nth such
        self.connections = 0  # accepted so far
        self.resets = 0
        self.down_at: float | None = None  # monotonic time of the last outage's start
        self.up_at: float | None = None  # ... and of the last restore
        self.seen: dict[bytes, float] = {}  # watched pattern -> when it last went upstream
        self.watch: tuple[bytes, ...] = ()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._up.set()
        for c in list(self._conns):
            self._abort(c)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- commands -------------------------------------------------------------------------

    def impair(self, **kw) -> None:
        self.imp = Impairment(**kw)

    def outage(self) -> None:
        self._up.clear()
        self.down_at = time.monotonic()

    def restore(self) -> None:
        self.up_at = time.monotonic()
        self._up.set()

    @property
    def is_down(self) -> bool:
        return not self._up.is_set()

    def reset(self) -> int:
        """Abort every connection now; how many there were."""
        conns = list(self._conns)
        for c in conns:
            self._abort(c)
        self.resets += 1
        return len(conns)

    def after(self, pattern: bytes, action: str, nth: int = 1) -> None:
        """Right after forwarding the nth chunk (client -> server) that carries `pattern`:
        "reset" every connection, or begin an "outage"."""
        assert action in ("reset", "outage")
        self._trigger = (pattern, nth, action)

    # -- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _rst(w: asyncio.StreamWriter | None) -> None:
        if w is None:
            return
        sock = w.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()

    def _abort(self, c: _Conn) -> None:
        self._conns.discard(c)
        self._rst(c.client)
        self._rst(c.upstream)
        for t in c.tasks:
            t.cancel()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        c = _Conn(writer)
        self._conns.add(c)
        try:
            # held through an outage: the client sees a connect that has not been answered
            await self._wait_up_or_eof(reader)
            if c not in self._conns or reader.at_eof():
                return
            try:
                up_r, up_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            c.upstream = up_w
            if c not in self._conns:  # reset while connecting
                self._rst(up_w)
                return
            c.tasks = [asyncio.create_task(self._pump(reader, up_w, c, True)),
                       asyncio.create_task(self._pump(up_r, writer, c, False))]
            await asyncio.gather(*c.tasks, return_exceptions=True)
        finally:
            if c in self._conns:
                self._conns.discard(c)
                for w in (c.client, c.upstream):
                    if w is not None:
                        w.close()

    async def _wait_up_or_eof(self, reader: asyncio.StreamReader) -> None:
        """Until the link is up. (A NATS client sends nothing before the server's INFO, so
        reading here only notices a client that gave up.)"""
        while not self._up.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), 0.2)
            if reader.at_eof():
                return

    def _deliver_at(self, now: float) -> float:
        imp = self.imp
        at = now + imp.delay_s + (self.rng.uniform(0, imp.jitter_s) if imp.jitter_s else 0.0)
        if imp.loss and self.rng.random() < imp.loss:
            at += imp.rto_s
        return at

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, c: _Conn,
                    to_server: bool) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            last = 0.0
            while True:
                at, chunk = await queue.get()
                if chunk is None:
                    dst.close()
                    return
                last = max(last, at)  # never overtake the chunk ahead
                if (wait := last - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not to_server and self._hold and self._hold[0] in chunk:
                    pattern, left = self._hold
                    self._hold = (pattern, left - 1) if left > 1 else None
                    if left <= 1:
                        self.outage()
                await self._up.wait()
                dst.write(chunk)
                await dst.drain()
                if to_server:
                    self._after_forward(chunk)

        sender = asyncio.create_task(deliver())
        try:
            while chunk := await src.read(65536):
                queue.put_nowait((self._deliver_at(time.monotonic()), chunk))
            if self.is_down:  # a peer that gave up during an outage: its held data dies too
                self._abort(c)
                return
            queue.put_nowait((0.0, None))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            if c in self._conns:  # one side ended: end the other (a FIN, not a reset)
                self._conns.discard(c)
                for w in (c.client, c.upstream):
                    if w is not None:
                        w.close()

    def before(self, pattern: bytes, nth: int = 1) -> None:
        """Begin an outage just before delivering (server -> client) the nth chunk that
        carries `pattern`; the chunk is held with the rest."""
        self._hold = (pattern, nth)

    def _after_forward(self, chunk: bytes) -> None:
        now = time.monotonic()
        for pattern in self.watch:
            if pattern in chunk:
                self.seen[pattern] = now
        if self._trigger and self._trigger[0] in chunk:
            pattern, left, action = self._trigger
            if left > 1:
                self._trigger = (pattern, left - 1, action)
                return
            self._trigger = None
            if action == "reset":
                self.reset()
            else:
                self.outage()
