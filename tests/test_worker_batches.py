"""The verifier runs exactly one target forward per batch, whatever the batch size, and
answers bad blocks with a Rejected while serving everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    Rejected,
    Sampling,
    SessionOpened,
    decode,
    encode,
    pack_ids,
)
from specedge import broker, subjects
from specedge.config import AdaptiveBudget, TreeShape
from specedge.execution.support import PROBE_FORWARDS
from tests.stack import generate, reference_greedy, running_worker, wait_queued

pytestmark = pytest.mark.asyncio


async def test_one_target_forward_per_batch(nats_server, tiny_pair):
    target, draft = tiny_pair
    calls = []
    hook = target.register_forward_hook(lambda *a: calls.append(1))
    try:
        prompts = [[(7 * i + j) % 256 for j in range(3 + 5 * i)] for i in range(6)]
        gen = asyncio.create_task(generate(nats_server.url, draft, prompts, max_new_tokens=16))
        await wait_queued(nats_server.url, 6)
        # a fixed batch target and prefill chunk: no start-up calibration forwards in the count
        async with running_worker(target, nats_server.url, max_batch=8, prefill_chunk=256,
                                  adaptive=AdaptiveBudget(batch_tokens=16)) as w:
            results = await gen
    finally:
        hook.remove()
    # the start-up probe's forwards (specedge/execution/support.py) are no batch's
    assert len(calls) - PROBE_FORWARDS == w.stats.batches == w.engine.runner.forward_calls
    assert w.stats.blocks == sum(len(r.rounds) for r in results)
    assert max(w.stats.batch_sizes) >= 3  # queued first rounds share forwards
    for p, r in zip(prompts, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 16)


async def test_bad_blocks_are_rejected_and_others_served(nats_server, tiny_pair):
    target, draft = tiny_pair
    nc = await broker.connect(nats_server.url, "attacker")
    js = nc.jetstream()
    verdicts: dict[str, list] = {}

    async def collect(m):
        verdicts.setdefault(subjects.sid_of(m.subject).split(".")[1], []).append(decode(m.data))

    await nc.subscribe(subjects.verdict("*.*"), cb=collect)
    prompt = [5, 6, 7, 8]

    async def open_session(sid):
        o = SessionOpened(v=SCHEMA_VERSION, prompt=pack_ids(prompt), sampling=Sampling(), seed=0,
                          max_new_tokens=8, eos_ids=b"", target="t", draft="d", vocab_size=256)
        await js.publish(subjects.session(f"bad.{sid}"), encode(o))

    def block(**kw):
        base = dict(v=SCHEMA_VERSION, round=0, committed_len=4, root=8, tokens=pack_ids([1, 2]),
                    parents=pack_ids([0, 1]))
        base.update(kw)
        return encode(DraftBlock(**base))

    bad = {
        "undecodable": (b"\x93\xff garbage", "bad_message"),
        "oov": (block(tokens=pack_ids([1, 256])), "invalid_tree"),
        "negative": (block(tokens=pack_ids([-3, 1])), "invalid_tree"),
        "parent": (block(parents=pack_ids([0, 2])), "invalid_tree"),
        "cycle": (block(parents=pack_ids([1, 0])), "invalid_tree"),
        "large": (block(tokens=pack_ids([1] * 65), parents=pack_ids(list(range(65)))), "too_large"),
        "stale": (block(round=3), "stale"),
        "past": (block(committed_len=2), "stale"),
        "ragged": (block(tokens=b"\x01\x00\x00"), "invalid_tree"),
        "version": (encode(DraftBlock(v=99, round=0, committed_len=4, root=8, tokens=b"",
                                      parents=b"")), "bad_message"),
        "unknown": (block(), "unknown_session"),
    }
    for sid in bad:
        if sid != "unknown":
            await open_session(sid)
    honest_prompts = [[9, 8, 7], [1, 2, 3, 4, 5, 6]]
    async with running_worker(target, nats_server.url, max_batch=4) as w:
        honest = asyncio.create_task(generate(nats_server.url, draft, honest_prompts,
                                              max_new_tokens=20, shape=TreeShape.chain(3)))
        for sid, (data, _) in bad.items():
            await js.publish(subjects.draft(f"bad.{sid}"), data)
        results = await honest
        for _ in range(100):
            if all(sid in verdicts for sid in bad):
                break
            await asyncio.sleep(0.05)
    await nc.close()
    for sid, (_, code) in bad.items():
        got = verdicts.get(sid)
        assert got and isinstance(got[0], Rejected), f"{sid}: no rejection"
        assert got[0].code == code, f"{sid}: {got[0]}"
    assert w.stats.rejected == len(bad)
    for p, r in zip(honest_prompts, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 20)


@pytest.mark.parametrize("when", ["forward", "admission"])
async def test_a_close_during_its_batch_disturbs_nobody(nats_server, tiny_pair, when):
    """A client hangs up while its session's block is in the batched forward, or while the
    batch is being formed: its KV is freed after that forward, not from under it, and not
    leaked. The batch does not fail and the sessions sharing it keep their caches (no
    rebuild) and their exact output."""
    target, draft = tiny_pair
    url = nats_server.url
    loop = asyncio.get_running_loop()
    others = [[(11 * i + j) % 256 for j in range(6 + 3 * i)] for i in range(2)]
    victim_sid = "anon.hangs-up"
    async with running_worker(target, url, max_batch=8, prefill_chunk=256,
                              adaptive=AdaptiveBudget(batch_tokens=16)) as w:
        runner = w.engine.runner
        inner, fit = runner.forward_flat, w._fit
        fired = []

        def spy(segments):
            st = w.sessions.get(victim_sid)
            if not fired and st is not None and len(segments) > 1 and any(
                    s.seq is st.kv for s in segments) and st.round >= 2:
                fired.append(True)
                loop.call_soon_threadsafe(victim.cancel)  # the edge closes its session
                for _ in range(500):  # until the worker has handled the close
                    if victim_sid in w._closed:
                        break
                    time.sleep(0.01)
                time.sleep(0.05)
            return inner(segments)

        async def fit_spy(work, raw):  # the batch is formed; the forward is next
            if not fired and len(work) > 1 and any(
                    st.sid == victim_sid and st.round >= 2 for _, st, _, _ in work):
                fired.append(True)
                victim.cancel()
                for _ in range(500):
                    if victim_sid in w._closed:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)  # its release runs on the forward thread first
            return await fit(work, raw)

        if when == "forward":
            runner.forward_flat = spy
        else:
            w._fit = fit_spy
        victim = asyncio.create_task(generate(url, draft, [[3, 1, 4, 1, 5]], max_new_tokens=400,
                                              sids=[victim_sid]))
        results = await generate(url, draft, others, max_new_tokens=48)
        with contextlib.suppress(asyncio.CancelledError):
            await victim
    assert fired, "the victim never shared a forward with the others"
    assert victim_sid in w._closed and w.sessions.get(victim_sid) is None
    assert w.stats.failed_batches == 0
    assert all(rec.kv_hit for r in results for rec in r.rounds[1:])  # never rebuilt
    for p, r in zip(others, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 48)
    assert w.engine.pool.used_blocks == 0  # everybody's KV went back, the victim's too


async def test_new_sessions_start_from_their_opening_and_blocks_decode_ahead(nats_server,
                                                                            tiny_pair):
    """Sessions opened while the worker runs get their state from the broadcast opening (no
    log read); with prepare_ahead the next batch's blocks are decoded during the forward. Both
    leave the output the target's own."""
    target, draft = tiny_pair
    prompts = [[(5 * i + j) % 256 for j in range(2 + 3 * i)] for i in range(8)]
    async with running_worker(target, nats_server.url, max_batch=4, prefill_chunk=256,
                              adaptive=AdaptiveBudget(batch_tokens=16),
                              prepare_ahead=True) as w:
        results = await generate(nats_server.url, draft, prompts, max_new_tokens=24)
    for p, r in zip(prompts, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 24)
    assert w.stats.log_reads == 0
    assert w.stats.prepared > 0
    assert w.stats.blocks == sum(len(r.rounds) for r in results)


async def test_sessions_opened_before_the_worker_are_read_from_the_log(nats_server, tiny_pair):
    target, draft = tiny_pair
    prompts = [[(3 * i + j) % 256 for j in range(4 + i)] for i in range(3)]
    gen = asyncio.create_task(generate(nats_server.url, draft, prompts, max_new_tokens=8))
    await wait_queued(nats_server.url, 3)
    async with running_worker(target, nats_server.url, prefill_chunk=256,
                              adaptive=AdaptiveBudget(batch_tokens=16)) as w:
        results = await gen
    for p, r in zip(prompts, results, strict=True):
        assert r.token_ids == reference_greedy(target, p, 8)
    assert w.stats.log_reads == 3
    assert w.stats.prepared == 0  # prepare_ahead is off on a CPU by default
