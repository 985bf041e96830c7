"""Limits known before any work: the verifiers' limits board (a real nats-server, the verifier's
own board code) and the edge's refusal rule."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import pytest

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    Rejected,
    Sampling,
    SessionOpened,
    Verdict,
    decode,
    encode,
    pack_ids,
)
from specedge import broker, fleet, subjects
from specedge.config import Limits, TreeShape
from specedge.edge.__main__ import EXIT_REFUSED
from specedge.edge.limits import EdgeLimits, LimitError, plan
from specedge.fleet import FleetLimits, FleetView
from tests.procs import ROOT
from tests.stack import running_worker
from workers.verifier.board import Board, effective_limits


def entry(name: str, **kw) -> FleetLimits:
    positions = kw.pop("max_positions", 1024)
    limits = Limits(max_positions=positions, **kw)
    return FleetLimits.of(limits, name, "tiny-target", 256)


FLEET = entry("v1", max_prompt_tokens=100, max_new_tokens=50, max_nodes=4, max_depth=3)
SHAPE = TreeShape(4, 3, 2, 2)


def admit(prompt: int, new: int | None, fl: FleetLimits | None = FLEET, **kw):
    args = dict(default_new_tokens=30, shape=SHAPE, max_budget=16, own=EdgeLimits(),
                fleet=fl, draft_positions=1024, draft_vocab=256) | kw
    return plan(prompt, new, **args)


@pytest.mark.parametrize("prompt, new, kw, code, param", [
    (101, 10, {}, "context_length_exceeded", "prompt"),  # over the fleet's max_prompt_tokens
    (60, 10, {"own": EdgeLimits(max_prompt_tokens=50)}, "context_length_exceeded", "prompt"),
    (10, 51, {}, "invalid_value", "max_tokens"),  # over the fleet's max_new_tokens
    (10, 41, {"own": EdgeLimits(max_new_tokens=40)}, "invalid_value", "max_tokens"),
    # positions: 1022 + 1 - 1 + 3 > 1024, even one new token does not fit below the tree
    (1022, None, {"fleet": None}, "context_length_exceeded", "prompt"),
    # prompt + max_tokens - 1 + depth = 95 + 27 - 1 + 3 > 120 positions of the target
    (95, 27, {"fleet": entry("v", max_positions=120)}, "context_length_exceeded", "max_tokens"),
    (10, 8, {"shape": TreeShape(8, 3, 2, 2), "clamp_shape": False}, "tree_too_large", "tree"),
    (10, 8, {"draft_vocab": 512}, "vocab_mismatch", None),
])
def test_refusals(prompt, new, kw, code, param):
    with pytest.raises(LimitError) as e:
        admit(prompt, new, **kw)
    assert (e.value.code, e.value.param) == (code, param), e.value.message
    assert e.value.status == (502 if code == "vocab_mismatch" else 400)


def test_admitted_sessions_fit():
    # exactly the target's 120 positions: 95 + 23 - 1 + 3 = 120
    p = admit(95, 23, entry("v", max_positions=120))
    assert p.max_new_tokens == 23 and p.positions == 120
    # left out, max_tokens is the default capped by what fits: 120 - (95 - 1 + 3) = 23
    assert admit(95, None, entry("v", max_positions=120)).max_new_tokens == 23
    assert admit(10, None).max_new_tokens == 30  # the default
    assert admit(10, None, own=EdgeLimits(max_new_tokens=20)).max_new_tokens == 20
    # plain decoding has no lookahead: a 1024-token prompt leaves one new token
    assert admit(1024, None, fleet=None, shape=TreeShape(0, 1, 1, 1)).max_new_tokens == 1
    # no verifier known: the verifiers' defaults (8192 prompt tokens) and the draft's positions
    assert admit(900, None, fleet=None).max_new_tokens == 30
    # serve clamps its configured tree to the fleet's and caps adaptive budgets at max_nodes
    p = admit(10, 8, shape=TreeShape(8, 6, 2, 2))
    assert (p.shape.budget, p.shape.depth, p.max_budget) == (4, 3, 4)


def test_strictest_and_effective_limits():
    a = entry("a", max_prompt_tokens=100, min_temperature=0.01)
    b = entry("b", max_nodes=8, max_positions=0)  # positions unknown: ignored
    m = fleet.strictest([a, b])
    assert m.verifiers == ("a", "b")
    assert (m.max_prompt_tokens, m.max_nodes, m.max_positions, m.min_temperature) == (
        100, 8, 1024, 0.01)
    assert fleet.decode(fleet.encode(m)) == m

    class Cfg:
        max_position_embeddings = 32768

    assert effective_limits(Limits(), Cfg).max_positions == 32768
    assert effective_limits(Limits(max_positions=4096), Cfg).max_positions == 4096
    assert effective_limits(Limits(max_positions=4096), object()).max_positions == 4096
    assert effective_limits(Limits(), object()).max_positions == 0


async def wait_until(pred, timeout: float = 10.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(60)
async def test_board_merges_live_verifiers_and_forgets_dead_ones(nats_server):
    """Verifiers' boards on a real broker; an edge's view (request, then broadcasts only) is
    always the strictest over the live entries: a join tightens it, a leave and an expiry
    (a worker that died without leaving) loosen it."""
    ncs = [await broker.connect(nats_server.url, f"board-{i}") for i in range(4)]
    boards = [Board(ncs[i], ncs[i].jetstream(), e, ttl_s=1.5, renew_s=0.3) for i, e in
              enumerate([entry("v1", max_prompt_tokens=500),
                         entry("v2", max_prompt_tokens=300, max_nodes=8),
                         entry("v3", max_prompt_tokens=200)])]
    edge = ncs[3]
    try:
        assert await fleet.fetch(edge, 1.0) is None  # nobody to answer yet
        await boards[0].start()
        view = FleetView(edge, refresh_s=3600)  # never asks again: broadcasts must do
        assert (await view.start()).max_prompt_tokens == 500
        await boards[1].start()  # a stricter worker joins
        await wait_until(lambda: view.limits.max_prompt_tokens == 300, what="join")
        assert view.limits.max_nodes == 8 and view.limits.verifiers == ("v1", "v2")
        await boards[2].start()
        await wait_until(lambda: view.limits.max_prompt_tokens == 200, what="second join")
        await boards[2].leave()  # an orderly stop
        await wait_until(lambda: view.limits.max_prompt_tokens == 300, what="leave")
        boards[1]._task.cancel()  # a crash: no leave, its entry expires with the TTL
        await ncs[1].close()
        t0 = time.monotonic()
        await wait_until(lambda: view.limits.max_prompt_tokens == 500, what="expiry")
        assert time.monotonic() - t0 < 4
        assert view.limits.verifiers == ("v1",)
        # a fresh edge asking gets the same merged view from a verifier
        assert (await fleet.fetch(edge)).same_limits(view.limits)
        await view.close()
    finally:
        for b in boards:
            if b._task and not b._task.done():
                await b.leave()
        for nc in ncs:
            await nc.close()


@pytest.mark.timeout(120)
async def test_cli_edge_refuses_before_any_work(nats_server, model_dirs):
    """`python -m specedge.edge` over the fleet's limits (a verifier's board on a real broker) or
    the draft's positions (no verifier up): exit code 4 and a message naming the limit, before
    the draft's weights are loaded; nothing reaches the broker."""
    _, draft = model_dirs

    async def edge(*args: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "specedge.edge", "--nats", nats_server.url, "--model", draft,
            "--dtype", "float64", "--threads", "1", "--no-chat", *args,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        _, err = await asyncio.wait_for(p.communicate(), 90)
        return p.returncode, err.decode()

    nc = await broker.connect(nats_server.url, "verifier")
    board = Board(nc, nc.jetstream(), entry("v1", max_prompt_tokens=32, max_nodes=4))
    try:
        # no verifier has answered: the draft's 1024 positions still apply
        rc, err = await edge("--prompt", "x" * 1100)
        assert rc == EXIT_REFUSED, err
        assert "refused before any work (context_length_exceeded)" in err
        assert "maximum context length is 1024" in err
        await board.start()
        (rc1, err1), (rc2, err2) = await asyncio.gather(
            edge("--prompt", "x" * 100, "--tree-budget", "4"),
            edge("--prompt", "x", "--tree-budget", "8"))
        assert rc1 == EXIT_REFUSED and "the verifiers' max_prompt_tokens allows at most 32" \
            in err1, err1
        assert rc2 == EXIT_REFUSED and "(tree_too_large)" in err2 and \
            "--tree-budget <= 4" in err2, err2
        assert "session opened" not in err + err1 + err2
        assert (await nc.jetstream().stream_info(subjects.STREAM)).state.messages == 0
    finally:
        await board.leave()
        await nc.close()


@pytest.mark.timeout(120)
async def test_verifier_refuses_what_leaves_the_models_positions(nats_server, tiny_pair):
    """The verifier's side of the rule, for edges that skip it: a prompt longer than the
    target's 1024 positions, or a tree whose deepest node would sit at position 1024, gets
    Rejected(context_length_exceeded); a tree ending at position 1023 is verified."""
    target, _ = tiny_pair
    nc = await broker.connect(nats_server.url, "raw-edge")
    js = nc.jetstream()
    got: dict[str, asyncio.Queue] = {}

    async def open_and_draft(prompt: list[int], depth: int):
        sid = subjects.new_session_id()
        q = got[sid] = asyncio.Queue()

        async def on_verdict(m) -> None:
            q.put_nowait(decode(m.data))

        await nc.subscribe(subjects.verdict(sid), cb=on_verdict)
        await js.publish(subjects.session(sid), encode(SessionOpened(
            v=SCHEMA_VERSION, prompt=pack_ids(prompt), sampling=Sampling(), seed=0,
            max_new_tokens=64, eos_ids=b"", target="t", draft="d", vocab_size=256)))
        await js.publish(subjects.draft(sid), encode(DraftBlock(
            v=SCHEMA_VERSION, round=0, committed_len=len(prompt), root=prompt[-1],
            tokens=pack_ids([7] * depth), parents=pack_ids(list(range(depth))))))
        return await asyncio.wait_for(got[sid].get(), 60)

    try:
        async with running_worker(target, nats_server.url):
            fits, beyond, too_long = await asyncio.gather(
                open_and_draft([5] * 1020, 4), open_and_draft([5] * 1020, 5),
                open_and_draft([5] * 1030, 1))
    finally:
        await nc.close()
    assert isinstance(fits, Verdict), fits  # root at 1019, nodes at 1020..1023
    assert isinstance(beyond, Rejected) and beyond.code == "context_length_exceeded", beyond
    assert "reaches position 1024" in beyond.reason
    assert isinstance(too_long, Rejected) and too_long.code == "context_length_exceeded"
    assert "1030 tokens" in too_long.reason
