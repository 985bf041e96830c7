"""Subject names, message ids and the session-id rule: one place for the naming contract."""

from __future__ import annotations

import re
import secrets

PREFIX = "specedge"
STREAM = "SPECEDGE"
VERIFIER_DURABLE = "verifiers"

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


def all_of(sid: str) -> str:
    """Every subject of one session: its log, in stream order."""
    return f"{PREFIX}.*.{sid}"


def sid_of(subject: str) -> str:
    """The session id is taken from the subject, never from a body."""
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not valid_sid(parts[2]):
        raise ValueError(f"not a session subject: {subject!r}")
    return parts[2]


def msg_id(sid: str, round_no: int, kind: str) -> str:
    """Nats-Msg-Id: a retry or a redelivered verdict is deduplicated by the broker."""
    return f"{sid}:{round_no}:{kind}"
