"""Session log and replay: the text the edge printed, re-verification from the log alone,
tamper detection, and the timeline plot."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from schemas import Verdict, decode, encode, pack_ids, unpack_ids
from specedge import broker, replay, subjects
from specedge.config import TreeShape
from specedge.edge.text import Detokenizer
from specedge.models import DEFAULT_TARGET, load_tokenizer
from specedge.sessionlog import read_session
from tests.conftest import FAST_CONSUMER
from tests.procs import ROOT
from tests.stack import generate, running_worker

PROMPTS = [[11, 12, 13, 14, 15], [40, 41, 42], [7] * 9, [200, 100, 50, 25, 12, 6]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_TARGET)  # any tokenizer whose ids cover the tiny vocabulary


async def run_sessions(url, draft, target):
    async with running_worker(target, url, max_batch=4):
        return await generate(url, draft, PROMPTS, max_new_tokens=30,
                              shape=TreeShape(budget=6, depth=4, width=2, topk=2))


async def test_replay_reproduces_text_and_rounds(nats_server, tiny_pair, tokenizer):
    target, draft = tiny_pair
    results = await run_sessions(nats_server.url, draft, target)
    nc = await broker.connect(nats_server.url, "replay-test")
    try:
        listed = await replay.list_sessions(nc.jetstream())
        slogs = [await read_session(nc.jetstream(), r.session_id) for r in results]
    finally:
        await nc.close()
    assert {sv.sid for sv in listed} == {r.session_id for r in results}
    assert all(sv.state == "closed" for sv in listed)
    for res, sl in zip(results, slogs, strict=True):
        printed = Detokenizer(tokenizer)
        # what the edge printed: streamed per token, then the held-back tail at the end
        streamed = "".join(printed.push([t]) for t in res.token_ids) + printed.flush()
        sv = replay.view(sl)
        replay.attach_text(sv, tokenizer)
        assert [t for r in sv.rounds for t in r.tokens] == res.token_ids
        assert sv.rounds[-1].text == streamed == printed.text()
        assert len(sv.rounds) == len(res.rounds)
        assert [r.accepted for r in sv.rounds] == [r.accepted for r in res.rounds]
        assert all(r.verify_s > 0 and r.in_flight_s >= r.verify_s for r in sv.rounds)
        assert sv.dtype == str(target.dtype).removeprefix("torch.")  # the verdicts carry it


async def replay_cli(*args: str) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "specedge.replay", *args], capture_output=True,
        text=True, cwd=ROOT, timeout=120)


async def copy_session(src_js, dst_js, sid: str, alter_round: int | None) -> None:
    """Copy a session's log into another broker's stream, optionally altering one verdict."""
    for e in (await read_session(src_js, sid)).entries:
        msg = e.msg
        if isinstance(msg, Verdict) and msg.round == alter_round:
            toks = unpack_ids(msg.tokens)
            toks[-1] = (toks[-1] + 1) % 256
            msg = Verdict(**{f: getattr(msg, f) for f in msg.__struct_fields__} |
                          {"tokens": pack_ids(toks), "next_token": toks[-1]})
        subject = {"session": subjects.session(sid), "verdict": subjects.verdict(sid)}.get(
            e.kind, subjects.draft(sid))
        await dst_js.publish(subject, encode(msg))


async def test_check_passes_then_detects_an_altered_verdict(nats_server, tiny_pair, tmp_path,
                                                             target_dir):
    target, draft = tiny_pair
    results = await run_sessions(nats_server.url, draft, target)
    sid = results[0].session_id
    assert len(results[0].rounds) >= 4
    # the CLI, against the real log
    out = await replay_cli(sid, "--check", "--model", target_dir, "--dtype", "float64",
                           "--nats", nats_server.url)
    assert out.returncode == 0, out.stderr
    assert f"all {len(results[0].rounds)} rounds match" in out.stdout
    # a copied stream with round 2's verdict altered
    copy = broker.EmbeddedNats(store_dir=tmp_path / "copy").start()
    try:
        await broker.setup(copy.url, consumer=FAST_CONSUMER)
        a = await broker.connect(nats_server.url, "src")
        b = await broker.connect(copy.url, "dst")
        await copy_session(a.jetstream(), b.jetstream(), sid, alter_round=2)
        res = replay.check(await read_session(b.jetstream(), sid), target)
        await a.close()
        await b.close()
        assert res.first_mismatch == 2, res.detail
        out = await replay_cli(sid, "--check", "--model", target_dir, "--dtype", "float64",
                               "--nats", copy.url)
        assert out.returncode == 1 and "round 2" in out.stdout, out.stdout + out.stderr
    finally:
        copy.cleanup()


async def test_timeline_plot(nats_server, tiny_pair, tmp_path):
    target, draft = tiny_pair
    results = await run_sessions(nats_server.url, draft, target)
    nc = await broker.connect(nats_server.url, "replay-test")
    try:
        views = [replay.view(await read_session(nc.jetstream(), r.session_id)) for r in results]
    finally:
        await nc.close()
    rows, bars = replay.segments(views)
    assert len(rows) == 4 + 1  # a row per session, one for the verifier
    assert {k for _, _, _, k in bars} >= {"drafting", "in flight", "verifying"}
    assert all(e >= s for _, s, e, _ in bars)
    png = tmp_path / "timeline.png"
    replay.plot(views, str(png))
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 200
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (0xC4, 0x4E, 0x52) in colors and (0x4C, 0x72, 0xB0) in colors  # verifying, drafting
    page = tmp_path / "timeline.html"
    replay.plot(views, str(page))
    text = page.read_text()
    assert text.count("class=row") == 5 and "verifying" in text


def test_one_log_reader():
    """Verifier recovery and replay parse the log with the same function."""
    import workers.verifier.worker as w

    assert w.read_session is replay.read_session
    assert asyncio.iscoroutinefunction(replay.read_session)
    assert decode is not None


async def test_replay_cli_views(nats_server, tiny_pair, tmp_path):
    target, draft = tiny_pair
    results = await run_sessions(nats_server.url, draft, target)
    sid = results[1].session_id
    url = ["--nats", nats_server.url]
    out = await replay_cli("--list", *url)
    assert out.returncode == 0 and all(r.session_id in out.stdout for r in results)
    assert out.stdout.count("closed") == len(results)
    out = await replay_cli(sid, "--tokenizer", DEFAULT_TARGET, *url)
    assert out.returncode == 0, out.stderr
    assert f"session {sid} (closed)" in out.stdout
    assert f"{len(results[1].token_ids)} tokens in {len(results[1].rounds)} rounds" in out.stdout
    out = await replay_cli(sid, "--json", "--no-text", *url)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert lines[0]["session"]["sid"] == sid and lines[0]["tokens"] == len(results[1].token_ids)
    assert [x["round"] for x in lines[1:]] == list(range(len(results[1].rounds)))
    assert sum(len(x["tokens"]) for x in lines[1:]) == len(results[1].token_ids)
    png = tmp_path / "t.png"
    out = await replay_cli(*[r.session_id for r in results], "--plot", str(png), *url)
    assert out.returncode == 0 and png.stat().st_size > 10_000
