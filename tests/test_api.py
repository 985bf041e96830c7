"""The edge's OpenAI-compatible endpoint over the real stack: a real nats-server, a verifier
worker with the tiny float64 target, `specedge.edge serve` with the tiny draft, and the official
`openai` client, unmodified. Greedy output must equal the target alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerFast

from specedge import broker, subjects
from specedge.config import Limits
from specedge.edge import serve
from tests.stack import reference_greedy, running_worker
from tests.tokens import char_tokenizer


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def chat_ids(tok, content: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": content}],
                                        add_generation_prompt=True, tokenize=True)["input_ids"])


@contextlib.asynccontextmanager
async def api_stack(url: str, tiny_pair, tok, *extra: str, **worker_cfg):
    """A verifier (metrics on a free port) and `edge serve` (parsed from its CLI flags), both
    in this event loop; yields (api base URL, worker)."""
    target, draft = tiny_pair
    a = serve.parse(["--nats", url, "--model", "tiny-draft", "--target", "tiny-target",
                     "--dtype", "float64", "--port", "0", *extra])
    async with running_worker(target, url, metrics_port=0, metrics_host="127.0.0.1",
                              **worker_cfg) as w:
        stop = asyncio.Event()
        started = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve.serve(a, stop, draft=draft, tokenizer=tok,
                                               started=started))
        server = await asyncio.wait_for(started, 30)
        try:
            yield server.url, w
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


def scrape(text: str) -> dict[str, float]:
    """Samples as {'name{label=value,...}': value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def test_openai_client_streams_lossless_chat(nats_server, tiny_pair, tok):
    target, _ = tiny_pair
    n = 40
    async with api_stack(nats_server.url, tiny_pair, tok) as (base, _w):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="not-needed")
        listed = await client.models.list()
        assert [m.id for m in listed.data] == ["tiny-target"]
        stream = await client.chat.completions.create(
            model="tiny-target", messages=[{"role": "user", "content": "Write a haiku."}],
            stream=True, max_tokens=n, temperature=0, stream_options={"include_usage": True})
        pieces, finish, usage, roles = [], None, None, []
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
                assert chunk.choices == []
                continue
            c = chunk.choices[0]
            roles += [c.delta.role] if c.delta.role else []
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
        await client.close()
    ref = reference_greedy(target, chat_ids(tok, "Write a haiku."), n)
    assert "".join(pieces) == tok.decode(ref)
    assert len(pieces) > 1  # streamed as verdicts came, not in one piece
    assert roles == ["assistant"]
    assert finish == "length"
    assert usage.completion_tokens == n
    assert usage.prompt_tokens == len(chat_ids(tok, "Write a haiku."))
    assert usage.total_tokens == usage.prompt_tokens + n


@dataclass
class Reply:
    status_code: int
    text: str
    headers: dict = field(default_factory=dict)

    def json(self):
        return json.loads(self.text)


async def _http(url: str, method: str = "GET", data: bytes | None = None) -> Reply:
    """A plain HTTP call (stdlib, in a thread), for what the openai client will not send."""
    def call() -> Reply:
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return Reply(r.status, r.read().decode(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.read().decode(), dict(e.headers))
    return await asyncio.to_thread(call)


async def _get(url: str) -> Reply:
    return await _http(url)


async def test_concurrent_requests_lossless_and_metrics_consistent(nats_server, tiny_pair, tok):
    target, _ = tiny_pair
    chats = ["Tell me a story.", "Name three rivers.", "What is TCP?"]
    completions = ["def fib(n):", [5, 17, 42, 99, 3]]
    n = 24
    # prefill_chunk 16: the chat prompts (30+ tokens) catch up over several forwards, which the
    # batch series must count (a measured chunk would chunk them only on a slow machine).
    async with api_stack(nats_server.url, tiny_pair, tok, "--max-sessions", "8",
                         max_batch=8, prefill_chunk=16) as (base, w):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x")

        async def chat(q: str) -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model="tiny-target", messages=[{"role": "user", "content": q}], stream=True,
                max_tokens=n, stream_options={"include_usage": True}, seed=7)
            text, used = "", 0
            async for ch in stream:
                if ch.usage:
                    used = ch.usage.completion_tokens
                elif ch.choices[0].delta.content:
                    text += ch.choices[0].delta.content
            return text, used

        async def complete(prompt) -> tuple[str, int]:
            r = await client.completions.create(model="tiny-target", prompt=prompt,
                                                max_tokens=n, temperature=0)
            assert r.choices[0].finish_reason == "length"
            return r.choices[0].text, r.usage.completion_tokens

        results = await asyncio.gather(*(chat(q) for q in chats),
                                       *(complete(p) for p in completions))
        await client.close()
        edge = scrape((await _get(f"{base}/metrics")).text)
        health = [(await _get(f"{u}/{p}")).status_code
                  for u in (base, w.http.url) for p in ("health", "ready")]
        await w.metrics.poll_consumers(w.js, w.leases.owned)
        ver = scrape((await _get(f"{w.http.url}/metrics")).text)

    prompts = [chat_ids(tok, q) for q in chats] + [tok("def fib(n):")["input_ids"],
                                                   completions[1]]
    for (text, used), p in zip(results, prompts, strict=True):
        assert text == tok.decode(reference_greedy(target, p, n))
        assert used == n
    assert health == [200, 200, 200, 200]

    # Tokens and rounds counted on the edge equal those in the verifier's verdicts.
    total = n * len(prompts)
    assert edge["specedge_edge_tokens_total"] == total == ver["specedge_verifier_tokens_total"]
    # the number format each side's model runs in (--dtype auto's choice, shown)
    assert ver["specedge_verifier_model_dtype{dtype=float64}"] == 1
    assert edge["specedge_edge_model_dtype{dtype=float64}"] == 1
    rounds = ver["specedge_verifier_rounds_total"]
    assert edge["specedge_edge_rounds_total"] == rounds > 0
    assert edge["specedge_edge_tokens_per_round_sum"] == total
    assert edge["specedge_edge_tokens_per_round_count"] == rounds
    assert ver["specedge_verifier_tokens_per_round_sum"] == total
    assert edge["specedge_edge_round_trip_seconds_count"] == rounds
    assert edge["specedge_edge_time_to_first_token_seconds_count"] == len(prompts)
    assert 0 < edge["specedge_edge_inter_token_seconds_count"] <= total - len(prompts)
    guesses = (edge["specedge_edge_proactive_guesses_total{outcome=hit}"]
               + edge["specedge_edge_proactive_guesses_total{outcome=miss}"])
    assert 0 < guesses <= rounds
    assert 0 <= edge["specedge_edge_proactive_hit_rate"] <= 1
    assert edge["specedge_edge_sessions_total{outcome=ok}"] == len(prompts)
    assert edge["specedge_edge_sessions_active"] == 0
    assert edge["specedge_edge_http_requests_total{endpoint=chat,status=200}"] == 3
    assert edge["specedge_edge_http_requests_total{endpoint=completions,status=200}"] == 2

    # The verifier's batch, KV and acceptance series agree with each other.
    batches = ver["specedge_verifier_batches_total"]
    assert ver["specedge_verifier_batch_size_count"] == batches > 0
    # A block is in one forward per verdict, plus one per prefill chunk its session needed.
    blocks = rounds + ver["specedge_verifier_prefill_chunks_total"]
    assert 0 < ver["specedge_verifier_prefill_chunks_total"] == w.stats.prefill_chunks
    assert ver["specedge_verifier_batch_size_sum"] == blocks
    assert ver["specedge_verifier_verify_seconds_count"] == batches
    assert 0 < ver["specedge_verifier_busy_seconds_total"] == pytest.approx(
        ver["specedge_verifier_verify_seconds_sum"])
    assert ver["specedge_verifier_batch_fill_sum"] == pytest.approx(blocks / 8)
    assert 1 <= ver["specedge_verifier_suggested_budget"] <= 16  # a load hint was sent
    assert ver["specedge_verifier_hold_seconds_total"] >= 0
    assert max(w.stats.batch_sizes) > 1  # the concurrent sessions did share forwards
    assert (ver["specedge_verifier_kv_cache_lookups_total{result=hit}"]
            + ver["specedge_verifier_kv_cache_lookups_total{result=miss}"]) == rounds
    assert ver["specedge_verifier_kv_cache_lookups_total{result=miss}"] == len(prompts)
    assert 0 < ver["specedge_verifier_kv_cache_hit_rate"] < 1
    assert ver["specedge_verifier_position_drafted_total{position=1}"] == rounds
    accepted = sum(v for k, v in ver.items()
                   if k.startswith("specedge_verifier_position_accepted_total"))
    assert total - rounds <= accepted  # the last round of a session may be cut at max_tokens
    for d in range(1, 7):
        key = f"{{position={d}}}"
        assert (ver.get(f"specedge_verifier_position_accepted_total{key}", 0)
                <= ver.get(f"specedge_verifier_position_drafted_total{key}", 0))
    assert ver["specedge_verifier_redeliveries_total"] == 0
    assert ver["specedge_verifier_partitions"] == 16
    lag = [k for k in ver if k.startswith("specedge_verifier_consumer_lag{")]
    assert len(lag) == 16 and all(ver[k] == 0 for k in lag)  # all answered: nothing behind
    assert ver["specedge_verifier_queue_depth"] == 0
    assert "specedge_verifier_kv_cache_bytes" in ver


async def test_api_errors_stop_strings_and_rejections(nats_server, tiny_pair, tok):
    target, _ = tiny_pair
    async with api_stack(nats_server.url, tiny_pair, tok,
                         limits=Limits(max_prompt_tokens=64)) as (base, w):
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError) as e:
            await client.chat.completions.create(model="gpt-4o", messages=msgs)
        assert e.value.body["code"] == "model_not_found"
        for bad, param in (({"temperature": 3.5}, "temperature"),
                           ({"presence_penalty": 2.5}, "presence_penalty"),
                           ({"n": 5}, "n"), ({"max_tokens": 0}, "max_tokens")):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model="tiny-target", messages=msgs, **bad)
            assert e.value.body["param"] == param and e.value.body["type"] == (
                "invalid_request_error")
        r = await _http(f"{base}/v1/chat/completions", "POST", b"{not json")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await _http(f"{base}/v1/nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await _http(f"{base}/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()
        # Over the verifiers' limits (read from their board): refused by the edge up front.
        r = await _http(f"{base}/v1/completions", "POST", json.dumps({
            "model": "tiny-target", "prompt": "x" * 100, "max_tokens": 4}).encode())
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        # What only the verifier checks comes back as a 400 with its reason code.
        r = await _http(f"{base}/v1/completions", "POST", json.dumps({
            "model": "tiny-target", "prompt": "abc", "max_tokens": 4,
            "temperature": 1e-4}).encode())
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_session"

        # A stop string ends the text right before it, with finish_reason "stop".
        ids = chat_ids(tok, "Count.")
        full = tok.decode(reference_greedy(target, ids, 30))
        stop = full[12:14]
        r = await client.chat.completions.create(
            model="tiny-target", messages=[{"role": "user", "content": "Count."}],
            max_tokens=30, stop=[stop])
        assert r.choices[0].message.content == full[:full.index(stop)]
        assert r.choices[0].finish_reason == "stop"
        pieces = []
        async for ch in await client.chat.completions.create(
                model="tiny-target", messages=[{"role": "user", "content": "Count."}],
                max_tokens=30, stop=stop, stream=True):
            if ch.choices and ch.choices[0].delta.content:
                pieces.append(ch.choices[0].delta.content)
        assert "".join(pieces) == full[:full.index(stop)]
        await client.close()

        # A client that goes away mid-stream cancels its session (closed on the broker).
        def read_then_hang_up() -> bytes:
            host, port = base.removeprefix("http://").split(":")
            body = json.dumps({"model": "tiny-target", "prompt": "abc", "max_tokens": 900,
                               "stream": True}).encode()
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                got = b""
                while b"data: {" not in got:
                    got += sock.recv(4096)
            return got
        assert b"text/event-stream" in await asyncio.to_thread(read_then_hang_up)
        for _ in range(200):
            edge = scrape((await _get(f"{base}/metrics")).text)
            if edge.get("specedge_edge_sessions_total{outcome=cancelled}"):
                break
            await asyncio.sleep(0.05)
        assert edge["specedge_edge_sessions_active"] == 0
        ver = scrape((await _get(f"{w.http.url}/metrics")).text)
        edge = scrape((await _get(f"{base}/metrics")).text)
    assert edge["specedge_edge_sessions_total{outcome=cancelled}"] == 1
    assert ver["specedge_verifier_tokens_total"] < 900  # it did not run to the end
    assert ver["specedge_verifier_rejects_total{reason=invalid_session}"] == 1
    assert edge["specedge_edge_sessions_total{outcome=rejected}"] == 1
    assert edge["specedge_edge_sessions_total{outcome=stopped}"] == 2
    assert edge["specedge_edge_http_requests_total{endpoint=chat,status=404}"] == 1
    assert edge["specedge_edge_http_requests_total{endpoint=chat,status=400}"] == 5



async def test_over_limit_requests_refused_before_any_draft_forward(nats_server, tiny_pair, tok):
    """The verifier publishes its limits; `edge serve` reads them and refuses what the fleet
    would refuse right after tokenising: a 400 in OpenAI's shape, no draft forward (counted on
    the draft model), no message on the broker. Within the limits, max_tokens left out is capped
    to what fits the models' 1024 positions and the configured tree (8 nodes, depth 6) is
    clamped to the fleet's (4, depth 3), adaptive budget hints included: nothing is rejected."""
    target, draft = tiny_pair
    forwards: list[int] = []
    hook = draft.register_forward_hook(lambda *_: forwards.append(1))
    limits = Limits(max_prompt_tokens=2000, max_new_tokens=50, max_nodes=4, max_depth=3)
    op = await broker.connect(nats_server.url, "probe")
    js = op.jetstream()

    async def stored() -> int:
        return (await js.stream_info(subjects.STREAM)).state.messages

    try:
        async with api_stack(nats_server.url, tiny_pair, tok, limits=limits) as (base, w):
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            before = await stored()
            # serve measured its draft model's forward cost at start-up (its prefill chunk):
            # those forwards are not a request's
            started = len(forwards)
            cases = [  # (prompt characters = tokens, max_tokens, code, param, message part)
                (2100, 4, "context_length_exceeded", "prompt", "allows at most 2000"),
                (1100, None, "context_length_exceeded", "prompt", "context length is 1024"),
                (1000, 40, "context_length_exceeded", "max_tokens", "at most 22 completion"),
                (10, 60, "invalid_value", "max_tokens", "at most 50 completion"),
            ]
            for n, max_tokens, code, param, part in cases:
                t0 = time.perf_counter()
                r = await _http(f"{base}/v1/completions", "POST", json.dumps(
                    {"model": "tiny-target", "prompt": "x" * n}
                    | ({"max_tokens": max_tokens} if max_tokens else {})).encode())
                assert r.status_code == 400, r.text
                err = r.json()["error"]
                assert (err["code"], err["param"], err["type"]) == (
                    code, param, "invalid_request_error"), err
                assert part in err["message"], err
                assert time.perf_counter() - t0 < 2
            # the official client, a 40,000-character chat (the case, in miniature)
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model="tiny-target", messages=[{"role": "user", "content": "y" * 40_000}])
            assert e.value.body["code"] == "context_length_exceeded"
            assert e.value.body["param"] == "messages"
            assert forwards[started:] == [], "a refused request ran the draft model"
            assert await stored() == before, "a refused request reached the broker"

            # Within the limits: max_tokens left out = what fits (1024 - (1000 - 1 + 3) = 22).
            long = await client.completions.create(model="tiny-target", prompt="x" * 1000)
            short = await client.completions.create(model="tiny-target", prompt="hello",
                                                    max_tokens=40)
            await client.close()
        assert forwards[started:], "the admitted requests drafted"
        assert long.usage.completion_tokens == 22 and long.choices[0].finish_reason == "length"
        assert long.choices[0].text == tok.decode(
        reference_greedy(target, tok("x" * 1000)["input_ids"], 22))
        assert short.choices[0].text == tok.decode(
            reference_greedy(target, tok("hello")["input_ids"], 40))
        assert w.stats.rejected == 0  # no tree beyond 4 nodes / depth 3, no position overrun
        assert w.cfg.limits.max_positions == 1024  # the tiny target's, resolved by the worker
    finally:
        hook.remove()
        await op.close()


def test_demo_api_mode_streams_through_openai_and_checks_the_target(tiny_pair, tok, tmp_path):
    """`python -m specedge.demo --api --check` end to end (embedded broker, verifier process,
    edge serve, openai client, target-alone comparison), here with the tiny pair on disk."""
    import subprocess
    import sys

    from tests.procs import ROOT

    target, draft = tiny_pair
    tdir, ddir = tmp_path / "target", tmp_path / "draft"
    for model, d in ((target, tdir), (draft, ddir)):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    p = subprocess.run(
        [sys.executable, "-m", "specedge.demo", "--target", str(tdir), "--draft", str(ddir),
         "--dtype", "float64", "--api", "--check", "--port", "0", "--prompt", "Hello there",
         "--max-new-tokens", "20", "--threads", "1", "--verifier-threads", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # transformers reloads this tokenizer with its own decoder: compare with what it loads
    from specedge.models import load_tokenizer

    loaded = load_tokenizer(str(ddir))
    ids = chat_ids(loaded, "Hello there")
    assert p.stdout == loaded.decode(reference_greedy(target, ids, 20))
    assert "[identical to the target alone, greedy]" in p.stderr
    assert "[openai client: 20 tokens" in p.stderr


async def test_edge_serve_process_answers_and_stops_on_sigterm(nats_server, tiny_pair, tok,
                                                               tmp_path):
    """The real `python -m specedge.edge serve` process (port 0: it logs the one it got),
    the openai client against it, then SIGTERM: it stops serving and exits 0."""
    import signal
    import sys

    from specedge.models import load_tokenizer
    from tests.procs import ROOT

    target, draft = tiny_pair
    ddir = tmp_path / "draft"
    draft.save_pretrained(ddir)
    tok.save_pretrained(ddir)
    loaded = load_tokenizer(str(ddir))
    lines: list[dict] = []
    serving = asyncio.Event()

    async def read_log(stream) -> None:
        async for raw in stream:
            if raw.startswith(b"{"):
                lines.append(json.loads(raw))
                if lines[-1].get("event") == "serving":
                    serving.set()

    async with running_worker(target, nats_server.url):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "specedge.edge", "serve", "--nats", nats_server.url,
            "--model", str(ddir), "--target", "tiny", "--dtype", "float64", "--port", "0",
            "--threads", "1", "--log-level", "info",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        reader = asyncio.create_task(read_log(proc.stderr))
        try:
            await asyncio.wait_for(serving.wait(), 120)
            url = next(x["url"] for x in lines if x.get("event") == "serving")
            assert (await _get(url.removesuffix("/v1") + "/ready")).status_code == 200
            client = openai.AsyncOpenAI(base_url=url, api_key="x")
            r = await client.completions.create(model="tiny", prompt="abc", max_tokens=16)
            await client.close()
            assert r.choices[0].text == loaded.decode(
                reference_greedy(target, loaded("abc")["input_ids"], 16))
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 30)
            await reader
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert rc == 0
    assert lines[0]["event"] == "config" and lines[0]["port"] == 0
    assert any(x.get("event") == "stopping: finishing requests in flight" for x in lines)
