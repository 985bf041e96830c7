"""Isolation between edges on a real nats-server started with the shipped secure configuration
(deploy/nats/secure.conf: NKey users from `python -m specedge.auth`, TLS from a CA made by the
test): an edge cannot read, forge or disturb another edge's session, and cannot touch the
JetStream API, while its own sessions and the verifier (under its own user) work."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    Sampling,
    SessionOpened,
    encode,
    pack_ids,
    unpack_ids,
)
from specedge import broker, subjects
from specedge.config import Limits, TreeShape
from specedge.fleet import FleetView
from specedge.sessionlog import committed_sequence, read_session
from tests.conftest import FAST_CONSUMER
from tests.procs import ROOT
from tests.secure import SecureBroker, start_secure
from tests.stack import generate, reference_greedy, running_worker

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]


@pytest.fixture
def secure(tmp_path):
    sb = start_secure(tmp_path, ["alice", "bob"], consumer=FAST_CONSUMER)
    yield sb
    sb.stop()


class Errors:
    """The connection's async error callback: where the broker's permission refusals land."""

    def __init__(self):
        self.seen: list[str] = []

    async def cb(self, e: Exception) -> None:
        self.seen.append(str(e).lower())

    async def refused(self, op: str, subject: str, timeout: float = 3.0) -> None:
        want = f'permissions violation for {op} to "{subject.lower()}"'
        for _ in range(int(timeout / 0.02)):
            if any(want in s for s in self.seen):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no broker refusal {want!r}; saw {self.seen}")


async def edge_conn(sb: SecureBroker, user: str, errors: Errors | None = None) -> nats.NATS:
    kw = {"error_cb": errors.cb} if errors else {}
    return await broker.connect(sb.url, f"edge-{user}", **sb.opts(user, **kw))


def opened(prompt: list[int]) -> bytes:
    return encode(SessionOpened(v=SCHEMA_VERSION, prompt=pack_ids(prompt), sampling=Sampling(),
                                seed=0, max_new_tokens=8, eos_ids=b"", target="t", draft="d",
                                vocab_size=256))


async def test_edge_cannot_read_or_forge_another_edges_session(secure, tiny_pair):
    target, draft = tiny_pair
    bob_sid = subjects.new_session_id("bob")
    errs = Errors()
    alice = await edge_conn(secure, "alice", errs)
    op = await broker.connect(secure.url, "operator", **secure.opts("operator"))
    op_js = op.jetstream()

    # 1. Subscriptions to bob's verdicts (exact and wildcards), bob's inbox, every session's
    #    open/close and the default inbox are refused by the broker and deliver nothing.
    leaked: list[str] = []

    async def leak(m):
        leaked.append(m.subject)

    #    Nor may she answer the fleet's limits queries (posing as a verifier) or read its board.
    for subj in (subjects.verdict(bob_sid), subjects.verdict("bob.*"), subjects.verdict("*.*"),
                 subjects.progress(bob_sid), subjects.progress("bob.*"),
                 subjects.progress("*.*"), "specedge.>", ">", f"{subjects.edge_inbox('bob')}.>", "_INBOX.>",
                 subjects.all_sessions(), "$JS.API.>", subjects.fleet_query(),
                 f"$KV.{subjects.FLEET}.>"):
        await alice.subscribe(subj, cb=leak)
        await errs.refused("subscription", subj)

    # 2. Publishing to bob's draft or session subjects is refused; nothing reaches the stream.
    #    Forging the fleet's limits (a broadcast every edge believes) or a verifier's progress
    #    report (which would keep bob waiting) is refused too.
    for subj in (subjects.draft(bob_sid), subjects.session(bob_sid), subjects.progress(bob_sid),
                 subjects.progress(subjects.new_session_id("alice")),
                 subjects.verdict(bob_sid), subjects.verdict(subjects.new_session_id("alice")),
                 f"{subjects.PREFIX}.draft.3.{bob_sid}", subjects.fleet_limits(),
                 f"$KV.{subjects.FLEET}.verifier.fake"):
        await alice.publish(subj, opened([1, 2, 3]))
        await errs.refused("publish", subj)

    #    Her own sessions' progress reports are hers to hear.
    await alice.subscribe(subjects.progress("alice.*"), cb=leak)
    await alice.flush()

    # 3. No JetStream API: creating a consumer, reading stream info or a message, binding a pull
    #    subscription are all refused (the request then times out at the client).
    ajs = alice.jetstream(timeout=1.0)
    calls = [
        lambda: ajs.add_consumer(subjects.STREAM, ConsumerConfig(durable_name="spy",
                                                                 filter_subject="specedge.>")),
        lambda: ajs.add_consumer(subjects.STREAM, ConsumerConfig(filter_subject="specedge.>")),
        lambda: ajs.stream_info(subjects.STREAM),
        lambda: ajs.get_last_msg(subjects.STREAM, subjects.verdict(bob_sid)),
        lambda: ajs.streams_info(),
        lambda: ajs.consumer_info(subjects.STREAM, subjects.partition_durable(0)),
        lambda: ajs.pull_subscribe_bind(subjects.partition_durable(0), stream=subjects.STREAM),
        lambda: ajs.key_value(subjects.FLEET),  # the limits board: edges ask a verifier instead
    ]

    def api_refusals() -> int:
        return sum('publish to "$js.api.' in s for s in errs.seen)

    for call in calls:
        before = api_refusals()
        with pytest.raises((TimeoutError, nats.errors.TimeoutError)):
            sub = await call()
            await sub.fetch(1, timeout=1.0)  # only a bound pull subscription gets this far
        for _ in range(100):
            if api_refusals() > before:
                break
            await asyncio.sleep(0.02)
        assert api_refusals() > before, (call, errs.seen[-3:])

    # 4. Meanwhile both edges run real sessions through a verifier under its own user: each gets
    #    exactly the target's output; alice's injections above left no trace in bob's log.
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8]]
    refusals_before_run = len(errs.seen)
    async with running_worker(target, secure.url, max_batch=4, consumer=FAST_CONSUMER,
                              limits=Limits(max_prompt_tokens=512),
                              connect_opts=secure.opts("verifier")) as w:
        # alice reads the fleet's limits the way a restricted edge can: a query (answered on
        # her own inbox by the verifier, under allow_responses) and the broadcast subject
        view = FleetView(alice)
        got = await view.start(timeout_s=5.0)
        assert got is not None and got.verifiers == (w.cfg.name,)
        assert (got.max_prompt_tokens, got.max_positions) == (512, 1024)
        await view.close()
        bob_run = asyncio.create_task(generate(
            secure.url, draft, [prompts[1]], max_new_tokens=24, shape=TreeShape.chain(3),
            connect_opts=secure.opts("bob"), sids=[bob_sid]))
        # a publish acknowledged by JetStream answers on the reply subject, which the broker does
        # not check against permissions: alice aims acks at bob's verdict and session subjects
        # (she must know his random nonce, which she cannot read). Only a JSON ack arrives,
        # which never decodes as a message: bob's session is not disturbed.
        for _ in range(20):
            await alice.publish(subjects.draft(subjects.new_session_id("alice")), b"x",
                                reply=subjects.verdict(bob_sid))
            await alice.publish(subjects.session(subjects.new_session_id("alice")), b"x",
                                reply=subjects.session(bob_sid))
            await asyncio.sleep(0.01)
        alice_res = await generate(secure.url, draft, [prompts[0]], max_new_tokens=24,
                                   shape=TreeShape.chain(3), connect_opts=secure.opts("alice"),
                                   sids=[subjects.new_session_id("alice")])
        bob_res = await bob_run
    assert alice_res[0].token_ids == reference_greedy(target, prompts[0], 24)
    assert bob_res[0].token_ids == reference_greedy(target, prompts[1], 24)
    assert alice_res[0].session_id.startswith("alice.") and bob_res[0].session_id == bob_sid
    assert leaked == [], f"alice received {leaked}"
    assert not any("fleet" in s for s in errs.seen[refusals_before_run:]), errs.seen
    own = f'subscription to "{subjects.progress("alice.*")}"'
    assert not any(own in s for s in errs.seen), errs.seen
    # nothing alice published under bob's name was stored; the acks she aimed at bob's subjects
    # were (JSON, undecodable), and his log still rebuilds his exact sequence
    slog = await read_session(op_js, bob_sid)
    assert [unpack_ids(e.msg.prompt) for e in slog.entries
            if isinstance(e.msg, SessionOpened)] == [prompts[1]]
    assert all(isinstance(e.msg, DraftBlock) for e in slog.entries if e.kind == "draft")
    seq, rounds, finished = committed_sequence(slog)
    assert seq == prompts[1] + bob_res[0].token_ids and finished
    # every connection was TLS and signed in as its own user
    conns = secure.connz()
    assert conns and all(c.get("tls_version") for c in conns), conns
    await alice.close()
    await op.close()


async def test_unknown_key_and_plaintext_are_refused(secure, tmp_path):
    # a key the server does not know
    from specedge.auth import keygen

    seed, _ = keygen()
    stranger = tmp_path / "stranger.nk"
    stranger.write_text(seed)
    with pytest.raises(Exception) as exc:
        await nats.connect(secure.url, nkeys_seed=str(stranger), tls=secure.opts("alice")["tls"],
                           allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3)
    assert "authorization" in repr(exc.value).lower()
    # the right key, but without trusting the test CA: the TLS handshake fails
    with pytest.raises(Exception) as exc:
        await nats.connect(secure.url, nkeys_seed=secure.seed("alice"), allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=3)
    assert "certificate" in repr(exc.value).lower() or "ssl" in repr(exc.value).lower()


async def test_operator_adds_an_edge_with_one_command(secure):
    """`python -m specedge.auth add-edge carol --dir D` + a config reload: carol can publish to
    her own subjects (JetStream acks reach her inbox) and nowhere else."""
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "specedge.auth", "add-edge", "carol", "--dir",
                         str(secure.auth.path)], capture_output=True, text=True, cwd=ROOT,
        timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert "specedge.draft.carol.*" in out.stdout and "_INBOX_carol.>" in out.stdout
    assert (secure.auth.creds / "edge-carol.nk").stat().st_mode & 0o077 == 0  # secret stays private
    secure.srv.proc.send_signal(signal.SIGHUP)  # = nats-server --signal reload
    errs = Errors()
    for _ in range(50):
        try:
            carol = await nats.connect(secure.url, error_cb=errs.cb, allow_reconnect=False,
                                       max_reconnect_attempts=0, **secure.opts("carol"))
            break
        except Exception:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("carol could not sign in after the reload")
    sid = subjects.new_session_id("carol")
    ack = await carol.jetstream().publish(subjects.session(sid), opened([1, 2, 3]))
    assert ack.stream == subjects.STREAM and ack.seq > 0
    alice_sid = subjects.new_session_id("alice")
    await carol.publish(subjects.session(alice_sid), b"x")
    await errs.refused("publish", subjects.session(alice_sid))
    await carol.close()
