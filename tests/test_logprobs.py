"""logprobs end to end: every value a session gets is the target alone's log_softmax at that
position (float64 tiny models: 1e-9), for greedy and sampled runs, through a real nats-server
and verifier; only the sessions that ask carry them; the API's OpenAI shapes (chat and
completions, streamed and not) carry the same values; the speculation figures beside usage
agree with the session's log and its replay."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import openai
import pytest
import torch

from schemas import Sampling, Verdict, unpack_ids
from specedge import broker, replay
from specedge.config import TreeShape
from specedge.execution.logprobs import PathScorer, from_wire, path_rows, score, to_wire
from specedge.sessionlog import read_session
from tests.stack import generate, reference_greedy, running_worker
from tests.test_api import _http, api_stack, chat_ids
from tests.tokens import char_tokenizer

TOL = 1e-9
K = 5


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def target_logprobs(target, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax of the target alone's logits at each generated token's position."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = target(ids).logits[0, len(prompt) - 1 : len(prompt) + len(generated) - 1]
    return torch.log_softmax(logits.double(), dim=-1)


def assert_matches(ref: torch.Tensor, generated: list[int], entries, k: int) -> None:
    """Each entry's logprob and top-k list against the reference rows (ties aside: ids are
    compared where the values are distinct)."""
    assert [e.token for e in entries] == generated
    for row, e in zip(ref, entries, strict=True):
        assert abs(e.logprob - row[e.token].item()) <= TOL
        vals, ids = row.topk(k)
        assert len(e.top) == k
        assert np.allclose([v for _, v in e.top], vals.tolist(), atol=TOL, rtol=0)
        for (i, v), j in zip(e.top, ids.tolist(), strict=True):
            assert abs(row[i].item() - v) <= TOL
            if (vals == row[j]).sum() == 1:  # not a tie: the id itself must match
                assert i == j


def test_scorer_picks_parent_rows_and_wire_round_trips():
    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64)
    # a session at rows 1..5 (root + 4 nodes): path root -> node 2 -> node 4, then next token
    sc = PathScorer(logits, {0: (1, 6)})
    tree_tokens = [7, 8, 9, 10]
    sc.add(0, [2, 4], tree_tokens, 33, 3)
    s = sc.score()[0]
    lp = torch.log_softmax(logits, -1)
    rows = [1 + r for r in path_rows([2, 4])]
    assert rows == [1, 3, 5]
    assert np.array_equal(s.logprobs, [lp[1, 8].item(), lp[3, 10].item(), lp[5, 33].item()])
    assert np.array_equal(s.top_ids, lp[rows].topk(3).indices.numpy())
    # the wire carries exactly the committed tokens' values (a cut at EOS keeps a prefix)
    back = from_wire([8, 10], **to_wire(s, 2))
    assert [e.logprob for e in back] == s.logprobs[:2].tolist()
    assert [len(e.top) for e in back] == [3, 3]
    with pytest.raises(ValueError):
        from_wire([8, 10, 33], **to_wire(s, 2))
    # half-precision logits are scored in float32, not in their own precision
    half = score(logits.to(torch.bfloat16), [1, 2, 3, 4, 5, 6], 2)
    ref = torch.log_softmax(logits.to(torch.bfloat16).float(), -1)
    assert np.allclose(half.logprobs, ref[range(6), [1, 2, 3, 4, 5, 6]].numpy(), atol=1e-6)


PROMPTS = [[11, 12, 13, 14, 15], [40, 41, 42], [7] * 9]


@pytest.mark.parametrize("sampling", [
    Sampling(), Sampling(temperature=0.9, top_k=40),
    # penalties and bias change the picks, never the reported values (raw logits)
    Sampling(temperature=0.9, presence_penalty=1.5, repetition_penalty=1.3,
             logit_bias=((7, 3.0), (40, -5.0)))], ids=["greedy", "sampled", "penalised"])
async def test_session_logprobs_equal_target_alone(nats_server, tiny_pair, sampling):
    """Two sessions ask (k=5 and k=0), one does not; all three share forwards."""
    target, draft = tiny_pair
    shape = TreeShape(budget=6, depth=4, width=2, topk=2)
    async with running_worker(target, nats_server.url, max_batch=4):
        asked, results, plain = await asyncio.gather(
            generate(nats_server.url, draft, PROMPTS[:1], max_new_tokens=30,
                     sampling=sampling, shape=shape, logprobs=K),
            generate(nats_server.url, draft, PROMPTS[1:], max_new_tokens=23,
                     sampling=sampling, seeds=[3, 4], shape=shape, logprobs=0),
            generate(nats_server.url, draft, PROMPTS[:1], max_new_tokens=30,
                     sampling=sampling, shape=shape))
    nc = await broker.connect(nats_server.url, "t")
    try:
        logs = {r.session_id: await read_session(nc.jetstream(), r.session_id)
                for r in asked + results + plain}
    finally:
        await nc.close()
    for prompt, res, k in [(PROMPTS[0], asked[0], K), (PROMPTS[1], results[0], 0),
                           (PROMPTS[2], results[1], 0)]:
        assert len(res.logprobs) == len(res.token_ids) > 0
        assert_matches(target_logprobs(target, prompt, res.token_ids), res.token_ids,
                       res.logprobs, k)
        for v in logs[res.session_id].verdicts():  # exactly the committed tokens' values
            assert len(v.logprobs) == 8 * len(unpack_ids(v.tokens))
    # multi-token rounds were scored (accepted rows beside the root's)
    assert max(r.accepted for res in asked + results for r in res.rounds) > 0
    # the session that did not ask pays nothing on the wire
    assert plain[0].logprobs == []
    verdicts: list[Verdict] = logs[plain[0].session_id].verdicts()
    assert verdicts and all(v.logprobs == v.top_ids == v.top_logprobs == b"" for v in verdicts)
    if sampling.temperature == 0:  # same seed, same tokens, asked or not
        assert plain[0].token_ids == asked[0].token_ids


async def test_api_logprobs_shapes_and_speculation(nats_server, tiny_pair, tok):
    target, _ = tiny_pair
    n = 20
    msgs = [{"role": "user", "content": "Count."}]
    async with api_stack(nats_server.url, tiny_pair, tok) as (base, _w):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        chat = await client.chat.completions.create(
            model="tiny-target", messages=msgs, max_tokens=n, logprobs=True, top_logprobs=3,
            temperature=0.8, seed=5)
        pieces, stream_lps, usage_chunk = [], [], None
        async for ch in await client.chat.completions.create(
                model="tiny-target", messages=msgs, max_tokens=n, logprobs=True,
                top_logprobs=3, stream=True, temperature=0,
                stream_options={"include_usage": True}):
            if ch.usage is not None:
                usage_chunk = ch
                continue
            c = ch.choices[0]
            pieces.append(c.delta.content or "")
            if c.logprobs is not None:
                stream_lps += c.logprobs.content
        plain = await client.chat.completions.create(model="tiny-target", messages=msgs,
                                                     max_tokens=4)
        legacy = await _http(f"{base}/v1/completions", "POST", json.dumps(
            {"model": "tiny-target", "prompt": "def f(x):", "max_tokens": n,
             "logprobs": 2}).encode())
        legacy_stream = await _http(f"{base}/v1/completions", "POST", json.dumps(
            {"model": "tiny-target", "prompt": "def f(x):", "max_tokens": n, "logprobs": 2,
             "stream": True}).encode())
        await client.close()
        nc = await broker.connect(nats_server.url, "t")
        try:
            slog = await read_session(nc.jetstream(), chat.id.removeprefix("chatcmpl-"))
        finally:
            await nc.close()

    # chat, not streamed: OpenAI's shape, the target alone's values
    content = chat.choices[0].logprobs.content
    text = chat.choices[0].message.content
    ids = [tok.convert_tokens_to_ids(e.token) for e in content]
    assert "".join(e.token for e in content) == text and len(ids) == n
    ref = target_logprobs(target, chat_ids(tok, "Count."), ids)
    for e, row in zip(content, ref, strict=True):
        assert abs(e.logprob - row[tok.convert_tokens_to_ids(e.token)].item()) <= TOL
        assert e.bytes == list(e.token.encode())
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            row.topk(3).values.tolist(), abs=TOL)
    # streamed (greedy): each chunk carries its tokens; together, the text's
    assert "".join(pieces) == "".join(e.token for e in stream_lps)
    ids = [tok.convert_tokens_to_ids(e.token) for e in stream_lps]
    assert ids == reference_greedy(target, chat_ids(tok, "Count."), n)
    ref = target_logprobs(target, chat_ids(tok, "Count."), ids)
    for e, row, i in zip(stream_lps, ref, ids, strict=True):
        assert abs(e.logprob - row[i].item()) <= TOL and len(e.top_logprobs) == 3
    assert sum(1 for p in pieces if p) > 1  # in several chunks, as verdicts came
    assert plain.choices[0].logprobs is None
    # speculation beside usage, equal to the log's own figures (replay)
    spec = chat.model_extra["speculation"]
    verdicts = slog.verdicts()
    assert spec["rounds"] == len(verdicts) > 0
    assert spec["tokens_per_round"] == pytest.approx(n / len(verdicts))
    assert spec["accepted_tokens"] == sum(len(unpack_ids(v.accepted)) for v in verdicts)
    assert spec == replay.view(slog).speculation
    assert 0 <= spec["acceptance"] <= 1
    assert set(usage_chunk.model_extra["speculation"]) == set(spec)

    # completions: the legacy shape, streamed and not, the same values
    assert legacy.status_code == 200, legacy.text
    body = legacy.json()
    lp = body["choices"][0]["logprobs"]
    text = body["choices"][0]["text"]
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == n
    assert lp["text_offset"] == list(range(n))  # one character per token
    ids = [tok.convert_tokens_to_ids(t) for t in lp["tokens"]]
    ref = target_logprobs(target, tok("def f(x):")["input_ids"], ids)
    for i, row in enumerate(ref):
        assert abs(lp["token_logprobs"][i] - row[ids[i]].item()) <= TOL
        top = lp["top_logprobs"][i]
        assert len(top) == 2 and sorted(top.values(), reverse=True) == pytest.approx(
            row.topk(2).values.tolist(), abs=TOL)
    assert body["speculation"]["rounds"] > 0
    events = [json.loads(line[6:]) for line in legacy_stream.text.splitlines()
              if line.startswith("data: {")]
    chunks = [e["choices"][0]["logprobs"] for e in events if e["choices"]]
    joined = {key: [x for c in chunks if c for x in c[key]] for key in lp}
    assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=TOL)
    assert [list(t) for t in joined["top_logprobs"]] == [list(t) for t in lp["top_logprobs"]]
