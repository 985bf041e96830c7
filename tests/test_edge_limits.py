"""Per-edge limits on the verifier: an edge over its open-session or round-rate allowance gets
a clear Rejected (too_many_sessions / rate_limited) at once, while other edges are served as
if it were not there. Real nats-server with the shipped secure configuration, real models."""

from __future__ import annotations

import asyncio
import time

import pytest

from schemas import SCHEMA_VERSION, DraftBlock, Rejected, decode, encode, pack_ids
from specedge import broker, subjects
from specedge.config import Limits, TreeShape
from specedge.edge.session import SessionRejected
from tests.conftest import FAST_CONSUMER
from tests.secure import start_secure
from tests.stack import generate, reference_greedy, running_worker

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]


@pytest.fixture
def secure(tmp_path):
    sb = start_secure(tmp_path, ["greedy", "flood", "polite"], consumer=FAST_CONSUMER)
    yield sb
    sb.stop()


def run(sb, draft, user: str, prompts: list[list[int]], new: int, **kw):
    return generate(sb.url, draft, prompts, max_new_tokens=new, shape=TreeShape.chain(3),
                    connect_opts=sb.opts(user), sids=[subjects.new_session_id(user) for _ in prompts],
                    return_exceptions=True, **kw)


async def test_too_many_sessions_refused_others_unaffected(secure, tiny_pair):
    target, draft = tiny_pair
    greedy_p = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    polite_p = [[10, 11, 12, 13], [14, 15]]
    async with running_worker(target, secure.url, max_batch=8, consumer=FAST_CONSUMER,
                              limits=Limits(max_sessions_per_edge=2),
                              connect_opts=secure.opts("verifier")) as w:
        t0 = time.perf_counter()
        greedy, polite = await asyncio.gather(run(secure, draft, "greedy", greedy_p, 24),
                                              run(secure, draft, "polite", polite_p, 24))
        wall = time.perf_counter() - t0
        refused = [r for r in greedy if isinstance(r, BaseException)]
        assert len(refused) == 1, greedy
        assert isinstance(refused[0], SessionRejected)
        assert refused[0].rejected.code == "too_many_sessions"
        assert "limit is 2" in refused[0].rejected.reason and refused[0].rejected.round == 0
        for p, r in zip(greedy_p, greedy, strict=True):
            if not isinstance(r, BaseException):
                assert r.token_ids == reference_greedy(target, p, 24)
        for p, r in zip(polite_p, polite, strict=True):
            assert not isinstance(r, BaseException), r
            assert r.token_ids == reference_greedy(target, p, 24)
        assert wall < 20, "the refusal must come at once, not after the edge's retries"
        # the edge's sessions closed: its allowance is back
        again = await run(secure, draft, "greedy", [greedy_p[2]], 16)
        assert again[0].token_ids == reference_greedy(target, greedy_p[2], 16)
    assert w.admission.refused["too_many_sessions"] == 1


async def test_round_rate_limited_edge_refused_others_unaffected(secure, tiny_pair):
    target, draft = tiny_pair
    polite_p = [[21, 22, 23, 24, 25]]
    async with running_worker(target, secure.url, max_batch=8, consumer=FAST_CONSUMER,
                              limits=Limits(edge_rounds_per_s=20, edge_rounds_burst=20),
                              connect_opts=secure.opts("verifier")) as w:
        flood_nc = await broker.connect(secure.url, "flood-spam", **secure.opts("flood"))
        spam_sid = subjects.new_session_id("flood")
        answers: list = []

        async def collect(m):
            answers.append(decode(m.data))

        await flood_nc.subscribe(subjects.verdict(spam_sid), cb=collect)
        block = encode(DraftBlock(v=SCHEMA_VERSION, round=0, committed_len=3, root=1,
                                  tokens=pack_ids([1, 2]), parents=pack_ids([0, 1])))
        flood_p = [[31, 32, 33], [34, 35], [36, 37, 38, 39]]
        flood_run = asyncio.create_task(run(secure, draft, "flood", flood_p, 300,
                                            verdict_timeout_s=20, max_retries=1))
        polite_run = asyncio.create_task(run(secure, draft, "polite", polite_p, 12))
        sent, t0 = 0, time.perf_counter()
        while not flood_run.done() and sent < 4_000:  # ~200 raw rounds/s more from the same edge
            for _ in range(10):
                await flood_nc.publish(subjects.draft(spam_sid), block)
            sent += 10
            await asyncio.sleep(0.05)
        flood_res, [polite_res] = await flood_run, await polite_run
        elapsed = time.perf_counter() - t0
        for _ in range(100):  # the last refusals in flight
            if len(answers) >= sent:
                break
            await asyncio.sleep(0.05)
        await flood_nc.close()
    # the flooding edge's own sessions stopped with a clear error instead of hanging
    for r in flood_res:
        assert isinstance(r, SessionRejected), r
        assert r.rejected.code == "rate_limited" and "rounds/s" in r.rejected.reason
    # the other edge: exact output, unaffected
    assert not isinstance(polite_res, BaseException), polite_res
    assert polite_res.token_ids == reference_greedy(target, polite_p[0], 12)
    codes = [a.code for a in answers if isinstance(a, Rejected)]
    assert len(answers) == sent, "every raw block answered, none queued"
    # beyond the burst and the refill, everything the edge sent was refused for its rate
    admitted = len(codes) - codes.count("rate_limited")
    assert codes.count("rate_limited") > 0 and admitted <= 20 + 20 * elapsed, (sent, admitted)
    assert w.admission.refused["rate_limited"] >= codes.count("rate_limited")
    print(f"flood: {sent} blocks sent, {codes.count('rate_limited')} refused as rate_limited")
