"""The suffix corpus (specedge.edge.corpus): public text a suffix draft also matches, shared
read-only by every tenant. Its files are checked at the flag (a bad one is a usage error), the
built-in one loads in the real Qwen tokenizer, a session drafts from it (and never writes to
it), and a model-free edge drafting from it stays exact through the real stack."""

from __future__ import annotations

import argparse
import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from schemas import Sampling
from specedge import broker
from specedge.config import SuffixConfig, TreeShape
from specedge.edge import corpus
from specedge.edge.args import add_generation_args
from specedge.edge.session import EdgeSession, SessionParams
from specedge.edge.suffix import SuffixIndex, SuffixStore
from specedge.edge.suffixdraft import SuffixDrafter, SuffixSource
from tests.conftest import TINY_VOCAB
from tests.stack import reference_greedy, running_worker
from tests.tokens import char_tokenizer


def test_flag_checks_the_file(tmp_path):
    assert corpus.corpus_ref(" Builtin ") == "builtin"
    assert corpus.corpus_ref("OFF") == "off"
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"about": "notes", "texts": ["one", "  ", "two"]}))
    assert corpus.corpus_ref(str(good)) == str(good)
    assert corpus.texts(str(good)) == ["one", "two"]
    plain = tmp_path / "c.txt"
    plain.write_text("a whole document\n")
    assert corpus.texts(str(plain)) == ["a whole document\n"]
    bad = {"missing.json": None, "notjson.json": "{nope", "shape.json": '{"texts": [1, 2]}',
           "list.json": '["a"]'}
    for name, body in bad.items():
        path = tmp_path / name
        if body is not None:
            path.write_text(body)
        with pytest.raises(argparse.ArgumentTypeError, match="suffix corpus"):
            corpus.corpus_ref(str(path))
    # through the edge's own parser: a usage error (exit 2) naming the file, before any work
    p = argparse.ArgumentParser()
    add_generation_args(p)
    assert p.parse_args([]).suffix_corpus == "builtin"
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--suffix-corpus", str(tmp_path / "notjson.json")])
    assert exc.value.code == 2


def test_builtin_corpus_in_the_real_tokenizer():
    from specedge.synthetic import load_tokenizer

    tok = load_tokenizer()
    texts = corpus.texts("builtin")
    assert len(texts) > 50 and all(t.strip() for t in texts)
    index = corpus.load("builtin", tok)
    assert index is corpus.load("builtin", tok)  # built once per tokenizer
    assert 5_000 < index.tokens < corpus.MAX_TOKENS
    assert corpus.load("off", tok) is None
    # the phrase that opens a code block is in it: a session whose answer begins so is
    # proposed the fence by the corpus alone (its prompt holds no such phrase)
    prompt = tok("Make it faster:\n\nx = 1\n")["input_ids"]
    head = tok("Here is the", add_special_tokens=False)["input_ids"]
    alone = SuffixSource().propose(prompt + head, 8, 8)
    with_corpus = SuffixSource(corpus=index).propose(prompt + head, 8, 8)
    assert with_corpus.size > alone.size and with_corpus.match_len >= len(head)


def test_session_drafts_from_the_corpus_and_never_writes_it():
    tok = char_tokenizer()
    index = SuffixIndex()
    phrase = tok("Here is the updated function:\n", add_special_tokens=False)["input_ids"]
    index.add(phrase)
    before = {d: list(s) for d, s in index.docs.items()}
    store = SuffixStore()
    src = SuffixSource(store, "alice", corpus=index)
    ctx = tok("rename x to y\nHere is the", add_special_tokens=False)["input_ids"]
    p = src.propose(ctx, 16, 16)
    want = phrase[len(tok("Here is the", add_special_tokens=False)["input_ids"]):]
    assert p.size >= 8 and p.tokens == want[:p.size]  # a chain, continuing as the corpus does
    assert SuffixSource(store, "alice").propose(ctx, 16, 16).tokens[:8] != want[:8]
    src.finish(ctx + want)
    assert {d: list(s) for d, s in index.docs.items()} == before  # read-only
    assert store.index("alice") is not None and store.index("bob") is None


@pytest.mark.asyncio
async def test_model_free_edge_drafting_from_a_corpus_is_exact(nats_server, tiny_pair):
    """The corpus holds the target's own continuation of a random head (as a phrase book
    holds what a model says): a model-free session drafts it from there, exactly, in far
    fewer rounds than without it."""
    target, _ = tiny_pair
    rng = random.Random(3)
    prompt = [rng.randrange(TINY_VOCAB) for _ in range(10)]
    want = reference_greedy(target, prompt, 24)
    book = SuffixIndex()
    book.add(prompt[-4:] + want)  # only the prompt's tail: the rest is the model's
    nc = await broker.connect(nats_server.url, "test-edge")
    ex = ThreadPoolExecutor(1)
    results = {}
    try:
        async with running_worker(target, nats_server.url):
            for name, c in (("none", None), ("corpus", book)):
                src = SuffixSource(corpus=c)
                params = SessionParams(prompt_ids=prompt, max_new_tokens=24, sampling=Sampling(),
                                       seed=0, shape=TreeShape(16, 16, 2, 2), adaptive=False,
                                       verdict_timeout_s=20, suffix=SuffixConfig(0))
                results[name] = await EdgeSession(
                    nc, nc.jetstream(), SuffixDrafter(src, TINY_VOCAB), ex, params,
                    suffix=src).run()
    finally:
        ex.shutdown()
        await nc.close()
    for r in results.values():
        assert r.token_ids == want
    assert len(results["corpus"].rounds) <= 3 < len(results["none"].rounds)
    assert results["corpus"].summary()["accepted_by_source"]["suffix"] >= 20


def test_builtin_corpus_saves_rounds_on_recorded_answers():
    """The real target's recorded answers to code edits (bench/data, none of them in the
    corpus's problems): with the built-in corpus a model-free edge needs fewer rounds on the
    answers that explain their code, and no more on any category."""
    from bench.suffixreplay import DATA, HANDWRITTEN, builtin_corpus, replay

    book = builtin_corpus()
    for data in (DATA, HANDWRITTEN):
        answers = json.loads(data.read_text())["answers"]
        by: dict[str, list[int]] = {}
        for a in answers:
            plain = replay(a["prompt"], a["answer"], 8)[0]
            read = replay(a["prompt"], a["answer"], 8, corpus=book)[0]
            v = by.setdefault(a["category"], [0, 0])
            v[0] += plain
            v[1] += read
        assert sum(v[1] for v in by.values()) < 0.9 * sum(v[0] for v in by.values()), by
        assert all(v[1] <= v[0] * 1.05 for v in by.values()), by
