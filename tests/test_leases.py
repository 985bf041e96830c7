"""Partition leases on a real JetStream KV bucket: a worker stops pulling a partition before
it lets the lease go, so the next owner is the only one taking that partition's blocks."""

from __future__ import annotations

from specedge import broker, subjects
from workers.verifier.leases import Leases, assignment


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
