"""The embedded broker and the stream set-up (what `python -m specedge.broker setup` does)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from schemas import SessionClosed, encode
from specedge import broker, subjects
from tests.procs import ROOT


async def test_setup_cli_creates_partitioned_stream_idempotently(tmp_path):
    srv = broker.EmbeddedNats(store_dir=tmp_path / "nats").start()
    try:
        for _ in range(2):  # idempotent
            out = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "specedge.broker", "setup", "--nats",
                                 srv.url], capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert out.returncode == 0, out.stderr
        nc = await broker.connect(srv.url, "t")
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM)
        # limits retention (the log must outlive acks) and file storage (it must outlive a restart)
        assert (info.config.retention, info.config.storage) == ("limits", "file")
        assert info.config.duplicate_window and info.config.max_age
        for p in range(subjects.PARTITIONS):
            await js.consumer_info(subjects.STREAM, subjects.partition_durable(p))
        # drafts are stored under their partition; duplicates are dropped by message id
        for _ in range(2):
            ack = await js.publish(subjects.draft("anon.abc"), encode(SessionClosed(v=1)),
                                   headers={"Nats-Msg-Id": "anon.abc:0:draft"})
        assert ack.duplicate
        msg = await js.get_last_msg(subjects.STREAM, f"{subjects.PREFIX}.draft.*.anon.abc")
        part = int(msg.subject.split(".")[2])
        assert 0 <= part < subjects.PARTITIONS and subjects.sid_of(msg.subject) == "anon.abc"
        await nc.close()
    finally:
        srv.cleanup()
