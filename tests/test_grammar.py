"""Structured output: the grammar's per-node masks, and exactness end to end through a real
nats-server: greedy output equals transformers' generate() of the target alone with
xgrammar's own HF logits processor, for chains and trees, and every complete output
validates against its schema."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import pytest
import torch
import xgrammar as xgr
from xgrammar.contrib.hf import LogitsProcessor

from schemas.wire import GrammarSpec
from specedge.config import TreeShape
from specedge.execution.grammar import GrammarError, Grammars, allowed, masked, single
from tests.stack import generate, reference_greedy, running_worker
from tests.tokens import char_tokenizer

EOS = 255
NEW = 48
SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "colour": {"enum": ["red", "green", "blue"]}}, "required": ["ok", "n", "colour"]}
SPECS = {"json_object": GrammarSpec("json_object"),
         "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA))}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def grammars(tok):
    return Grammars(tok, 256)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(95) for _ in range(rng.randint(3, 20))] for _ in range(n)]


def reference(target, prompt: list[int], compiled) -> list[int]:
    """transformers' greedy generate() with xgrammar's logits processor, stopping at EOS."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=EOS,
                              logits_processor=[LogitsProcessor(compiled)])
    ids = out[0, len(prompt):].tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def test_tree_masks_equal_each_paths_own_matcher(grammars, tok):
    """One walk with rollback gives every node the mask a fresh matcher fed its path gives."""
    compiled = grammars.compile(SPECS["json_schema"], [EOS])
    c = grammars.constraint(SPECS["json_schema"], [EOS])
    ids = tok.convert_tokens_to_ids
    c.sync(ids(list('{"ok": ')))
    # node 1 't', 2 'r' under 1, 3 'f' (sibling of 1), 4 'x' (refused), 5 'a' under 3
    tokens, parents = ids(["t", "r", "f", "x", "a"]), [0, 1, 0, 0, 3]
    bm = c.tree_bitmask(tokens, parents)
    for node, path in {0: "", 1: "t", 2: "tr", 3: "f", 5: "fa"}.items():
        m = xgr.GrammarMatcher(compiled)
        for t in ids(list('{"ok": ' + path)):
            assert m.accept_token(t)
        want = xgr.allocate_token_bitmask(1, 256)
        m.fill_next_token_bitmask(want)
        assert torch.equal(bm[node], want[0]), node
    assert bm[4].eq(-1).all(), "a refused node's row stays all-allowed (never reached)"
    assert single(bm[1], 256) == ids("r") and single(bm[0], 256) is None
    # the session's matcher is back at its committed state
    assert c.tree_bitmask([], []).equal(bm[:1])


def test_sync_rolls_back_and_forced_spans(grammars, tok):
    c = grammars.constraint(SPECS["json_schema"], [EOS])
    ids = tok.convert_tokens_to_ids
    assert tok.decode(c.forced([], 20)) == '{"ok": '  # keys of a schema cost no forward
    c.sync(ids(list('{"ok": true')))
    c.sync(ids(list('{"ok": f')))  # a different guess: rolled back to the common prefix
    assert tok.decode(c.forced(ids(list("alse")), 20)) == ', "n": '
    assert c.done == ids(list('{"ok": f'))
    assert not c.sync(ids(list('{"ok": x')))  # refused: left at the prefix it accepts
    assert c.done == ids(list('{"ok": '))
    with pytest.raises(GrammarError):
        c.sync_or_raise(ids(list('{"ok": x')))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_sets_exactly_the_disallowed_entries(dtype):
    logits = torch.randn(5, 70, dtype=dtype)
    raw = logits.clone()
    bm = torch.zeros(2, 3, dtype=torch.int32)
    bm[0, 0], bm[1, 2] = 0b101, 1 << 1  # row 1: ids 0, 2; row 2: id 65
    with masked(logits, [(1, bm)]) as y:
        assert torch.equal(allowed(bm, 70)[1].nonzero().flatten(), torch.tensor([65]))
        assert y[1].isfinite().nonzero().flatten().tolist() == [0, 2]
        assert y[2].isfinite().nonzero().flatten().tolist() == [65]
        assert torch.equal(y[1, [0, 2]], raw[1, [0, 2]]) and y[2, 65] == raw[2, 65]
        for r in (0, 3, 4):  # rows of other sessions: untouched
            assert torch.equal(y[r], raw[r])


@pytest.mark.parametrize("bad", [GrammarSpec("json_schema", "{not json"),
                                 GrammarSpec("json_schema", '{"type": "nonsense"}'),
                                 GrammarSpec("ebnf", "root ::= ("),
                                 GrammarSpec("regex", "a+"),
                                 GrammarSpec("json_schema", json.dumps(
                                     {"type": "object", "description": "x" * 70000}))])
def test_bad_specs_are_refused(grammars, bad):
    with pytest.raises(GrammarError):
        grammars.compile(bad, [EOS])


def test_compile_is_cached_per_spec(grammars):
    a = grammars.prepare(SPECS["json_schema"], [EOS])
    assert grammars.prepare(GrammarSpec("json_schema", json.dumps(SCHEMA)), [EOS]) is a
    assert grammars.prepare(SPECS["json_object"], [EOS]) is not a


@pytest.mark.asyncio
@pytest.mark.parametrize("shape", [TreeShape.chain(4), TreeShape(budget=16, depth=6, width=4,
                                                                 topk=3)],
                         ids=["chain", "tree"])
async def test_greedy_with_grammar_equals_generate(nats_server, tiny_pair, tok, grammars, shape):
    target, draft = tiny_pair
    ps = prompts(3, seed=5)
    plain = [reference_greedy(target, p, NEW) for p in ps]
    want = {k: [reference(target, p, grammars.compile(s, [EOS])) for p in ps]
            for k, s in SPECS.items()}
    assert all(w != plain for w in want.values()), "the grammar changes what greedy emits"
    async with running_worker(target, nats_server.url, max_batch=16) as w:
        w.engine.grammars = Grammars(tok, 256)  # the verifier's own compiler and cache
        runs = [(k, p) for k in SPECS for p in ps]
        got = await asyncio.gather(*(generate(
            nats_server.url, draft, [p], max_new_tokens=NEW, shape=shape, eos_ids=(EOS,),
            grammar=SPECS[k], constraint=grammars.constraint(SPECS[k], [EOS]))
            for k, p in runs))
    results = {}
    for (k, _), (r,) in zip(runs, got, strict=True):
        results.setdefault(k, []).append(r)
    for k in SPECS:
        assert [r.token_ids for r in results[k]] == want[k], k
    for r in results["json_schema"]:  # complete (ended at EOS): parses and validates
        assert r.token_ids[-1] == EOS
        jsonschema.validate(json.loads(tok.decode(r.token_ids[:-1])), SCHEMA)
    rs = [r for k in SPECS for r in results[k]]
    tpr = sum(len(r.token_ids) for r in rs) / sum(len(r.rounds) for r in rs)
    assert tpr > 1.5, f"masked drafts keep being accepted ({tpr:.2f} tokens per round)"


def test_failover_rebuilds_the_grammar_state_from_the_log(tiny_pair, tok, grammars):
    """Every round on another verifier whose state is rebuilt from the log (C only, no
    matcher): each rebuilds its grammar state from C, and the output stays the target's."""
    from schemas import Sampling
    from specedge.edge.drafter import Drafter, TreeBuilder
    from specedge.execution import PackedRunner
    from specedge.execution.walk import commit
    from workers.verifier.engine import Engine
    from workers.verifier.state import SessionState
    from workers.verifier.validate import CheckedBlock

    target, draft = tiny_pair
    spec = SPECS["json_schema"]
    engines = [Engine(target), Engine(target)]
    for e in engines:
        e.grammars = Grammars(tok, 256)
    p = prompts(1, seed=9)[0]
    want = reference(target, p, grammars.compile(spec, [EOS]))
    c = grammars.constraint(spec, [EOS])
    d = Drafter(PackedRunner(draft))
    d.catch_up(p[:-1])
    committed, rnd, finished = list(p), 0, False
    shape = TreeShape(budget=8, depth=4, width=2, topk=2)
    while not finished:
        st = SessionState("s", Sampling(), 0, NEW, frozenset({EOS}), len(p), list(committed),
                          round=rnd, grammar=spec)  # as _load rebuilds it: no matcher yet
        tree = TreeBuilder(d, committed, shape, Sampling(), len(p), c).run()
        blk = CheckedBlock(rnd, tree.tokens, tree.parents, tree.depths)
        (out,) = engines[rnd % 2].verify([(st, blk)])
        new = [tree.tokens[i - 1] for i in out.walk.accepted] + [out.walk.next_token]
        toks, finished = commit(new, len(committed) - len(p), NEW, frozenset({EOS}))
        d.rollback(tree, out.walk.accepted)
        committed += toks
        st.kv.free()
        rnd += 1
    assert committed[len(p):] == want
    assert rnd >= 3
    d.close()


class SlowGrammars(Grammars):
    """The real compiler, slowed down: a schema that takes seconds to compile."""

    def _compile(self, spec, stop):
        import time

        time.sleep(2.5)
        return super()._compile(spec, stop)


@pytest.mark.asyncio
async def test_a_slow_compile_on_the_verifier_stalls_only_its_own_session(
        nats_server, tiny_pair, tok, grammars):
    """While one session's grammar compiles on the verifier, another session's rounds go on
    (its blocks are batched without the waiting one); then the slow one is exact too."""
    import time

    target, draft = tiny_pair
    p_slow, p_plain = prompts(2, seed=9)
    spec = SPECS["json_object"]
    async with running_worker(target, nats_server.url, max_batch=16) as w:
        w.engine.grammars = SlowGrammars(tok, 256)
        t0 = time.perf_counter()
        slow = asyncio.create_task(generate(
            nats_server.url, draft, [p_slow], max_new_tokens=NEW, shape=TreeShape.chain(4),
            eos_ids=(EOS,), grammar=spec, constraint=grammars.constraint(spec, [EOS])))
        plain = await generate(nats_server.url, draft, [p_plain], max_new_tokens=12,
                               shape=TreeShape.chain(4))
        plain_done = time.perf_counter() - t0
        (got,) = await slow
    assert plain_done < 2.5, f"the plain session waited for the compile ({plain_done:.2f} s)"
    assert plain[0].token_ids == reference_greedy(target, p_plain, 12)
    assert got.token_ids == reference(target, p_slow, grammars.compile(spec, [EOS]))
