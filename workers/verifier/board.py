"""This verifier's entry on the fleet's limits board, and its answers to edges asking for them.

The entry (`verifier.<name>` in the `specedge_fleet` KV bucket) holds the worker's effective
limits: its `Limits` with max_positions resolved against its model, its vocabulary, its name.
It is renewed every `renew_s` and expires with the bucket's TTL when the worker dies, like a
lease. On each renewal the worker reads every live entry and merges them (the strictest: a
session's blocks may land on any worker); when the merged view changes it broadcasts it on
`specedge.fleet.limits`, and it answers `specedge.fleet.query` requests (one worker of the
queue group answers) with it. The protocol lives in specedge/fleet.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time

import msgspec
import structlog

from specedge import fleet, subjects
from specedge.broker import bucket_keys, live_values
from specedge.config import Limits
from specedge.fleet import FleetLimits
from workers.verifier.leases import kv_bucket

log = structlog.get_logger(__name__)

_KEY_CHARS = re.compile(r"[^-/_=.a-zA-Z0-9]")


def effective_limits(limits: Limits, model_config) -> Limits:
    """`limits` with max_positions resolved: the model's positions, or fewer if configured."""
    own = getattr(model_config, "max_position_embeddings", None) or 0
    want = limits.max_positions
    positions = min(x for x in (own, want) if x > 0) if own or want > 0 else 0
    return dataclasses.replace(limits, max_positions=positions)


class Board:
    def __init__(self, nc, js, entry: FleetLimits, ttl_s: float = 6.0, renew_s: float = 2.0):
        self.nc, self.js, self.entry = nc, js, entry
        self.ttl_s, self.renew_s = ttl_s, renew_s
        self.key = "verifier." + _KEY_CHARS.sub("_", entry.verifiers[0])
        self.view: FleetLimits = entry  # the merged view; at least our own entry
        self._sent: FleetLimits | None = None
        self.kv = None
        self._sub = None
        self._task: asyncio.Task | None = None

    @classmethod
    async def join(cls, worker) -> Board:
        """The Worker.run hook: resolve the worker's limits against its model (they are what it
        enforces from here on) and publish them for edges."""
        cfg = worker.cfg
        cfg.limits = effective_limits(cfg.limits, worker.engine.model.config)
        model = getattr(worker.engine.model.config, "name_or_path", "") or ""
        entry = FleetLimits.of(cfg.limits, cfg.name, model, worker.engine.vocab_size,
                               cfg.tokenizer)
        board = cls(worker.nc, worker.js, entry, ttl_s=cfg.lease_ttl_s,
                    renew_s=max(0.5, cfg.lease_ttl_s / 3))
        await board.start()
        return board

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(subjects.fleet_query(), queue="verifiers",
                                            cb=self._on_query)
        try:
            await self.tick()
        except Exception as exc:  # e.g. a cluster still electing: the renewals retry
            log.warning("could not publish limits yet; retrying", error=repr(exc))
        self._task = asyncio.create_task(self._run())
        log.info("limits published", worker=self.entry.verifiers[0], key=self.key,
                 max_prompt_tokens=self.entry.max_prompt_tokens,
                 max_new_tokens=self.entry.max_new_tokens,
                 max_positions=self.entry.max_positions, max_nodes=self.entry.max_nodes,
                 max_depth=self.entry.max_depth)

    async def _on_query(self, m) -> None:
        if m.reply:
            try:
                await m.respond(fleet.encode(self.view))
            except Exception as exc:  # the asker went away
                log.debug("fleet query answer failed", error=repr(exc))

    async def entries(self) -> list[FleetLimits]:
        # never kv.keys(): its watcher can wait for ever on a TTL'd bucket (broker.bucket_keys)
        live = await live_values(self.kv, await bucket_keys(self.js, subjects.FLEET, "verifier."))
        out = []
        for k, value in live.items():
            try:
                out.append(fleet.decode(value))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.warning("bad board entry ignored", key=k, error=str(exc)[:200])
        return out

    async def tick(self) -> None:
        """Renew our entry, re-read the board, broadcast the merged view if it changed."""
        if self.kv is None:
            self.kv = await kv_bucket(self.js, subjects.FLEET, self.ttl_s)
        self.entry = msgspec.structs.replace(self.entry, t=time.time())
        await self.kv.put(self.key, fleet.encode(self.entry))
        others = [e for e in await self.entries() if e.verifiers != self.entry.verifiers]
        await self._publish(fleet.strictest([self.entry, *others]))

    async def _publish(self, view: FleetLimits) -> None:
        self.view = view
        if not view.same_limits(self._sent):
            await self.nc.publish(subjects.fleet_limits(), fleet.encode(view))
            self._sent = view
            log.info("fleet limits changed", verifiers=list(view.verifiers),
                     max_prompt_tokens=view.max_prompt_tokens, max_positions=view.max_positions,
                     max_nodes=view.max_nodes)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a broker outage: keep trying; the entry may lapse
                log.warning("limits board renewal failed", worker=self.entry.verifiers[0],
                            error=repr(exc))

    async def leave(self, timeout_s: float = 2.0) -> None:
        """Remove our entry and tell edges what the others accept. Best effort and bounded (a
        drain must not wait on a broker that is gone): without it, the entry expires after the
        TTL and another worker broadcasts the change."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self._leave(), timeout_s)
        except Exception as exc:
            log.warning("could not leave the limits board", worker=self.entry.verifiers[0],
                        error=repr(exc))

    async def _leave(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
        if self.kv is None:
            return
        await self.kv.delete(self.key)
        others = [e for e in await self.entries() if e.verifiers != self.entry.verifiers]
        if others:
            await self._publish(fleet.strictest(others))
