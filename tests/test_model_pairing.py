"""Draft and target pair by tokenizer, not by embedding size: a draft whose tokenizer differs
(same size) is refused before any work with both names; drafts and targets whose embeddings
are padded differently past one tokenizer are accepted and exact, and nobody ever picks a
padding id."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
import torch

from schemas import SCHEMA_VERSION, DraftBlock, Rejected, Sampling, SessionOpened, pack_ids
from schemas import decode as decode_msg
from schemas import encode as encode_msg
from specedge import broker, subjects
from specedge.edge.__main__ import EXIT_REFUSED
from specedge.vocab import fingerprint, token_count
from tests.conftest import related_draft, tiny_model
from tests.procs import ROOT
from tests.stack import generate, reference_greedy, running_worker
from tests.tokens import char_tokenizer

PAD = 64


def named_target(name: str = "tiny-target"):
    t = tiny_model(1)
    t.config._name_or_path = name
    return t


def test_fingerprint_tells_tokenizers_apart_not_files():
    a, b, c = char_tokenizer(), char_tokenizer(), char_tokenizer(rotate=1)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c) and len(a) == len(c) == token_count(a) == 256



def test_the_identity_is_computed_once_per_tokenizer_until_it_changes(monkeypatch):
    """get_vocab builds every token's entry: once per tokenizer object, again only when a
    token is added or a special token changes (the edge's open and the demo share it)."""
    tok = char_tokenizer()
    calls = []
    real = type(tok).get_vocab
    monkeypatch.setattr(type(tok), "get_vocab", lambda self: calls.append(1) or real(self))
    first = (fingerprint(tok), token_count(tok))
    assert (fingerprint(tok), token_count(tok)) == first and len(calls) == 1
    tok.add_tokens(["<tool>"])
    assert token_count(tok) == 257 and fingerprint(tok) != first[0] and len(calls) == 2
    tok.add_special_tokens({"eos_token": "<tool>"})
    changed = fingerprint(tok)
    assert len(calls) == 3 and changed != first[0]
    assert changed == fingerprint(tok) and len(calls) == 3
@pytest.mark.timeout(180)
async def test_cli_edge_refuses_a_draft_with_another_tokenizer_naming_both(nats_server,
                                                                            model_dirs):
    """A verifier whose target has a tokenizer of the same size but other ids: the CLI edge
    exits 4 with one line naming the draft and the target, and nothing reaches the broker."""
    _, draft = model_dirs
    other = char_tokenizer(rotate=1)
    async with running_worker(named_target(), nats_server.url, tokenizer=fingerprint(other),
                              vocab_limit=token_count(other)):
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "specedge.edge", "--nats", nats_server.url, "--model", draft,
            "--dtype", "float64", "--threads", "1", "--no-chat", "--prompt", "hello",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        _, err = await asyncio.wait_for(p.communicate(), 120)
        js = (nc := await broker.connect(nats_server.url, "probe")).jetstream()
        stored = (await js.stream_info(subjects.STREAM)).state.messages
        await nc.close()
    text = err.decode()
    assert p.returncode == EXIT_REFUSED, text
    assert "(tokenizer_mismatch)" in text and draft in text and "tiny-target" in text, text
    assert "Traceback" not in text
    assert stored == 0


async def test_verifier_rejects_a_session_whose_draft_has_another_tokenizer(nats_server):
    """For edges that skip the check: the session's open message carries the draft's
    fingerprint, and the verifier rejects a mismatch, naming both models."""
    tok = char_tokenizer()
    nc = await broker.connect(nats_server.url, "raw-edge")
    js = nc.jetstream()
    sid = subjects.new_session_id()
    got: asyncio.Queue = asyncio.Queue()

    async def on_verdict(m) -> None:
        got.put_nowait(decode_msg(m.data))

    await nc.subscribe(subjects.verdict(sid), cb=on_verdict)
    try:
        async with running_worker(named_target(), nats_server.url, tokenizer=fingerprint(tok),
                                  vocab_limit=256):
            await js.publish(subjects.session(sid), encode_msg(SessionOpened(
                v=SCHEMA_VERSION, prompt=pack_ids([5, 6, 7]), sampling=Sampling(), seed=0,
                max_new_tokens=8, eos_ids=b"", target="t", draft="my-draft", vocab_size=256,
                tokenizer=fingerprint(char_tokenizer(rotate=3)))))
            await js.publish(subjects.draft(sid), encode_msg(DraftBlock(
                v=SCHEMA_VERSION, round=0, committed_len=3, root=7, tokens=pack_ids([1]),
                parents=pack_ids([0]))))
            out = await asyncio.wait_for(got.get(), 60)
    finally:
        await nc.close()
    assert isinstance(out, Rejected) and out.code == "tokenizer_mismatch", out
    assert "my-draft" in out.reason and "tiny-target" in out.reason


def pad_embeddings(model, rows: int, loud: bool):
    """`model` with its embeddings padded to `rows` (as families do for alignment); with
    `loud`, the padding rows' logits dominate, so that a side not masking them picks them."""
    model.resize_token_embeddings(rows)
    model.to(torch.float64)
    if loud:
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            n = head.shape[0] - 256  # row 256 + k: row k tripled, so beats it where positive
            head[256:] = 3.0 * head[:n]
    return model


def restricted_greedy(target, prompt: list[int], n: int) -> list[int]:
    """The target alone, greedy over the tokenizer's 256 ids."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(target(torch.tensor([ids])).logits[0, -1, :256].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("padded", ["draft", "target"])
async def test_differently_padded_embeddings_are_exact(nats_server, padded):
    target = tiny_model(1)
    draft = related_draft(target, noise=0.3, seed=2)
    padded_model = pad_embeddings(draft if padded == "draft" else target,
                                  256 + (PAD if padded == "draft" else 2 * PAD), loud=True)
    prompts = [[5, 9, 200, 17], list(range(30, 60))]
    with torch.no_grad():  # rigged: unmasked, the padded side would pick a padding id
        assert int(padded_model(torch.tensor([prompts[0]])).logits[0, -1].argmax()) >= 256
    refs = [restricted_greedy(target, p, 20) for p in prompts]
    async with running_worker(target, nats_server.url, vocab_limit=256):
        results = await generate(nats_server.url, draft, prompts, max_new_tokens=20,
                                 vocab_limit=256)
    for r, ref in zip(results, refs, strict=True):
        assert r.token_ids == ref
    if padded == "draft":  # unpadded target: the reference is the target's own generate()
        assert refs[0] == reference_greedy(target, prompts[0], 20)


async def test_edge_serve_answers_400_for_a_draft_with_another_tokenizer(nats_server, tiny_pair):
    """`edge serve` refuses a request with OpenAI's 400 naming both models when the fleet's
    target has another tokenizer; nothing reaches the broker."""
    import openai

    from tests.test_api import api_stack

    tok = char_tokenizer()
    other = char_tokenizer(rotate=2)
    _, draft = tiny_pair
    op = await broker.connect(nats_server.url, "probe")
    try:
        async with api_stack(nats_server.url, (named_target(), draft), tok,
                             tokenizer=fingerprint(other), vocab_limit=256) as (base, _w):
            client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError) as exc:
                await client.completions.create(model="tiny-target", prompt="hello",
                                                max_tokens=4)
            stored = (await op.jetstream().stream_info(subjects.STREAM)).state.messages
    finally:
        await op.close()
    body = exc.value.body
    assert body["code"] == "tokenizer_mismatch", body
    assert "tiny-draft" in body["message"] and "tiny-target" in body["message"]
    assert stored == 0
