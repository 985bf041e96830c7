"""Partition leases on a real JetStream KV bucket: a worker stops pulling a partition before
it lets the lease go, so the next owner is the only one taking that partition's blocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import structlog

from specedge import broker, subjects
from specedge.config import AdaptiveBudget
from workers.verifier.leases import Leases, assignment, lease_owners
from workers.verifier.worker import Worker, WorkerConfig


async def test_pulling_stops_before_the_lease_goes(nats_server):
    nc = await broker.connect(nats_server.url, "lease-test")
    js = nc.jetstream()
    seen: list[tuple[list[int], dict[int, str]]] = []

    async def before_release(parts: list[int]) -> None:
        # still ours while the pullers stop: nobody else may have claimed them yet
        owners = {p: (await first.kv.get(f"part.{p}")).value.decode() for p in parts}
        seen.append((parts, owners))

    try:
        first = Leases(js, "a", ttl_s=30, before_release=before_release)
        await first.start()
        assert set(first.owned) == set(range(subjects.PARTITIONS))
        second = Leases(js, "b", ttl_s=30)
        await second.start()  # joins: a member, though a still holds everything
        assert not second.owned
        await first.tick()  # a sees b, hands b's share over
        await second.tick()  # b claims it
        share = assignment(["a", "b"], subjects.PARTITIONS)
        assert len(seen) == 1
        parts, owners = seen[0]
        assert set(parts) == share["b"] and set(owners.values()) == {"a"}
        assert set(first.owned) == share["a"] and set(second.owned) == share["b"]
    finally:
        await nc.close()


async def test_members_leave_at_once_and_listing_needs_no_watcher(nats_server):
    """A worker that let its leases go is no member for the others at their next tick (its
    deleted key's marker is not a member), and the listing reads the bucket's stream, not a
    watcher (whose end-of-keys wait can hang on a TTL'd bucket)."""
    nc = await broker.connect(nats_server.url, "lease-test")
    js = nc.jetstream()
    try:
        a, b = Leases(js, "a", ttl_s=30), Leases(js, "b", ttl_s=30)
        await a.start()
        await b.start()
        assert await a.members() == ["a", "b"]

        async def no_watcher(*_a, **_k):
            raise AssertionError("KeyValue.keys() called")

        a.kv.keys = no_watcher
        await b.release_all()
        assert await a.members() == ["a"]
        await a.tick()
        assert set(a.owned) == set(range(subjects.PARTITIONS))
        assert set((await lease_owners(nats_server.url)).values()) == {"a"}
    finally:
        await nc.close()


@contextlib.contextmanager
def info_logs():
    """Capture structlog events from info up (the suite logs warnings only)."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**old)


async def test_drain_finishes_while_the_key_listing_hangs(nats_server, tiny_pair):
    """The lease renewal stuck in a key listing that never returns (what nats-py's keys() can
    do): stop() still drains, each step logged, the stuck one cut short at its bound."""
    target, _ = tiny_pair
    w = Worker(target, nats_server.url, WorkerConfig(lease_renew_s=0.1, lease_ttl_s=30,
                                                     adaptive=AdaptiveBudget(batch_tokens=16),
                                                     prefill_chunk=64))
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 60)
    stuck = asyncio.Event()

    async def never(prefix: str) -> list[str]:
        stuck.set()
        await asyncio.Event().wait()  # never set
        return []

    w.leases.keys = never
    await asyncio.wait_for(stuck.wait(), 10)
    with info_logs() as logs:
        t0 = time.monotonic()
        w.stop("test")
        await asyncio.wait_for(task, 30)
        took = time.monotonic() - t0
    events = [(e["event"], e.get("step")) for e in logs]
    assert ("stop requested; draining", None) in events
    assert ("drain step timed out; going on", "stop lease renewal") in events
    steps = [s for e, s in events if e == "drain step"]
    assert steps[:1] == ["stop pulling"] and "release leases" in steps
    assert "close the connection" in steps and events[-2][0] == "drained", events
    print(f"drain with a hung key listing took {took:.2f} s")
    assert took < 15, took
    assert await lease_owners(nats_server.url) == {}  # released, not left to expire
