"""One bad session fails alone: a forward that raises whenever one session is in it (injected
after the model ran, so every session's KV has grown by then) costs the other sessions of the
batch nothing but a few retries in the same step. They get exact verdicts from that step on;
the faulty one gets an internal_error rejection, which its edge raises, and its block is not
redelivered; the worker stays up. Real nats-server, tiny float64 models."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
import torch

from schemas import SCHEMA_VERSION, Sampling, SessionOpened, pack_ids
from specedge import subjects
from specedge.config import AdaptiveBudget, TreeShape
from specedge.edge.errors import rejection_status
from specedge.edge.session import SessionRejected
from specedge.execution.tree import depths_of
from specedge.execution.walk import commit
from tests.stack import generate, reference_greedy
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock
from workers.verifier.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(180)

BAD = "anon.faulty-session"


@pytest.mark.asyncio
async def test_a_faulty_session_fails_alone(nats_server, tiny_pair):
    target, draft = tiny_pair
    url = nats_server.url
    w = Worker(target, url, WorkerConfig(max_batch=8, prefill_chunk=256, probe_every=0,
                                         adaptive=AdaptiveBudget(batch_tokens=16)))
    engine, runner = w.engine, w.engine.runner
    real_verify, real_forward = engine.verify, runner.forward_flat
    calls: list[tuple[int, list[str], bool]] = []  # (step, sessions, raised) per verify
    current: dict = {}
    first_forward_held = []

    def verify(work, chunk=None):  # engine.verify_isolating calls it for every attempt
        current["work"] = work
        step = w.stats.batches
        try:
            out = real_verify(work, chunk)
        except Exception:
            calls.append((step, [st.sid for st, _ in work], True))
            raise
        calls.append((step, [st.sid for st, _ in work], False))
        return out

    def forward(segments):
        if not first_forward_held:  # the warm-up's: until the four blocks wait in the inbox
            first_forward_held.append(True)
            end = time.monotonic() + 30
            while w._inbox.qsize() < 4 and time.monotonic() < end:
                time.sleep(0.01)
        out = real_forward(segments)  # every session's KV grows...
        bad = [st for st, _ in current["work"] if st.sid == BAD]
        if bad and any(s.seq is bad[0].kv for s in segments):  # ... then the fault
            raise RuntimeError("injected fault on this session\nsecond line of detail")
        return out

    engine.verify, runner.forward_flat = verify, forward
    task = asyncio.create_task(w.run())
    await asyncio.wait_for(w.ready.wait(), 30)
    try:
        warm_task = asyncio.create_task(generate(url, draft, [[1, 2, 3]], max_new_tokens=4))
        for _ in range(3000):  # the warm-up's forward has started (and waits)
            if first_forward_held:
                break
            await asyncio.sleep(0.01)
        prompts = [[(7 * i + j) % 256 for j in range(4 + 3 * i)] for i in range(4)]
        sids = [subjects.new_session_id() for _ in range(3)] + [BAD]
        results = await generate(url, draft, prompts, max_new_tokens=24,
                                 shape=TreeShape.chain(3), sids=sids, return_exceptions=True)
        await warm_task
        await asyncio.sleep(2.5)  # past the consumer's ack wait (2 s): no redelivery came
        assert not task.done()  # the worker is up, and serves a session after all that
        (after,) = await generate(url, draft, [[9, 9, 9, 1]], max_new_tokens=12)
    finally:
        w.stop()
        await asyncio.wait_for(task, 30)
    # the good sessions: the target's own output, though their first step's forward failed
    for p, r in zip(prompts[:3], results[:3], strict=True):
        assert not isinstance(r, BaseException), r
        assert r.token_ids == reference_greedy(target, p, 24)
    assert after.token_ids == reference_greedy(target, [9, 9, 9, 1], 12)
    # the faulty one: a clear error for its user, one line
    err = results[3]
    assert isinstance(err, SessionRejected), err
    r = err.rejected
    assert r.code == "internal_error" and r.round == 0 and "\n" not in r.reason
    assert "RuntimeError: injected fault on this session" in r.reason
    assert rejection_status(r.code) == 500
    # the step: the whole batch raised, then the sessions apart; the others' verdicts came
    # from that same step (no later step re-verified their first round)
    step, batch, _ = next(c for c in calls if BAD in c[1] and c[2])
    assert len(batch) >= 4, batch  # the four (and maybe the warm-up's next block)
    same_step = [c for c in calls if c[0] == step]
    served = {sid for _, sids_, raised in same_step if not raised for sid in sids_}
    assert served == set(batch) - {BAD}
    assert [c[1] for c in same_step if c[2] and len(c[1]) == 1] == [[BAD]]
    # found by halving: the batch, then two halves per level down to the bad one alone
    assert len(same_step) <= 1 + 2 * math.ceil(math.log2(len(batch))), same_step
    # never again: its block was terminated, not redelivered
    assert all(BAD not in c[1] for c in calls if c[0] != step)
    assert w.stats.faulty == 1 and w.stats.failed_batches == 1
    assert w.sessions.get(BAD) is None


def test_the_failed_forward_is_undone_for_the_others(tiny_pair):
    """The engine alone: three sessions verified together round by round; in round 2 the
    forward raises (after the model appended every session's KV) whenever the bad one is in
    it. The others' KV is rolled back to before that forward and retried without it: their
    caches are kept (kv_hit, no rebuild) and their output is the fault-free run's, token for
    token, round after round."""
    target = tiny_pair[0]
    parents = [0, 0, 1, 2, 1]
    prompts = [[(5 * i + j) % 256 for j in range(20 + 9 * i)] for i in range(3)]

    def run(faulty: bool) -> tuple[list[list[int]], list]:
        engine = Engine(target, prefix_cache_tokens=0)
        states = [SessionState.from_opened(f"anon.s{i}", SessionOpened(
            v=SCHEMA_VERSION, prompt=pack_ids(p), sampling=Sampling(), seed=0,
            max_new_tokens=64, eos_ids=b"", target="t", draft="d", vocab_size=256))
            for i, p in enumerate(prompts)]
        bad = states[1]
        inner = engine.runner.forward_flat

        def forward(segments):
            out = inner(segments)
            if faulty and bad.round == 2 and any(s.seq is bad.kv for s in segments):
                raise RuntimeError("injected")
            return out

        engine.runner.forward_flat = forward
        g = torch.Generator().manual_seed(3)
        fault_step = None
        for r in range(5):
            live = [st for st in states if not (faulty and st is bad and r > 2)]
            blocks = [CheckedBlock(r, torch.randint(0, 256, (5,), generator=g).tolist(),
                                   parents, depths_of(parents)) for _ in live]
            outs = engine.verify_isolating(list(zip(live, blocks, strict=True)))
            if faulty and r == 2:
                fault_step = outs
            for st, blk, out in zip(live, blocks, outs, strict=True):
                if isinstance(out, Exception):
                    continue
                new = [blk.tokens[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
                new, _ = commit(new, st.generated, st.max_new_tokens, st.eos_ids)
                st.committed += new
                st.round += 1
                assert st.kv.length == len(st.committed) - 1
        return [st.committed for st in states], fault_step

    clean, _ = run(False)
    got, step = run(True)
    assert isinstance(step[1], RuntimeError)
    assert all(o.kv_hit and o.walk is not None for i, o in enumerate(step) if i != 1)
    assert got[0] == clean[0] and got[2] == clean[2]  # five rounds, the fault in the middle
    assert got[1] == clean[1][: len(got[1])] and len(got[1]) < len(clean[1])


def test_a_fault_of_every_forward_is_nobodys(tiny_pair):
    """A forward that fails whatever is in it (the device, the pool): every session fails alone
    too, and every session's KV is back where it was (the worker then redelivers them all, as
    a failed batch always was, instead of blaming one)."""
    engine = Engine(tiny_pair[0], prefix_cache_tokens=0)
    states = [SessionState.from_opened(f"anon.t{i}", SessionOpened(
        v=SCHEMA_VERSION, prompt=pack_ids([3 + i, 1, 4, 1, 5] * (3 + i)), sampling=Sampling(),
        seed=0, max_new_tokens=8, eos_ids=b"", target="t", draft="d", vocab_size=256))
        for i in range(3)]
    chain = [0, 1, 2]

    def blocks(r):
        return [CheckedBlock(r, [7, 8, 9], chain, depths_of(chain)) for _ in states]

    for st, out in zip(states, engine.verify_isolating(list(zip(states, blocks(0),
                                                                strict=True))), strict=True):
        new = [7, 8, 9][: len(out.walk.accepted)] + [out.walk.next_token]
        st.committed += new
        st.round += 1
    before = [(st.kv, st.kv.length) for st in states]
    inner = engine.runner.forward_flat

    def broken(segments):
        inner(segments)
        raise RuntimeError("device lost")

    engine.runner.forward_flat = broken
    outs = engine.verify_isolating(list(zip(states, blocks(1), strict=True)))
    assert all(isinstance(o, RuntimeError) for o in outs)
    assert [(st.kv, st.kv.length) for st in states] == before
