"""Subject names, message ids and the session-id rule: one place for the naming contract."""

from __future__ import annotations

import re
import secrets

PREFIX = "specedge"
STREAM = "SPECEDGE"
LEASES = "specedge_leases"  # KV bucket: verifier membership and partition leases
# Sessions hash into a fixed number of partitions by the stream's subject transform
# (specedge.draft.<sid> is stored as specedge.draft.<p>.<sid>); a worker serves a set of them.
PARTITIONS = 16

_SID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(12)


def valid_sid(sid: str) -> bool:
    return bool(_SID.match(sid))


def session(sid: str) -> str:
    return f"{PREFIX}.session.{sid}"


def draft(sid: str) -> str:
    return f"{PREFIX}.draft.{sid}"


def verdict(sid: str) -> str:
    return f"{PREFIX}.verdict.{sid}"


def log_filters(sid: str) -> list[str]:
    """Every stored subject of one session: its log, in stream order."""
    return [session(sid), f"{PREFIX}.draft.*.{sid}", verdict(sid)]


def draft_transform(partitions: int = PARTITIONS) -> tuple[str, str]:
    """(source, destination) of the stream's subject transform that partitions drafts."""
    return f"{PREFIX}.draft.*", f"{PREFIX}.draft.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"


def partition_filter(p: int) -> str:
    return f"{PREFIX}.draft.{p}.*"


def partition_durable(p: int) -> str:
    return f"verifiers-p{p}"


def sid_of(subject: str) -> str:
    """The session id is taken from the subject, never from a body."""
    parts = subject.split(".")
    ok = (len(parts) == 3 and parts[1] in ("session", "draft", "verdict")) or (
        len(parts) == 4 and parts[1] == "draft" and parts[2].isdigit())
    if not ok or parts[0] != PREFIX or not valid_sid(parts[-1]):
        raise ValueError(f"not a session subject: {subject!r}")
    return parts[-1]


def msg_id(sid: str, round_no: int, kind: str) -> str:
    """Nats-Msg-Id: a retry or a redelivered verdict is deduplicated by the broker."""
    return f"{sid}:{round_no}:{kind}"
