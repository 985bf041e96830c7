"""Subject names, message ids and the session-id rule: one place for the naming contract.

A session id is two subject tokens, `<edge>.<nonce>`: the edge's name (its NATS identity, so
the broker's per-user permissions can pin an edge to `specedge.*.<edge>.*`, since permissions
only wildcard whole tokens) and a random nonce that nobody else can guess."""

from __future__ import annotations

import re
import secrets

PREFIX = "specedge"
STREAM = "SPECEDGE"
LEASES = "specedge_leases"  # KV bucket: verifier membership and partition leases
FLEET = "specedge_fleet"  # KV bucket: every live verifier's effective limits (the board)
# Sessions hash into a fixed number of partitions by the stream's subject transform
# (specedge.draft.<edge>.<nonce> is stored as specedge.draft.<p>.<edge>.<nonce>); a worker
# serves a set of them.
PARTITIONS = 16
ANON = "anon"  # the edge name when the broker is not authenticated

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EDGE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
KINDS = ("session", "draft", "verdict")


def valid_edge(name: str) -> bool:
    return bool(_EDGE.match(name))


def new_session_id(edge: str = ANON, partition: int | None = None,
                   partitions: int = PARTITIONS) -> str:
    """A fresh session id; with `partition`, one whose drafts the stream files under that
    partition (the verifier serving it holds the KV a related session left: an earlier
    turn of the conversation, or a sibling choice). The nonce stays random: about
    `partitions` draws find one."""
    if not valid_edge(edge):
        raise ValueError(f"bad edge name {edge!r}: 1-32 of A-Z a-z 0-9 _ -")
    if partition is not None and not 0 <= partition < partitions:
        raise ValueError(f"partition {partition} outside 0..{partitions - 1}")
    while True:
        sid = f"{edge}.{secrets.token_urlsafe(12)}"
        if partition is None or partition_of(sid, partitions) == partition:
            return sid


def partition_of(sid: str, partitions: int = PARTITIONS) -> int:
    """The partition the stream's subject transform (`draft_transform`) files a session's
    drafts under: nats-server's partition() is FNV-1a (32 bit) of the selected tokens
    concatenated, modulo the partition count."""
    h = 0x811C9DC5
    for byte in sid.replace(".", "", 1).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def valid_sid(sid: str) -> bool:
    edge, dot, nonce = sid.partition(".")
    return bool(dot) and valid_edge(edge) and bool(_TOKEN.match(nonce))


def edge_of(sid: str) -> str:
    return sid.partition(".")[0]


def session(sid: str) -> str:
    return f"{PREFIX}.session.{sid}"


def draft(sid: str) -> str:
    return f"{PREFIX}.draft.{sid}"


def verdict(sid: str) -> str:
    return f"{PREFIX}.verdict.{sid}"


def progress(sid: str) -> str:
    """A core subject (outside the stream: ephemeral) on which the verifier holding a
    session's block tells its edge it is working on it (schemas.Progress)."""
    return f"{PREFIX}.progress.{sid}"


def stream_subjects() -> list[str]:
    """What the stream stores: exactly the three session subjects, so nothing else (e.g. a
    publish straight to a partition's stored subject) can enter a verifier's work queue."""
    return [f"{PREFIX}.{kind}.*.*" for kind in KINDS]


def all_sessions() -> str:
    """Every session's open/close subject (verifiers count open sessions per edge on it)."""
    return f"{PREFIX}.session.*.*"


def log_filters(sid: str) -> list[str]:
    """Every stored subject of one session: its log, in stream order."""
    return [session(sid), f"{PREFIX}.draft.*.{sid}", verdict(sid)]


def draft_transform(partitions: int = PARTITIONS) -> tuple[str, str]:
    """(source, destination) of the stream's subject transform that partitions drafts by a
    hash of both session-id tokens."""
    return (f"{PREFIX}.draft.*.*",
            f"{PREFIX}.draft.{{{{partition({partitions},1,2)}}}}.{{{{wildcard(1)}}}}"
            f".{{{{wildcard(2)}}}}")


def partition_filter(p: int) -> str:
    return f"{PREFIX}.draft.{p}.*.*"


def partition_durable(p: int) -> str:
    return f"verifiers-p{p}"


def sid_of(subject: str) -> str:
    """The session id is taken from the subject, never from a body."""
    parts = subject.split(".")
    ok = (len(parts) == 4 and parts[1] in KINDS) or (
        len(parts) == 5 and parts[1] == "draft" and parts[2].isdigit())
    sid = ".".join(parts[-2:])
    if not ok or parts[0] != PREFIX or not valid_sid(sid):
        raise ValueError(f"not a session subject: {subject!r}")
    return sid


def fleet_query() -> str:
    """Request subject: any verifier answers with the fleet's limits (edges cannot read KV)."""
    return f"{PREFIX}.fleet.query"


def fleet_limits() -> str:
    """Broadcast subject: verifiers publish the fleet's limits here whenever they change."""
    return f"{PREFIX}.fleet.limits"


def msg_id(sid: str, round_no: int, kind: str) -> str:
    """Nats-Msg-Id: a retry or a redelivered verdict is deduplicated by the broker."""
    return f"{sid}:{round_no}:{kind}"


def edge_permissions(edge: str, inbox_prefix: str | None = None) -> dict[str, list[str]]:
    """What an edge may do on the broker: publish its own sessions' opens/closes and drafts,
    receive its own verdicts, its own sessions' progress and the replies on its own inbox
    (JetStream publish acks); ask for the fleet's limits and hear their updates. Nothing else;
    in particular no `$JS.API` (no streams, consumers, KV or log reads)."""
    if not valid_edge(edge):
        raise ValueError(f"bad edge name {edge!r}")
    return {"publish": [session(f"{edge}.*"), draft(f"{edge}.*"), fleet_query()],
            "subscribe": [verdict(f"{edge}.*"), progress(f"{edge}.*"),
                          f"{inbox_prefix or edge_inbox(edge)}.>", fleet_limits()]}


def edge_inbox(edge: str) -> str:
    """An edge's inbox prefix: its replies are readable by it alone."""
    return f"_INBOX_{edge}"
