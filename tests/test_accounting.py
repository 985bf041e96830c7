"""Honest accounting on the verifier: a session's cached_tokens (summed over its verdicts, as
the replay, the API and the prompt-token metric count them) counts each reused prompt token
once, however often its KV is rebuilt; kv_cache_bytes counts a block several sessions share
once. Real tiny target, real engine."""

from __future__ import annotations

import torch

from specedge.execution.tree import depths_of
from specedge.execution.walk import commit
from tests.test_verifier_prefix import PARENTS, opened, prompt_of, run_engine
from workers.verifier.engine import Engine
from workers.verifier.state import SessionState, SessionTable
from workers.verifier.validate import CheckedBlock


def verify_round(engine: Engine, st: SessionState, g: torch.Generator) -> int:
    """One round as the worker runs it: the verdict's cached_tokens, then commit."""
    toks = torch.randint(0, 256, (len(PARENTS),), generator=g).tolist()
    (out,) = engine.verify([(st, CheckedBlock(st.round, toks, PARENTS, depths_of(PARENTS)))])
    reported, st.cached_tokens = st.cached_tokens, 0
    new = [toks[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
    new, _ = commit(new, st.generated, st.max_new_tokens, st.eos_ids)
    st.committed += new
    st.round += 1
    return reported


def test_a_rebuilt_session_counts_its_reused_prompt_once(tiny_pair):
    engine = Engine(tiny_pair[0])
    prompt = prompt_of(47, 3)  # 2 full blocks before the root's, and 15 tokens in the third
    run_engine(engine, "alice.a", opened(prompt))  # its blocks stay in the cache
    st = SessionState.from_opened("alice.b", opened(prompt))
    g = torch.Generator().manual_seed(1)
    reported = [verify_round(engine, st, g)]
    assert reported == [32]  # the prompt's full blocks before the root's
    for _ in range(8):  # the KV lost (evicted, a failed batch) and rebuilt, round after round
        SessionTable._free(st)
        reported.append(verify_round(engine, st, g))
    # every rebuild adopts the prompt's blocks again, and once this session has published
    # the third block itself, that one too: its 15 prompt tokens are counted then, once
    assert engine.pool.cache_hit_tokens >= 32 + 8 * 32
    assert sum(reported) == len(prompt) and 15 in reported[1:3]
    assert reported.count(0) == len(reported) - 2
    # a state rebuilt from the log starts from what its verdicts reported
    again = SessionState.from_opened("alice.b", opened(prompt))
    again.committed, again.round = list(st.committed), st.round
    again.cached_reported = sum(reported)
    assert verify_round(engine, again, g) == 0


def test_kv_bytes_counts_a_shared_block_once(tiny_pair):
    engine = Engine(tiny_pair[0])
    pool = engine.pool
    table = SessionTable(pool)
    prompt = prompt_of(40, 4)
    g = torch.Generator().manual_seed(2)
    a = SessionState.from_opened("alice.a", opened(prompt))
    verify_round(engine, a, g)
    table.put(a)
    b = SessionState.from_opened("alice.b", opened(prompt))
    verify_round(engine, b, g)  # adopts a's first two blocks: both sessions hold them
    table.put(b)
    shared = set(a.kv.blocks) & set(b.kv.blocks)
    assert len(shared) == 2
    per_block = pool.block_size * pool.bytes_per_token
    distinct = len(set(a.kv.blocks) | set(b.kv.blocks))
    assert table.kv_bytes() == distinct * per_block
    assert table.kv_bytes() == a.kv.nbytes + b.kv.nbytes - 2 * per_block
    assert table.kv_bytes() <= pool.used_blocks * per_block
