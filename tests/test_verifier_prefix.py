"""The verifier's prefix cache: a session whose prompt starts like an earlier one's (a second
choice, a follow-up turn) reuses that KV, per tenant unless a system prompt is shared, and
its output is exactly the output without the cache, greedy and sampled; an eviction, a
restarted verifier or an edited earlier message only cost the reuse."""

from __future__ import annotations

import pytest
import torch

from schemas import SCHEMA_VERSION, Sampling, SessionOpened, pack_ids
from specedge import broker, subjects
from specedge.config import AdaptiveBudget, TreeShape
from specedge.execution.tree import depths_of
from specedge.execution.walk import commit
from specedge.sessionlog import read_session
from tests.stack import generate, running_worker
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState
from workers.verifier.validate import CheckedBlock

GREEDY = Sampling()
SAMPLED = Sampling(temperature=0.9, top_p=0.95)
PARENTS = [0, 0, 1, 2, 1]


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def opened(prompt: list[int], sampling: Sampling = GREEDY, seed: int = 0,
           **kw) -> SessionOpened:
    return SessionOpened(v=SCHEMA_VERSION, prompt=pack_ids(prompt), sampling=sampling,
                         seed=seed, max_new_tokens=64, eos_ids=b"", target="t", draft="d",
                         vocab_size=256, **kw)


def run_engine(engine: Engine, sid: str, o: SessionOpened, rounds: int = 6) -> tuple[list[int],
                                                                                    int]:
    """A session verified alone round by round with random draft trees (the output is the
    target's whatever the drafts): its generated tokens and its first round's cached tokens
    (what the worker puts in that verdict)."""
    st = SessionState.from_opened(sid, o)
    g = torch.Generator().manual_seed(7)
    cached = -1
    for r in range(rounds):
        toks = torch.randint(0, 256, (len(PARENTS),), generator=g).tolist()
        (out,) = engine.verify([(st, CheckedBlock(r, toks, PARENTS, depths_of(PARENTS)))])
        if cached < 0:
            cached = st.cached_tokens
        new = [toks[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
        new, _ = commit(new, st.generated, st.max_new_tokens, st.eos_ids)
        st.committed += new
        st.round += 1
        st.cached_tokens = 0
    engine.pool.flush()
    if st.kv is not None:
        st.kv.free()
    return st.committed[st.prompt_len :], cached


@pytest.fixture(scope="module")
def target(tiny_pair):
    return tiny_pair[0]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_same_prompt_follow_up_and_edit_reuse_exactly(target, sampling):
    cached, plain = Engine(target), Engine(target, prefix_cache_tokens=0)
    prompt = prompt_of(45, 1)  # two full blocks and a partial one (blocks of 16)

    def both(sid, p, seed=0):
        want, none = run_engine(plain, sid, opened(p, sampling, seed))
        got, hit = run_engine(cached, sid, opened(p, sampling, seed))
        assert got == want and none == 0
        return got, hit

    first, hit = both("alice.a1", prompt)
    assert hit == 0
    assert both("alice.a2", prompt, seed=3)[1] == 32  # a second choice: the full blocks
    follow = prompt + first + prompt_of(30, 2)  # the next turn: the whole first one is cached
    assert both("alice.a3", follow)[1] == (len(prompt) + len(first) - 1) // 16 * 16
    edited = prompt[:20] + [(prompt[20] + 1) % 256] + prompt[21:] + first
    assert both("alice.a4", edited)[1] == 16  # the edit in block 1: only block 0 matches
    assert cached.pool.cache_hit_tokens > 0 and plain.pool.cached_blocks == 0


def test_tenants_are_separate_unless_a_prompt_is_shared(target):
    system = prompt_of(40, 4)
    a, b = system + prompt_of(20, 5), system + prompt_of(20, 6)
    eng = Engine(target)
    run_engine(eng, "alice.s1", opened(a))
    assert run_engine(eng, "carol.s1", opened(a))[1] == 0  # the same prompt, another tenant
    # the shared name is not configured here: the tenant's salt, so no hit either
    run_engine(eng, "alice.s2", opened(a, shared_prefix="sys", shared_len=40))
    assert run_engine(eng, "bob.s2", opened(b, shared_prefix="sys", shared_len=40))[1] == 0

    shared = Engine(target, shared_prefixes=frozenset({"sys"}))
    plain = Engine(target, prefix_cache_tokens=0)
    run_engine(shared, "alice.s3", opened(a, shared_prefix="sys", shared_len=40))
    want, _ = run_engine(plain, "bob.s3", opened(b, shared_prefix="sys", shared_len=40))
    got, hit = run_engine(shared, "bob.s3", opened(b, shared_prefix="sys", shared_len=40))
    assert hit == 32 and got == want  # the system prompt's full blocks, no more
    # alice's own follow-up still reuses past the shared part; bob cannot
    assert run_engine(shared, "alice.s4", opened(a, shared_prefix="sys",
                                                 shared_len=40))[1] == 48
    assert run_engine(shared, "bob.s4", opened(a, shared_prefix="sys", shared_len=40))[1] == 32


# -- through the stack: a real nats-server, a verifier worker, edge sessions ------------------

SHAPE = TreeShape(budget=6, depth=4, width=2, topk=2)
NO_CALIBRATION = dict(max_batch=4, prefill_chunk=256, adaptive=AdaptiveBudget(batch_tokens=16))


async def first_verdicts(url: str, sids: list[str]):
    """Each session's verdicts' cached tokens (summed, as the replay shows them)."""
    from specedge import replay

    nc = await broker.connect(url, "test-prefix")
    try:
        views = [replay.view(await read_session(nc.jetstream(), sid)) for sid in sids]
    finally:
        await nc.close()
    return [v.cached_tokens for v in views]


def counter(w, source: str) -> float:
    return w.metrics.registry.get_sample_value("specedge_verifier_prompt_tokens_total",
                                               {"source": source})


async def conversation(url, target, draft, sampling, **cfg):
    """A first turn; then its second choice, its follow-up, the same prompt from another
    tenant and a follow-up whose first message was edited (in its second block), together:
    (outputs, cached tokens per session, the worker)."""
    prompt = prompt_of(40, 11)
    sids = [subjects.new_session_id(e) for e in ("alice", "alice", "alice", "bob", "alice")]
    kw = dict(max_new_tokens=20, shape=SHAPE, sampling=sampling)
    async with running_worker(target, url, **NO_CALIBRATION, **cfg) as w:
        (first,) = await generate(url, draft, [prompt], seeds=[1], sids=sids[:1], **kw)
        follow = prompt + first.token_ids + prompt_of(10, 12)
        edited = [*prompt[:20], (prompt[20] + 1) % 256, *follow[21:]]
        rest = await generate(url, draft, [prompt, follow, prompt, edited], seeds=[2, 3, 4, 5],
                              sids=sids[1:], **kw)
    outputs = [r.token_ids for r in [first, *rest]]
    logged = await first_verdicts(url, sids)
    # the edge's figure (the API's usage) is the replay's: the sum of the verdicts'
    assert [r.cached_tokens for r in [first, *rest]] == logged
    return outputs, logged, w


@pytest.mark.asyncio
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
async def test_turns_through_the_stack_reuse_exactly(nats_server, tiny_pair, sampling):
    target, draft = tiny_pair
    want, none, off = await conversation(nats_server.url, target, draft, sampling,
                                         prefix_cache_tokens=0)
    got, cached, on = await conversation(nats_server.url, target, draft, sampling)
    assert got == want
    assert none == [0, 0, 0, 0, 0] and counter(off, "cached") == 0
    first, again, follow, bob, edited = cached
    assert first == 0 and again == 32 and follow >= 48 and bob == 0
    assert edited == 16  # the shared prefix ends at the edit
    assert counter(on, "cached") == again + follow + edited
    # every prompt token was either taken from the cache or computed
    assert counter(on, "cached") + counter(on, "computed") == counter(off, "computed")


@pytest.mark.asyncio
async def test_evicted_or_restarted_between_turns_still_exact(nats_server, tiny_pair):
    target, draft = tiny_pair
    url, kw = nats_server.url, dict(max_new_tokens=20, shape=SHAPE, sampling=SAMPLED)
    prompt = prompt_of(40, 21)
    cfg = dict(NO_CALIBRATION, kv_budget_tokens=160)  # 10 blocks: bob's session needs them all
    alice = [subjects.new_session_id("alice") for _ in range(4)]
    async with running_worker(target, url, **cfg) as w:
        (first,) = await generate(url, draft, [prompt], seeds=[1], sids=alice[:1], **kw)
        follow = prompt + first.token_ids + prompt_of(10, 22)
        await generate(url, draft, [prompt_of(120, 23)], sids=[subjects.new_session_id("bob")],
                       **kw)
        assert w.engine.pool.cache_evictions > 0
        (evicted,) = await generate(url, draft, [follow], seeds=[2], sids=alice[1:2], **kw)
    async with running_worker(target, url, **NO_CALIBRATION):  # a new verifier: nothing cached
        (restarted,) = await generate(url, draft, [follow], seeds=[2], sids=alice[2:3], **kw)
    async with running_worker(target, url, **NO_CALIBRATION, prefix_cache_tokens=0):
        (plain,) = await generate(url, draft, [follow], seeds=[2], sids=alice[3:4], **kw)
    assert evicted.token_ids == restarted.token_ids == plain.token_ids
    assert await first_verdicts(url, alice[1:]) == [0, 0, 0]
