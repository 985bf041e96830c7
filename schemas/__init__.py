"""Wire types shared by edges, verifiers and replay."""

from schemas.wire import (
    SCHEMA_VERSION,
    DraftBlock,
    DraftTimings,
    Message,
    Rejected,
    Sampling,
    SessionClosed,
    SessionOpened,
    Verdict,
    VerifyTimings,
    WireError,
    decode,
    digest_ids,
    encode,
    pack_ids,
    unpack_ids,
)

__all__ = [
    "SCHEMA_VERSION",
    "DraftBlock",
    "DraftTimings",
    "Message",
    "Rejected",
    "Sampling",
    "SessionClosed",
    "SessionOpened",
    "Verdict",
    "VerifyTimings",
    "WireError",
    "decode",
    "digest_ids",
    "encode",
    "pack_ids",
    "unpack_ids",
]
