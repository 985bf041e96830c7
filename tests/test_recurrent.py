"""Hybrid models (gated delta rule, Mamba-2, short convolutions) under tree speculation: every
row's logits are the model's own on its path, sessions packed together; a verdict keeps the
accepted node's state; chunked prefill carries the state across chunks; a failover rebuilds
it from the log; proactive drafting forks it; end to end through a real nats-server. Tiny
float64 models from tests/archs.py (float32 where their experts need it)."""

from __future__ import annotations

import pytest
import torch

from schemas import Sampling
from specedge.config import TreeShape
from specedge.edge.drafter import Drafter, TreeBuilder
from specedge.execution import PackedRunner, Segment
from specedge.execution.support import reference_logits
from specedge.execution.tree import depths_of, path_to
from specedge.execution.walk import commit
from tests.archs import SUPPORTED, greedy_reference
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock

# the models' reference state kernels (float64 depthwise convolutions above all) are slow on a
# CPU: a test here takes up to 10 minutes on a shared 2-core machine
pytestmark = pytest.mark.timeout(1200)
HYBRIDS = [a for a in SUPPORTED if a.features.startswith("hybrid")]
# one of each kind of state: gated delta rule, short convolution, Mamba-2
KINDS = [a for a in HYBRIDS if a.name in ("qwen3.5", "lfm2", "nemotron-h")]
SHAPE = TreeShape(budget=6, depth=4, width=2, topk=2)
NEW = 24


def ids(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n,), generator=g).tolist()


def tolerance(ref: torch.Tensor) -> float:
    # the state kernels compute in float32 whatever the model's dtype: a causal run and the
    # same tokens one step at a time differ in float32's last bits
    return 2e-5 * (1 + float(ref.abs().max()))


@pytest.mark.parametrize("arch", HYBRIDS, ids=lambda a: a.name)
def test_every_row_of_a_packed_forward_is_the_models_own(arch, arch_pair):
    """One forward of three sessions: a prefill past the state kernels' chunks (70 tokens),
    a chain and a tree on a prefix computed in two chunks, and the next level of a partly
    forwarded tree (the drafter's forward). Each row equals the model's own forward of its
    path; then a verdict keeps one node's state and the next token continues from it."""
    target, _ = arch_pair(arch)
    r = PackedRunner(target, attention="sdpa")
    long_p, short_p = ids(5, 70), ids(6, 30)
    a, b, c = r.new_seq(), r.new_seq(), r.new_seq()
    r.forward([Segment.chain(b, short_p[:12], logits_at=[])])  # two chunks, then the tree
    r.forward([Segment.chain(b, short_p[12:-3], logits_at=[]),
               Segment.chain(c, short_p[:20])])
    # c: a drafter's tree on short_p[:20], whose first level (nodes 1, 2) is already in
    tree_rows = torch.tensor([[True, False], [False, True]])
    r.forward([Segment.tree_nodes(c, 20, tree_rows, [40, 41], [20, 20])])
    nodes, parents = [7, 9, 11, 13, 15, 17, 19, 21, 23, 25], [0, 0, 1, 3, 4, 5, 6, 7, 8, 2]
    # c's next level: node 3 under node 1, node 4 under node 2
    level = torch.tensor([[True, False, True, False], [False, True, False, True]])
    out = r.forward([Segment.chain(a, long_p, logits_at=list(range(len(long_p)))),
                     Segment.tree(b, short_p[-3:], nodes, parents, depths_of(parents)),
                     Segment.tree_nodes(c, 20, level, [42, 43], [21, 21])])
    ref = reference_logits(target, long_p)
    assert float((out[0] - ref).abs().max()) <= tolerance(ref)
    for i in range(len(nodes) + 1):
        path = short_p + [nodes[j - 1] for j in path_to(i, parents)]
        want = reference_logits(target, path)[-1]
        assert float((out[1][i] - want).abs().max()) <= tolerance(want), f"tree row {i}"
    for row, path in enumerate([[40, 42], [41, 43]]):
        want = reference_logits(target, short_p[:20] + path)[-1]
        assert float((out[2][row] - want).abs().max()) <= tolerance(want), f"level row {row}"
    # the verdict accepts nodes 1, 3, 4 (a path through the decoy's sibling): b keeps their
    # states, the rest vanishes; the next token runs from node 4's state
    base = len(short_p) - 1
    b.keep(base - 2, [0, 1, 2, 3, 5, 6])  # chain rows 0..2 (the root last), then 1, 3, 4
    assert sorted(b.rec.states) == [b.length - 1]
    nxt = r.forward([Segment.chain(b, [99])])[0][0]
    want = reference_logits(target, short_p + [7, 11, 13, 99])[-1]
    assert float((nxt - want).abs().max()) <= tolerance(want)
    for s in (a, b, c):
        s.free()


def test_a_truncation_without_its_state_rebuilds_from_the_tokens(arch_pair):
    """Inside a causal run only the run's end state exists: truncating there empties the
    sequence (the caller recomputes from its tokens, as the drafter's catch-up does), never
    continues from a wrong state; truncating to a held state keeps the KV."""
    target, draft = arch_pair(HYBRIDS[0])
    r = PackedRunner(draft, attention="sdpa")
    p = ids(7, 30)
    dr = Drafter(r)
    dr.catch_up(p[:20])
    dr.catch_up(p)  # two causal runs: states held after 20 and 30 tokens
    dr.kv.truncate(20)
    assert dr.kv.length == 20 and r.pool.states.rebuilds == 0
    dr.kv.truncate(15)  # no state after 15 tokens
    assert dr.kv.length == 0 and r.pool.states.rebuilds == 1
    got = dr.catch_up(p[:16])  # the catch-up rebuilds the whole prefix
    want = reference_logits(draft, p[:16])[-1]
    assert float((got - want).abs().max()) <= tolerance(want)
    dr.close()


def speculate(target, draft, prompt: list[int], n: int, *, prefill_chunk: int | None = None,
              failover: bool = False, fork: bool = False, engine: Engine | None = None,
              runner: PackedRunner | None = None) -> tuple[list[int], int, int]:
    """The edge's drafter and the verifier's engine in one process. prefill_chunk: the
    verifier prefills at most that many tokens per forward. failover: every round on the
    other of two verifiers, whose session state is rebuilt from the log (its committed
    tokens only). fork: each round drafts on a fork of the draft state taken on the tree's
    favourite path (proactive drafting's guess), kept when the verdict took that path.
    engine, runner: the verifier's engine and the draft's runner to use (their pools' caches
    outlive the session); the drafter reuses what the draft pool's cache holds. Returns the
    tokens, the draft tokens accepted and the tokens the verifier took from its cache."""
    engines = [engine] if engine else [Engine(target, attention="sdpa")
                                       for _ in range(2 if failover else 1)]
    dr = Drafter(runner or PackedRunner(draft, attention="sdpa"))
    dr.reuse(prompt)
    dr.catch_up(prompt[:-1])
    committed, rnd, finished, accepted, cached, st = list(prompt), 0, False, 0, 0, None
    while not finished:
        if st is None or failover:
            if st is not None:
                st.kv.free()
            st = SessionState("s", Sampling(), 0, n, frozenset(), len(prompt), list(committed),
                              round=rnd)
        tree = TreeBuilder(dr, committed, SHAPE).run()
        guess = None
        if fork:  # the favourite path: first children all the way down
            path, node = [], 0
            while kids := [i + 1 for i, q in enumerate(tree.parents) if q == node]:
                node = kids[0]
                path.append(node)
            guess = (path, dr.fork(tree, path))
        blk = CheckedBlock(rnd, tree.tokens, tree.parents, tree.depths)
        eng = engines[rnd % len(engines)]
        while True:
            (out,) = eng.verify([(st, blk)], prefill_chunk=prefill_chunk)
            if out.walk is not None:
                break
        new = [tree.tokens[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
        toks, finished = commit(new, len(committed) - len(prompt), n, frozenset())
        accepted += len(out.walk.accepted)
        cached = st.cached_tokens if rnd == 0 else cached
        if guess is not None and guess[0] == out.walk.accepted:
            dr.close()
            dr = guess[1]  # the guess came true: its fork already holds the accepted path
        else:
            if guess is not None:
                guess[1].close()
            dr.rollback(tree, out.walk.accepted)
        committed += toks
        st.committed = list(committed)
        st.round = rnd = rnd + 1
    dr.remember(committed)
    st.kv.free()
    dr.close()
    return committed[len(prompt):], accepted, cached


@pytest.mark.parametrize("arch", KINDS, ids=lambda a: a.name)
def test_chunked_prefill_failover_and_forks_stay_exact(arch, arch_pair):
    target, draft = arch_pair(arch)
    prompt = ids(11, 70)
    want = greedy_reference(target, prompt, NEW)
    got, accepted, _ = speculate(target, draft, prompt, NEW, prefill_chunk=16)
    assert got == want, "chunked prefill"
    assert accepted >= 3
    assert speculate(target, draft, prompt, NEW, failover=True)[0] == want, "failover"
    assert speculate(target, draft, prompt, NEW, fork=True)[0] == want, "forked drafts"


@pytest.mark.parametrize("arch", KINDS, ids=lambda a: a.name)
def test_a_follow_up_turn_starts_from_a_state_checkpoint(arch, arch_pair):
    """With the prefix cache on, a session's state is checkpointed every few blocks of its
    committed tokens (prefill and accepted nodes alike) under the blocks' hashes: a follow-up
    turn (the history plus a new message) adopts the KV and the state up to the last
    checkpoint on both sides, computes only the rest, and its output is the target's own."""
    from specedge.execution.recurrent import checkpoint_every

    target, draft = arch_pair(arch)
    engine = Engine(target, attention="sdpa", prefix_cache_tokens=None)
    runner = PackedRunner(draft, attention="sdpa")
    runner.pool.enable_cache(None)
    every = checkpoint_every(engine.pool)
    first = ids(30, 70)
    out1, _, cached = speculate(target, draft, first, NEW, engine=engine, runner=runner)
    assert out1 == greedy_reference(target, first, NEW)
    assert cached == 0
    follow = first + out1 + ids(31, 9)
    reused = runner.pool.cache_hit_tokens
    out2, _, cached = speculate(target, draft, follow, NEW, engine=engine, runner=runner)
    assert out2 == greedy_reference(target, follow, NEW)
    # both sides adopted up to the last checkpoint before the follow-up's last token
    assert cached == (len(follow) - 1) // every * every > 0
    assert runner.pool.cache_hit_tokens - reused == cached
    assert engine.pool.states.checkpoints and runner.pool.states.checkpoints
    # evicting the cached blocks drops their checkpoints: nothing left to adopt from
    engine.pool.enable_cache(0)
    assert not engine.pool.states.checkpoints


async def test_a_hybrid_end_to_end_through_the_broker(nats_server, arch_pair):
    """Qwen3.5's shape through a real nats-server: three edge sessions with proactive
    drafting (several guesses, each a fork of the draft state) and a verifier prefilling in
    chunks, prompts past the delta rule's chunk; the output is the target's own."""
    from specedge.edge.proactive import Mode
    from tests.stack import generate, running_worker

    target, draft = arch_pair(next(a for a in HYBRIDS if a.name == "qwen3.5"))
    prompts = [ids(20 + i, 66 + 5 * i) for i in range(3)]
    async with running_worker(target, nats_server.url, max_batch=4, prefill_chunk=32):
        results = await generate(nats_server.url, draft, prompts, max_new_tokens=NEW,
                                 shape=SHAPE, proactive=Mode.MULTI)
    for p, r in zip(prompts, results, strict=True):
        assert r.token_ids == greedy_reference(target, p, NEW)
    assert sum(len(r.token_ids) for r in results) > sum(len(r.rounds) for r in results)


def test_the_state_verbs_follow_the_kv_verbs():
    """keep renames the accepted node's state to the new end and drops the rest (checkpoints
    for accepted nodes on a boundary), fork takes the state its end needs, truncate answers
    whether the state is held (and drops checkpoints past it)."""
    from specedge.execution.statepool import StatePool

    def st(v: float) -> dict:
        return {0: {("rec", 0): torch.full((2,), v)}}

    s = StatePool([0]).new()
    s.every = 4
    s.states = {5: st(5), 6: st(6), 7: st(7), 8: st(8), 9: st(9)}  # end 5, tree nodes 6..9
    f = s.fork(6, [1, 3])  # positions 0..5, then nodes at 7 and 9 -> 6, 7
    assert list(f.states) == [7] and float(f.states[7][0][("rec", 0)][0]) == 9
    s.keep(6, [0, 2])  # nodes at 6 and 8 accepted -> positions 6 and 7
    assert list(s.states) == [7] and float(s.states[7][0][("rec", 0)][0]) == 8
    assert list(s.marks) == [7]  # (7 + 1) % 4 == 0: a checkpoint of committed tokens
    assert s.truncate(8) and not s.truncate(5)  # held at 7; nothing at 4
    assert s.marks == {}
    empty = StatePool([0]).new()
    empty.keep(0, [])
    assert empty.states == {} and empty.truncate(0)
