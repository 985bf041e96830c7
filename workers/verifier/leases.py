"""Partition leases in a JetStream KV bucket: which worker serves which partitions.

Every worker heartbeats a `member.<name>` key; keys expire with the bucket's TTL, so a dead
worker drops out by itself. Each worker computes the same assignment from the live members
(rendezvous hashing: partition p goes to the member with the highest hash(member, p)), claims
the partitions it should own with create() (which fails while another worker holds the key),
renews them with revision-checked updates, and releases those it should no longer own.
Ownership is for cache affinity only: two workers briefly pulling the same partition during a
hand-over is harmless, because correctness never depends on a worker's KV cache.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

import structlog
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from specedge import subjects
from specedge.broker import bucket_keys, live_values

log = structlog.get_logger(__name__)


def owner_of(p: int, members: list[str]) -> str | None:
    """Rendezvous hashing: stable, and a member joining or leaving moves only its share."""
    if not members:
        return None
    return max(members, key=lambda m: hashlib.blake2b(f"{m}/{p}".encode(), digest_size=8).digest())


def assignment(members: list[str], partitions: int) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {m: set() for m in members}
    for p in range(partitions):
        o = owner_of(p, members)
        if o is not None:
            out[o].add(p)
    return out


async def kv_bucket(js, bucket: str, ttl_s: float):
    """A worker-maintained KV bucket, created like the main stream (file storage survives a
    broker restart, the same replicas survive a node loss). Two workers may race to create it;
    an existing bucket keeps its TTL."""
    for _ in range(3):
        try:
            return await js.key_value(bucket)
        except BucketNotFoundError:
            info = await js.stream_info(subjects.STREAM)
            try:
                return await js.create_key_value(KeyValueConfig(
                    bucket=bucket, history=1, ttl=ttl_s, storage=StorageType.FILE,
                    replicas=info.config.num_replicas or 1))
            except Exception as exc:  # created by another worker meanwhile: look again
                log.debug("bucket create raced", bucket=bucket, error=repr(exc))
    return await js.key_value(bucket)


class Leases:
    def __init__(self, js, name: str, partitions: int = subjects.PARTITIONS,
                 ttl_s: float = 6.0, renew_s: float = 1.0,
                 before_release: Callable[[list[int]], Awaitable[None]] | None = None):
        self.js, self.name, self.partitions = js, name, partitions
        # stops the pulling of partitions about to be released: once the next owner can
        # claim one, it must be the only one taking its blocks (or sessions hop workers)
        self.before_release = before_release
        self.ttl_s, self.renew_s = ttl_s, renew_s
        # a tick that takes longer than the leases live is cut short: it holds nothing by then
        self.tick_timeout_s = ttl_s
        self.owned: dict[int, int] = {}  # partition -> revision of our lease
        self.kv = None
        self.changed = asyncio.Event()

    async def start(self, timeout: float = 60.0) -> None:
        """Join: retried, since a fresh cluster may still be electing the bucket's leader."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                self.kv = await kv_bucket(self.js, subjects.LEASES, self.ttl_s)
                await asyncio.wait_for(self.tick(), self.tick_timeout_s)
                return
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("joining the fleet failed; retrying", worker=self.name,
                            error=repr(exc))
                await asyncio.sleep(0.5)

    async def keys(self, prefix: str) -> list[str]:
        """The bucket's live keys under `prefix` (never a watcher: see broker.bucket_keys)."""
        listed = await bucket_keys(self.js, subjects.LEASES, prefix)
        return sorted(await live_values(self.kv, listed))

    async def members(self) -> list[str]:
        return [k.split(".", 1)[1] for k in await self.keys("member.")]

    async def tick(self) -> None:
        """Heartbeat, then claim, renew and release towards the current assignment."""
        await self.kv.put(f"member.{self.name}", b"1")
        members = await self.members()
        if self.name not in members:
            members.append(self.name)
        want = assignment(sorted(members), self.partitions)[self.name]
        before = set(self.owned)
        # renew first: letting go may wait for pulls in flight, the kept leases must not lapse
        for p in sorted(want & set(self.owned)):
            try:
                self.owned[p] = await self.kv.update(f"part.{p}", self.name.encode(),
                                                     last=self.owned[p])
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                self.owned.pop(p, None)  # lost it (expired while we stalled): reclaim below
        going = sorted(set(self.owned) - want)
        if going and self.before_release is not None:
            await self.before_release(going)
        for p in going:
            await self._release(p)
        for p in sorted(want):
            key = f"part.{p}"
            if p not in self.owned:
                try:
                    self.owned[p] = await self.kv.create(key, self.name.encode())
                except KeyWrongLastSequenceError:
                    pass  # still held by its previous owner until it lets go or expires
        if set(self.owned) != before:
            log.info("partitions changed", worker=self.name, owned=sorted(self.owned),
                     members=len(members))
            self.changed.set()

    async def _release(self, p: int) -> None:
        rev = self.owned.pop(p, None)
        if rev is None:
            return
        try:
            await self.kv.delete(f"part.{p}", last=rev)
        except Exception:  # someone else holds it already, or the broker is away: it expires
            pass

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.renew_s)
            except TimeoutError:
                pass
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(self.tick(), self.tick_timeout_s)
            except Exception as exc:  # a broker outage: keep trying, leases may lapse meanwhile
                log.warning("lease renewal failed", worker=self.name,
                            error_type=type(exc).__name__, error=str(exc) or "timed out")

    async def release_all(self, timeout_s: float = 3.0) -> None:
        """Give every lease back at once, for at most timeout_s: with the broker gone, each
        delete would wait out its own request timeout, and the leases expire by themselves."""

        async def member() -> None:
            try:
                await self.kv.delete(f"member.{self.name}")
            except Exception:
                pass

        try:
            await asyncio.wait_for(asyncio.gather(*(self._release(p) for p in list(self.owned)),
                                                  member()), timeout_s)
        except TimeoutError:
            log.warning("leases not released in time; they expire by themselves",
                        worker=self.name, timeout_s=timeout_s)
        self.changed.set()


async def lease_owners(url: str) -> dict[int, str]:
    """partition -> worker name, from the leases bucket."""
    from specedge import broker

    nc = await broker.connect(url, "lease-probe")
    try:
        js = nc.jetstream()
        kv = await js.key_value(subjects.LEASES)
        parts = await live_values(kv, await bucket_keys(js, subjects.LEASES, "part."))
        return {int(k.split(".")[1]): v.decode() for k, v in parts.items()}
    except BucketNotFoundError:
        return {}
    finally:
        await nc.close()


async def wait_balanced(url: str, names: set[str], timeout: float = 60.0) -> dict[int, str]:
    """Wait until every partition is leased and exactly `names` hold them."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    owners: dict[int, str] = {}
    while loop.time() < end:
        owners = await lease_owners(url)
        if len(owners) == subjects.PARTITIONS and set(owners.values()) == names:
            return owners
        await asyncio.sleep(0.2)
    raise TimeoutError(f"partitions not balanced over {names}: {owners}")
