"""`edge serve --model suffix` over the real stack (nats-server, a verifier with the tiny
float64 target): no draft model, greedy output equal to the target alone, the per-source
figures in the API's `speculation` object and in /metrics, and a tenant's history kept from
other tenants."""

from __future__ import annotations

import asyncio
import json

import pytest

from specedge.edge import serve
from tests.stack import reference_greedy, running_worker
from tests.test_api import _get, _http, chat_ids, scrape
from tests.tokens import char_tokenizer

pytestmark = pytest.mark.asyncio

PROMPT = ("Repeat this line three times: the quick brown fox jumps over the lazy dog; "
          "the quick brown fox jumps over the lazy dog;")


async def ask(base: str, user: str, n: int) -> dict:
    body = {"model": "tiny-target", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": n, "temperature": 0, "user": user}
    r = await _http(f"{base}/v1/chat/completions", "POST", json.dumps(body).encode())
    assert r.status_code == 200, r.text
    return r.json()


async def test_model_free_serve_is_exact_and_reports_sources(nats_server, tiny_pair, model_dirs):
    target, _ = tiny_pair
    target_dir, _ = model_dirs
    tok = char_tokenizer()
    a = serve.parse(["--nats", nats_server.url, "--model", "suffix", "--target", target_dir,
                     "--served-model-name", "tiny-target", "--port", "0", "--no-adaptive"])
    n = 32
    ref = tok.decode(reference_greedy(target, chat_ids(tok, PROMPT), n))
    async with running_worker(target, nats_server.url):
        stop = asyncio.Event()
        started = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve.serve(a, stop, tokenizer=tok, started=started))
        server = await asyncio.wait_for(started, 30)
        try:
            base = server.url
            first = await ask(base, "alice", n)
            again = await ask(base, "alice", n)  # drafts from alice's first answer too
            other = await ask(base, "bob", n)  # never from alice's
            metrics = scrape((await _get(f"{base}/metrics")).text)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    for r in (first, again, other):
        assert r["choices"][0]["message"]["content"] == ref
        sp = r["speculation"]
        assert sp["draft_tokens_by_source"]["model"] == 0
        assert sp["accepted_by_source"]["model"] == 0
        assert sp["accepted_by_source"]["suffix"] == sp["accepted_tokens"]
    s1, s2, s3 = (r["speculation"] for r in (first, again, other))
    assert s2["rounds"] < s1["rounds"]  # the tenant's history predicted the whole answer
    assert s3["rounds"] == s1["rounds"] and s3["accepted_tokens"] == s1["accepted_tokens"]
    assert metrics["specedge_edge_accepted_tokens_total{source=suffix}"] == sum(
        s["accepted_tokens"] for s in (s1, s2, s3)) > 0
    assert metrics["specedge_edge_accepted_tokens_total{source=model}"] == 0
    assert metrics["specedge_edge_draft_tokens_total{source=suffix}"] == sum(
        s["draft_tokens"] for s in (s1, s2, s3))
