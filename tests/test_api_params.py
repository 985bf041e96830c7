"""The API's sampling parameters: bad values get OpenAI-shaped 400s before any work (no draft
forward, nothing on the broker); good ones reach the session's opening as given."""

from __future__ import annotations

import json

import pytest

from schemas import Sampling
from specedge import broker, subjects
from specedge.sessionlog import read_session
from tests.test_api import _http, api_stack
from tests.tokens import char_tokenizer

MSGS = [{"role": "user", "content": "hi"}]

# (endpoint, body fields, param, code); the tiny vocabulary has 256 ids
BAD = [
    ("chat", {"presence_penalty": 2.5}, "presence_penalty", "decimal_above_max_value"),
    ("chat", {"frequency_penalty": -2.01}, "frequency_penalty", "decimal_below_min_value"),
    ("chat", {"repetition_penalty": 0}, "repetition_penalty", "decimal_below_min_value"),
    ("text", {"repetition_penalty": 10.5}, "repetition_penalty", "decimal_above_max_value"),
    ("chat", {"min_p": 1.5}, "min_p", "decimal_above_max_value"),
    ("chat", {"presence_penalty": "high"}, "presence_penalty", None),
    ("chat", {"logit_bias": {"256": 5}}, "logit_bias", "invalid_value"),
    ("chat", {"logit_bias": {"-1": 5}}, "logit_bias", "invalid_value"),
    ("chat", {"logit_bias": {"abc": 5}}, "logit_bias", "invalid_value"),
    ("text", {"logit_bias": {"5": 100.5}}, "logit_bias", "invalid_value"),
    ("chat", {"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
    ("chat", {"logit_bias": [1, 2]}, "logit_bias", None),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "integer_above_max_value"),
    ("chat", {"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("chat", {"logprobs": 3}, "logprobs", None),  # chat's logprobs is a boolean
    ("text", {"logprobs": 6}, "logprobs", "integer_above_max_value"),
    ("text", {"logprobs": -1}, "logprobs", "integer_below_min_value"),
    ("chat", {"n": 5}, "n", "integer_above_max_value"),
    ("chat", {"n": 0}, "n", "integer_below_min_value"),
    ("chat", {"temperature": 2.5}, "temperature", "decimal_above_max_value"),
    ("text", {"top_p": 0}, "top_p", "decimal_below_min_value"),
    ("text", {"top_k": 257}, "top_k", "integer_above_max_value"),
]


def _body(kind: str, extra: dict) -> bytes:
    base = {"model": "tiny-target", "max_tokens": 4}
    base |= {"messages": MSGS} if kind == "chat" else {"prompt": "abc"}
    return (json.dumps(base | extra)).encode()


def _url(base: str, kind: str) -> str:
    return f"{base}/v1/{'chat/completions' if kind == 'chat' else 'completions'}"


async def test_bad_values_refused_before_any_work_good_ones_reach_the_session(
        nats_server, tiny_pair):
    _, draft = tiny_pair
    forwards: list[int] = []
    hook = draft.register_forward_hook(lambda *_: forwards.append(1))
    op = await broker.connect(nats_server.url, "probe")
    js = op.jetstream()

    async def stored() -> int:
        return (await js.stream_info(subjects.STREAM)).state.messages

    try:
        async with api_stack(nats_server.url, tiny_pair, char_tokenizer()) as (base, _w):
            before, started = await stored(), len(forwards)
            for kind, extra, param, code in BAD:
                r = await _http(_url(base, kind), "POST", _body(kind, extra))
                assert r.status_code == 400, (extra, r.text)
                err = r.json()["error"]
                assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
                if code is not None:
                    assert err["code"] == code, err
                assert err["message"], err
            # NaN (Python's json reads it): fails every range
            r = await _http(_url(base, "chat"), "POST",
                            _body("chat", {}).replace(b'"max_tokens": 4',
                                                      b'"max_tokens": 4, "min_p": NaN'))
            assert r.status_code == 400 and r.json()["error"]["param"] == "min_p", r.text
            r = await _http(_url(base, "chat"), "POST", _body("chat", {"n": 9}))
            assert "configured maximum" in r.json()["error"]["message"]
            assert forwards[started:] == [], "a refused request ran the draft model"
            assert await stored() == before, "a refused request reached the broker"

            # in range: accepted, and carried in the session's opening exactly
            good = {"presence_penalty": 0.5, "frequency_penalty": -0.25,
                    "repetition_penalty": 1.2, "min_p": 0.05, "temperature": 0.7,
                    "logit_bias": {"65": 2.5, "3": -100}, "n": 1, "seed": 9}
            sids = []
            for kind in ("chat", "text"):
                r = await _http(_url(base, kind), "POST", _body(kind, good))
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 4
                sids.append(r.json()["id"].split("-", 1)[1])
            slogs = [await read_session(js, sid) for sid in sids]
    finally:
        hook.remove()
        await op.close()
    want = Sampling(temperature=0.7, min_p=0.05, presence_penalty=0.5,
                    frequency_penalty=-0.25, repetition_penalty=1.2,
                    logit_bias=((3, -100.0), (65, 2.5)))
    for sl in slogs:
        assert sl.opened.sampling == want
        assert sl.opened.logprobs == -1  # not asked: no values on the wire
    assert forwards[started:], "the accepted requests drafted"


@pytest.mark.parametrize("body,k", [({"logprobs": True}, 0),
                                    ({"logprobs": True, "top_logprobs": 20}, 20),
                                    ({"logprobs": False}, -1)])
def test_chat_logprobs_parameters(body, k):
    from specedge.edge.api import ServeConfig, _parse_common

    cfg = ServeConfig(model_id="m")
    got = _parse_common({"model": "m", "messages": MSGS} | body, cfg, 256, chat=True)
    assert got["logprobs"] == k


async def test_n_choices_each_a_session(nats_server, tiny_pair):
    """n choices: each its own session (greedy: each the target alone's answer; sampled: their
    own seeds), streamed and not, usage summed with the prompt once, speculation per choice."""
    from specedge.edge.api import choice_seed
    from tests.stack import reference_greedy
    from tests.test_api import chat_ids

    target, _ = tiny_pair
    tok = char_tokenizer()
    n_tok = 12
    async with api_stack(nats_server.url, tiny_pair, tok, "--max-n", "3") as (base, _w):
        greedy = await _http(_url(base, "chat"), "POST", _body("chat", {
            "n": 3, "max_tokens": n_tok, "temperature": 0}))
        sampled = await _http(_url(base, "text"), "POST", _body("text", {
            "n": 3, "max_tokens": n_tok, "temperature": 1.0, "seed": 11}))
        streamed = await _http(_url(base, "chat"), "POST", _body("chat", {
            "n": 2, "max_tokens": n_tok, "stream": True,
            "stream_options": {"include_usage": True}}))
        over = await _http(_url(base, "chat"), "POST", _body("chat", {"n": 4}))
        nc = await broker.connect(nats_server.url, "t")
        try:
            sids = sampled.headers["x-specedge-session"].split(",")
            seeds = [(await read_session(nc.jetstream(), sid)).opened.seed for sid in sids]
        finally:
            await nc.close()
    ref = tok.decode(reference_greedy(target, chat_ids(tok, "hi"), n_tok))
    body = greedy.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == [ref] * 3
    assert body["usage"]["completion_tokens"] == 3 * n_tok
    assert body["usage"]["prompt_tokens"] == len(chat_ids(tok, "hi"))
    spec = body["speculation"]
    assert len(spec["choices"]) == 3
    assert spec["rounds"] == sum(c["rounds"] for c in spec["choices"])
    texts = [c["text"] for c in sampled.json()["choices"]]
    assert len(set(texts)) == 3  # independent draws
    assert sampled.json()["id"] == f"cmpl-{sids[0]}"
    assert seeds == [choice_seed(11, i) for i in range(3)] and seeds[0] == 11
    assert len(set(seeds)) == 3
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    per = {0: "", 1: ""}
    for e in events:
        for c in e["choices"]:
            per[c["index"]] += c["delta"].get("content") or ""
    assert per == {0: ref, 1: ref}
    assert events[-1]["usage"]["completion_tokens"] == 2 * n_tok
    assert over.status_code == 400 and over.json()["error"]["param"] == "n"
    assert "[1, 3]" in over.json()["error"]["message"]
