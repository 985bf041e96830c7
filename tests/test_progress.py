"""A slow verifier is not a dead one: while a verifier holds a session's block it reports
progress (schemas.Progress on specedge.progress.<edge>.<nonce>), and the edge's patience
follows the reports. The verifier is made slow by sleeping in its forward (not by the CPU: the
test means the same on any machine), the edge's own wait is tiny (0.2 s), and the session is
still answered exactly with no re-publish; a verifier killed mid-prefill still brings the
give-up. Real nats-server, tiny float64 models."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from schemas import Progress, decode
from specedge import broker, subjects
from specedge.config import AdaptiveBudget, TreeShape
from specedge.edge.drafter import Drafter
from specedge.edge.link import Link
from specedge.edge.session import EdgeSession, SessionParams
from specedge.execution import PackedRunner
from tests.procs import ProcWorker
from tests.stack import reference_greedy
from workers.verifier.progress import ProgressReporter
from workers.verifier.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(180)

# The edge's own patience: 1.5 s of silence (0.2 s once rounds are measured, but never under
# three of the verifier's announced reporting intervals). A block's pull may take up to the
# worker's fetch timeout (1 s), before which nobody can report on it.
SHORT_WAIT = dict(verdict_timeout_s=1.5, verdict_wait_min_s=0.2, verdict_wait_factor=1.0)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def edge_session(nc, draft, ids: list[int], new_tokens: int, ex, **params) -> EdgeSession:
    return EdgeSession(nc, nc.jetstream(), Drafter(PackedRunner(draft)), ex, SessionParams(
        prompt_ids=ids, max_new_tokens=new_tokens, shape=TreeShape.chain(3), adaptive=False,
        **params))


def test_reports_are_rate_limited_per_session_and_round():
    rep = ProgressReporter("w", every_s=1.0)
    assert rep.report("a.x", 0, "queued", now=10.0) is not None
    assert rep.report("a.x", 0, "prefilling", 16, 400, now=10.1) is None  # < every_s / 4
    assert rep.report("b.y", 0, "queued", now=10.1) is not None  # another session
    assert rep.report("a.x", 1, "queued", now=10.1) is not None  # a new round: at once
    subject, body = rep.report("a.x", 1, "prefilling", 32, 400, now=10.4)
    assert subject == subjects.progress("a.x") == "specedge.progress.a.x"
    msg = decode(body)
    assert isinstance(msg, Progress)
    assert (msg.round, msg.stage, msg.done, msg.total, msg.every_s, msg.worker) == (
        1, "prefilling", 32, 400, 1.0, "w")
    assert rep.sent == 4
    # progress is never stored: the stream takes only the three session subjects
    assert not any(subject.startswith(f"{subjects.PREFIX}.{k}.")
                   for k in subjects.KINDS)
    with pytest.raises(ValueError):
        ProgressReporter("w", every_s=0)


@pytest.mark.asyncio
async def test_slow_prefill_is_answered_exactly_without_republish(nats_server, tiny_pair):
    """Every forward of the verifier sleeps 50 ms and one of them 4 s: the 300-token prompt's
    prefill in 16-token chunks takes about 5 s, three times the longest silence the edge
    allows (1.5 s), and one forward alone lasts more than two of them. The reports before each
    chunk, and the keep-alive's during the long forward (every 0.5 s), keep it waiting: no
    re-publish, no give-up (max_retries=1 would end it at the second silence), the exact
    answer."""
    target, draft = tiny_pair
    ids = prompt(300, 5)
    w = Worker(target, nats_server.url, WorkerConfig(
        prefill_chunk=16, probe_every=0, progress_every_s=0.5,
        adaptive=AdaptiveBudget(batch_tokens=16)))
    runner, inner = w.engine.runner, w.engine.runner.forward_flat
    long_forward: list[float] = []

    def slow(segments):
        pause = 4.0 if runner.forward_calls == 3 else 0.05
        if pause > 1:
            long_forward.append(time.time())
        time.sleep(pause)  # a slow verifier, whatever this machine's speed
        if pause > 1:
            long_forward.append(time.time())
        return inner(segments)

    runner.forward_flat = slow
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 30)
    nc = await broker.connect(nats_server.url, "slow-edge")
    reports: list[Progress] = []

    async def collect(m):
        reports.append(decode(m.data))

    await nc.subscribe(subjects.progress("*.*"), cb=collect)
    ex = ThreadPoolExecutor(1)
    try:
        s = edge_session(nc, draft, ids, 12, ex, max_retries=1, **SHORT_WAIT)
        t0 = time.monotonic()
        result = await s.run()
        took = time.monotonic() - t0
    finally:
        ex.shutdown()
        await nc.close()
        w.stop()
        await asyncio.wait_for(task, 30)
    assert result.token_ids == reference_greedy(target, ids, 12)
    assert s.republished == 0 and s.lookups_failed == 0
    assert took > 4.5 >= 3 * SHORT_WAIT["verdict_timeout_s"]  # it was slow, nobody gave up
    assert w.stats.prefill_chunks == 299 // 16
    prefill = [r for r in reports if r.round == 0 and r.stage == "prefilling"]
    assert prefill and all(r.total == 300 and r.worker == w.cfg.name for r in prefill)
    assert [r.done for r in prefill] == sorted(r.done for r in prefill)
    assert prefill[0].done == 0 and prefill[-1].done >= 300 - 4 * 16
    # the keep-alive spoke during the 4 s forward, every 0.5 s
    during = [r.t for r in reports if long_forward[0] <= r.t <= long_forward[1]]
    assert len(during) >= 5, (len(during), long_forward)
    assert max(b - a for a, b in zip(during, during[1:], strict=False)) < 1.5
    assert s.progress_heard >= len(prefill)


@pytest.mark.asyncio
async def test_killed_verifier_still_brings_the_give_up(nats_server, tiny_pair, target_dir,
                                                        tmp_path):
    """The counter-test: a verifier killed (-9) mid-prefill sends nothing more. The edge heard
    it working, then silence: it re-publishes once and gives up (TimeoutError, the CLI's exit
    5), within a few of the announced reporting intervals."""
    _, draft = tiny_pair
    ids = prompt(900, 6)
    wk = ProcWorker(nats_server.url, target_dir, "doomed", tmp_path, "--prefill-chunk", "1",
                    "--adaptive-batch-tokens", "16")
    nc = await broker.connect(nats_server.url, "orphaned-edge")
    ex = ThreadPoolExecutor(1)
    try:
        for _ in range(600):
            if "verifier ready" in wk.log():
                break
            await asyncio.sleep(0.1)
        s = edge_session(nc, draft, ids, 8, ex, max_retries=1, **SHORT_WAIT)
        run = asyncio.create_task(s.run())
        for _ in range(3000):  # until the verifier reports working on the prefill
            if s.progress is not None and s.progress.stage == "prefilling":
                break
            await asyncio.sleep(0.01)
        assert s.progress is not None and s.progress.stage == "prefilling", wk.log()[-2000:]
        wk.signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(TimeoutError, match="no verdict for round 0 after 1 re-publishes"):
            await asyncio.wait_for(run, 60)
        waited = time.monotonic() - killed
    finally:
        ex.shutdown()
        await nc.close()
        with contextlib.suppress(Exception):
            wk.stop()
    assert s.republished >= 1
    # two silences of 3 announced reporting intervals (1 s each): the edge's own 0.2 s wait
    # did not cut them short
    every = s.progress.every_s
    assert every == 1.0 and 2 * 3 * every - 1.0 < waited < 20, waited


@pytest.mark.asyncio
async def test_sessions_on_one_connection_hear_their_own_progress(nats_server, tiny_pair):
    """Two long prompts through one edge connection: one progress subscription for the edge
    (the broker caps subscriptions per connection; verdicts already take one per session),
    each report routed to its own session."""
    target, draft = tiny_pair
    ids = [prompt(200, 7), prompt(330, 8)]
    w = Worker(target, nats_server.url, WorkerConfig(
        prefill_chunk=16, probe_every=0, adaptive=AdaptiveBudget(batch_tokens=16)))
    inner = w.engine.runner.forward_flat

    def slow(segments):
        time.sleep(0.05)
        return inner(segments)

    w.engine.runner.forward_flat = slow
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 30)
    nc = await broker.connect(nats_server.url, "two-session-edge")
    ex = ThreadPoolExecutor(1)
    try:
        sessions = [edge_session(nc, draft, p, 6, ex, **SHORT_WAIT) for p in ids]
        totals: list[set[int]] = [set(), set()]

        def heard(i: int, s: EdgeSession):
            inner_cb = s._on_progress

            async def cb(m):
                totals[i].add(decode(m.data).total)
                await inner_cb(m)
            return cb

        for i, s in enumerate(sessions):
            s._on_progress = heard(i, s)
        results = await asyncio.gather(*(s.run() for s in sessions))
        subs = Link.of(nc)._progress_subs
    finally:
        ex.shutdown()
        await nc.close()
        w.stop()
        await asyncio.wait_for(task, 30)
    for p, s, r in zip(ids, sessions, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 6)
        assert s.progress_heard >= 1
    assert [t - {0} for t in totals] == [{len(p)} for p in ids]  # each its own prompt's
    assert list(subs) == [subjects.ANON]
