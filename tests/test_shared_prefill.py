"""Sessions that share a prompt prefix share its prefill: n > 1 choices of one request and
the turns of one conversation go to one partition (one verifier) and map the cached KV of
what came before, on the edge and on the verifier; the output is what it would be alone."""

from __future__ import annotations

import json

from specedge import broker, subjects
from specedge.edge.api import choice_seed
from specedge.edge.routes import Routes
from tests.stack import reference_greedy
from tests.test_api import _get, _http, api_stack, scrape
from tests.tokens import char_tokenizer

# long enough for several 16-token blocks
SYSTEM = "You are a terse assistant. Answer in one line, plainly, without any preamble. "


async def test_partition_of_is_the_brokers_and_ids_land_where_asked(nats_server):
    nc = await broker.connect(nats_server.url, "t")
    js = nc.jetstream()
    try:
        sids = [subjects.new_session_id("edge-a") for _ in range(64)]
        sids += [subjects.new_session_id("edge-b", p) for p in range(subjects.PARTITIONS)]
        for sid in sids:
            ack = await js.publish(subjects.draft(sid), b"x")
            stored = (await js.get_msg(subjects.STREAM, ack.seq)).subject
            assert int(stored.split(".")[2]) == subjects.partition_of(sid), sid
    finally:
        await nc.close()
    assert [subjects.partition_of(s) for s in sids[64:]] == list(range(subjects.PARTITIONS))


def test_routes_find_the_longest_known_prefix():
    r = Routes(block_size=4, max_blocks=6)
    r.add(list(range(12)), 3)  # blocks [0..3], [4..7], [8..11]
    r.add(list(range(8)) + [99] * 4, 5)  # shares the first two blocks: they move to 5
    assert r.find(list(range(12)) + [7]) == 3  # the longest match wins
    assert r.find(list(range(8)) + [1, 2]) == 5
    assert r.find([9, 9, 9, 9, 9]) is None
    assert r.find([0, 1, 2]) is None  # no full block
    r.add(list(range(100, 116)), 1)  # 4 more blocks: the least recently used go
    assert len(r) == 6 and r.find(list(range(100, 116))) == 1


def _chat(messages: list[dict], **kw) -> bytes:
    return json.dumps({"model": "tiny-target", "messages": messages} | kw).encode()


async def test_n_choices_share_the_prefill_and_equal_single_choices(nats_server, tiny_pair):
    """Each sampled choice equals a single-choice request with its derived seed; the
    choices ran in one partition, and the later ones took the prompt's KV from both caches."""
    tok = char_tokenizer()
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    async with api_stack(nats_server.url, tiny_pair, tok, "--max-n", "3") as (base, w):
        url_ = f"{base}/v1/chat/completions"
        many = await _http(url_, "POST", _chat(msgs, n=3, max_tokens=10, temperature=1.0,
                                               seed=11))
        assert many.status_code == 200, many.text
        singles = [await _http(url_, "POST", _chat(msgs, max_tokens=10, temperature=1.0,
                                                   seed=choice_seed(11, i)))
                   for i in range(3)]
        edge = scrape((await _get(f"{base}/metrics")).text)
    body = many.json()
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts == [s.json()["choices"][0]["message"]["content"] for s in singles]
    sids = many.headers["x-specedge-session"].split(",")
    assert len({subjects.partition_of(s) for s in sids}) == 1
    per = body["speculation"]["choices"]
    prompt = body["usage"]["prompt_tokens"]
    assert per[0]["cached_tokens"] == 0  # the first choice computed the prompt ...
    assert all(c["cached_tokens"] >= prompt // 16 * 16 - 16 > 0 for c in per[1:])  # ... once
    # the edge: the later choices (and the single requests after them) reused the draft KV
    assert edge["specedge_edge_prompt_tokens_total{source=cached}"] >= 2 * (prompt // 16 * 16 - 16)


async def test_a_follow_up_turn_goes_where_its_prefix_is_and_reuses_it(nats_server, tiny_pair):
    target, _ = tiny_pair
    tok = char_tokenizer()
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi there"}]
    async with api_stack(nats_server.url, tiny_pair, tok) as (base, w):
        url_ = f"{base}/v1/chat/completions"
        one = await _http(url_, "POST", _chat(first, max_tokens=12, temperature=0))
        reply = one.json()["choices"][0]["message"]["content"]
        second = first + [{"role": "assistant", "content": reply},
                          {"role": "user", "content": "and then?"}]
        two = await _http(url_, "POST", _chat(second, max_tokens=12, temperature=0))
        # an edited earlier message: the shared prefix ends at the edit
        edited = [first[0] | {"content": "X" + SYSTEM[1:]}] + second[1:]
        three = await _http(url_, "POST", _chat(edited, max_tokens=12, temperature=0))
        edge = scrape((await _get(f"{base}/metrics")).text)
    for reply_, msgs in ((two, second), (three, edited)):
        ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                           tokenize=True)["input_ids"])
        assert reply_.json()["choices"][0]["message"]["content"] == tok.decode(
            reference_greedy(target, ids, 12))
    p1, p2 = (subjects.partition_of(r.headers["x-specedge-session"]) for r in (one, two))
    assert p1 == p2
    usage = two.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= len(SYSTEM) // 16 * 16
    assert one.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # the edit is in the system prompt's first block: nothing before it to reuse
    assert three.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert edge["specedge_edge_prompt_tokens_total{source=cached}"] >= len(SYSTEM) // 16 * 16


async def test_a_shared_system_prompt_is_reused_across_tenants_only_by_name(nats_server,
                                                                           tiny_pair):
    """Two tenants (edge names) with the same system prompt: each has its own cache, unless
    both edges and the verifier share it by name; the output is the target alone's."""
    import asyncio

    from specedge.edge import serve

    target, draft = tiny_pair
    tok = char_tokenizer()
    sys_msg = {"role": "system", "content": SYSTEM * 2}

    async def ask(base: str, user: str) -> dict:
        r = await _http(f"{base}/v1/chat/completions", "POST", _chat(
            [sys_msg, {"role": "user", "content": user}], max_tokens=6, temperature=0))
        assert r.status_code == 200, r.text
        return r.json()

    async def second_edge(name: str, *extra: str):
        a = serve.parse(["--nats", nats_server.url, "--model", "tiny-draft", "--target",
                         "tiny-target", "--dtype", "float64", "--port", "0", "--edge-name",
                         name, *extra])
        stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve.serve(a, stop, draft=draft, tokenizer=tok,
                                               started=started))
        return (await asyncio.wait_for(started, 30)).url, stop, task

    got = {}
    for shared in (False, True):
        flag = ["--shared-prefix", "support-bot"] if shared else []
        async with api_stack(nats_server.url, tiny_pair, tok, "--edge-name", "tenant-a", *flag,
                             shared_prefixes=("support-bot",)) as (base_a, _w):
            a = await ask(base_a, "first question")
            base_b, stop, task = await second_edge("tenant-b", *flag)
            try:
                b = await ask(base_b, "another one")
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
        got[shared] = (a, b)
        ids = list(tok.apply_chat_template([sys_msg, {"role": "user", "content": "another one"}],
                                           add_generation_prompt=True,
                                           tokenize=True)["input_ids"])
        assert b["choices"][0]["message"]["content"] == tok.decode(
            reference_greedy(target, ids, 6))
    head = len(tok.apply_chat_template([sys_msg], tokenize=True)["input_ids"])
    assert got[False][1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert got[True][1]["usage"]["prompt_tokens_details"]["cached_tokens"] == head // 16 * 16 > 0
