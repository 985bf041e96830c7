"""response_format and tools on the OpenAI-compatible endpoint, over the real stack (nats-server,
verifier with the tiny float64 target, `edge serve` with the tiny draft) and the official
openai client: output equal to the target alone under the same grammar, valid against its
schema, tool calls parsed and streamed as OpenAI's, bad input refused before any work."""

from __future__ import annotations

import json
import threading

import jsonschema
import openai
import pytest
import torch
from xgrammar.contrib.hf import LogitsProcessor

from schemas.wire import GrammarSpec
from specedge import broker, subjects
from specedge.edge.tools import call_grammar
from specedge.execution.grammar import Grammars
from tests.test_api import _http, api_stack
from tests.tokens import char_tokenizer

EOS_CHAR = chr(0x100 + 159)  # id 255
TEMPLATE = ("{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
            "{% for m in messages %}{{ m['role'] }}: {% if m['content'] %}{{ m['content'] }}"
            "{% endif %}{% for c in m.tool_calls or [] %}<call>{{ c.function | tojson }}</call>"
            "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "colour": {"enum": ["red", "green", "blue"]}}, "required": ["ok", "n", "colour"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1,
                                                             "maximum": 7}},
        "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
Q = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def tok():
    t = char_tokenizer()
    t.add_special_tokens({"eos_token": EOS_CHAR})  # id 255, left out of the text
    t.chat_template = TEMPLATE
    return t


def prompt(tok, msgs, tools=None) -> list[int]:
    return list(tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True,
                                        tokenize=True)["input_ids"])


def reference(target, ids: list[int], compiled, n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                              do_sample=False, pad_token_id=0, eos_token_id=255,
                              logits_processor=[LogitsProcessor(compiled)])
    return [t for t in out[0, len(ids):].tolist() if t != 255]


async def test_response_format_exact_valid_streamed_and_not(nats_server, tiny_pair, tok):
    target, _ = tiny_pair
    g = Grammars(tok, 256)
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA,
                                                 "strict": True}}
    want = tok.decode(reference(target, prompt(tok, Q), g.compile(
        GrammarSpec("json_schema", json.dumps(SCHEMA)), [255]), 64))
    async with api_stack(nats_server.url, tiny_pair, tok) as (base, w):
        w.engine.grammars = Grammars(tok, 256)
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x")
        r = await client.chat.completions.create(model="tiny-target", messages=Q, max_tokens=64,
                                                 temperature=0, response_format=rf)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(want), SCHEMA)
        stream = await client.chat.completions.create(
            model="tiny-target", messages=Q, max_tokens=64, temperature=0, response_format=rf,
            stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == want
        obj = await client.chat.completions.create(
            model="tiny-target", messages=Q, max_tokens=64, temperature=0,
            response_format={"type": "json_object"})
        if obj.choices[0].finish_reason == "stop":  # complete: a JSON object
            assert isinstance(json.loads(obj.choices[0].message.content), dict)
        cut = await client.chat.completions.create(
            model="tiny-target", messages=Q, max_tokens=6, temperature=0, response_format=rf)
        assert cut.choices[0].finish_reason == "length"  # a cut object cannot validate
        assert cut.choices[0].message.content == want[:6]
        text = await client.completions.create(model="tiny-target", prompt="Q: a colour?\nA:",
                                               max_tokens=64, temperature=0,
                                               extra_body={"response_format": rf})
        jsonschema.validate(json.loads(text.choices[0].text), SCHEMA)
        await client.close()


async def test_tool_calls_forced_exact_then_the_result_comes_back(nats_server, tiny_pair, tok):
    target, _ = tiny_pair
    g = Grammars(tok, 256)
    named = {"type": "function", "function": {"name": "get_weather"}}
    ids = prompt(tok, Q, [WEATHER, TIME])
    want = tok.decode(reference(target, ids, g.compile(call_grammar([WEATHER]), [255]), 120))
    async with api_stack(nats_server.url, tiny_pair, tok) as (base, w):
        w.engine.grammars = Grammars(tok, 256)
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x")
        r = await client.chat.completions.create(
            model="tiny-target", messages=Q, tools=[WEATHER, TIME], tool_choice=named,
            max_tokens=120, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER["function"]["parameters"])
        assert want == '<tool_call>\n{"name": "get_weather", "arguments": ' + \
            json.dumps(args) + "}\n</tool_call>"  # the target's own constrained output
        # streamed as OpenAI streams calls: id, type and name first, then the arguments
        stream = await client.chat.completions.create(
            model="tiny-target", messages=Q, tools=[WEATHER, TIME], tool_choice="required",
            max_tokens=120, temperature=0, stream=True)
        deltas, finish = [], None
        async for chunk in stream:
            if chunk.choices:
                deltas += chunk.choices[0].delta.tool_calls or []
                finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert deltas[0].id and deltas[0].function.name in ("get_weather", "get_time")
        streamed = json.loads("".join(d.function.arguments or "" for d in deltas))
        assert isinstance(streamed, dict)
        # step two: the call and its result go back; the answer is the target's on that prompt
        msgs = Q + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {
                "name": "get_weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        r2 = await client.chat.completions.create(model="tiny-target", messages=msgs,
                                                  tools=[WEATHER, TIME], max_tokens=20,
                                                  temperature=0, tool_choice="none")
        rendered = prompt(tok, [Q[0], {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": args}}]},
            {"role": "tool", "content": "sunny, 21 C"}])
        from tests.stack import reference_greedy

        ref = reference_greedy(target, rendered, 20)
        assert r2.choices[0].message.content == tok.decode(ref[: (ref + [255]).index(255)])
        await client.close()


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}, "response_format", "invalid_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name", None),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "description": "y" * 70000}}}},
     "response_format", "invalid_schema"),  # too large to compile
    ({"response_format": {"type": "yaml"}}, "response_format.type", None),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]},
     "tools[0].function.name", None),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", None),
    ({"tools": [WEATHER, WEATHER]}, "tools", None),
    ({"tool_choice": "required"}, "tool_choice", None),
    ({"functions": [{"name": "f"}]}, "functions", None),
    ({"messages": Q + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id", None),
]


async def test_bad_structured_requests_refused_before_any_work(nats_server, tiny_pair, tok):
    _, draft = tiny_pair
    forwards: list[int] = []
    hook = draft.register_forward_hook(lambda *_: forwards.append(1))
    op = await broker.connect(nats_server.url, "probe")
    js = op.jetstream()
    try:
        async with api_stack(nats_server.url, tiny_pair, tok) as (base, _w):
            before, started = (await js.stream_info(subjects.STREAM)).state.messages, len(forwards)
            for extra, param, code in BAD:
                body = {"model": "tiny-target", "max_tokens": 4, "messages": Q} | extra
                r = await _http(f"{base}/v1/chat/completions", "POST", json.dumps(body).encode())
                assert r.status_code == 400, (extra, r.text)
                err = r.json()["error"]
                assert (err["param"], err["type"]) == (param, "invalid_request_error"), err
                if code:
                    assert err["code"] == code, err
            assert (await js.stream_info(subjects.STREAM)).state.messages == before
            assert len(forwards) == started, "no draft forward for a refused request"
    finally:
        hook.remove()
        await op.close()


def test_a_compile_over_the_time_limit_is_refused(tok):
    from specedge.execution.grammar import GrammarError

    # the compile thread busy until the caller has given up: over the limit whatever the CPU
    # (a microsecond limit raced a loaded machine: the compile could finish first)
    g = Grammars(tok, 256, timeout_s=0.05, threads=1)
    gate = threading.Event()
    g._pool.submit(gate.wait, 60)
    try:
        with pytest.raises(GrammarError, match="did not compile within"):
            g.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)), [255])
    finally:
        gate.set()
    assert g.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)), [255], timeout_s=60)
