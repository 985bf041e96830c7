"""The wire contract: every message on a specedge subject is one of these Structs, msgpack-encoded.

Token ids travel as packed little-endian int32 bytes: compact and decodable without a
per-element loop. Nothing here is a pickle or a tensor, so a hostile body can only fail to
decode, never execute.
"""

from __future__ import annotations

import msgspec
import numpy as np

SCHEMA_VERSION = 1


def pack_ids(ids) -> bytes:
    """Token ids (any int sequence or array) -> packed little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


DIGEST_SIZE = 8


def digest_ids(ids) -> bytes:
    """8-byte digest of a token sequence: edge and verifier compare their committed sequences
    with it, so a verifier whose cached state diverged from the log notices and rebuilds."""
    import hashlib

    return hashlib.blake2b(pack_ids(ids), digest_size=DIGEST_SIZE).digest()


def unpack_ids(data: bytes) -> list[int]:
    """Packed int32 bytes -> list of ints. Raises ValueError on a ragged length."""
    if len(data) % 4:
        raise ValueError(f"packed id field has {len(data)} bytes, not a multiple of 4")
    return np.frombuffer(data, dtype="<i4").tolist()


class Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Sampling parameters: the same transform is used by plain decoding and verification.
    Fields at their defaults are left off the wire (a plain request reads as it always did).

    The logit transforms (penalties, bias) are applied to the target's row at every tree node
    with that node's own path counted in its history, and by the edge to its drafts; min_p is
    a warper like top-k and top-p. Order: logit bias, repetition penalty (transformers'
    generate() applies its sequence bias before its repetition penalty), presence and
    frequency penalties (after the repetition penalty, as vLLM), then temperature, top-k,
    top-p, min-p (specedge.execution.transforms, then .sampling)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    min_p: float = 0.0  # 0: off; keep tokens with p >= min_p * max p (after temperature)
    # OpenAI's semantics: generated tokens only (not the prompt), -2..2
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # transformers' semantics: every token of prompt and generation, > 0 (1: off)
    repetition_penalty: float = 1.0
    # (token id, bias) pairs sorted by id, bias in -100..100: added to the logits
    logit_bias: tuple[tuple[int, float], ...] = ()


class GrammarSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A constraint on the target's distribution (specedge.execution.grammar): every token
    the grammar does not allow next is masked out, on the verifier's rows and the edge's
    drafts. kind: json_object (text unused), json_schema (text: the schema, JSON), ebnf."""

    kind: str
    text: str = ""


class SessionOpened(msgspec.Struct, tag="open", frozen=True, forbid_unknown_fields=True,
                    omit_defaults=True):
    v: int
    prompt: bytes  # packed int32
    sampling: Sampling
    seed: int
    max_new_tokens: int
    eos_ids: bytes  # packed int32; generation stops after emitting any of them
    target: str  # model references, for the record and the vocabulary check
    draft: str
    vocab_size: int  # ids the draft may emit; the verifier refuses a mismatch
    t: float = 0.0  # edge wall clock at send (unix seconds)
    tokenizer: str = ""  # the draft's tokenizer fingerprint (specedge.vocab); "" unknown
    # -1: no log-probabilities; k >= 0: every verdict carries the target's log-probability of
    # each committed token and its k most likely alternatives (k <= 20), for this session only
    logprobs: int = -1
    # the prefix cache's scope: "" the edge's own (the verifier salts block hashes with the
    # session's authenticated edge name, so no other tenant can hit or probe them); a name the
    # verifier was configured to share (--shared-prefix NAME) scopes the first `shared_len`
    # prompt tokens to that name instead: a system prompt common to many tenants
    shared_prefix: str = ""
    shared_len: int = 0
    # structured output: the session's grammar (None: unconstrained)
    grammar: GrammarSpec | None = None


class SessionClosed(msgspec.Struct, tag="close", frozen=True, forbid_unknown_fields=True):
    v: int
    reason: str = "done"  # done | cancelled | error
    t: float = 0.0


class DraftTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    draft_s: float = 0.0  # edge time spent drafting this block after the previous verdict
    proactive: bool = False  # started while the previous round was in flight (a guess hit)
    proactive_s: float = 0.0  # drafting done on it before the previous verdict (hidden)
    guess: str = ""  # the previous round's proactive guess: hit | miss | off ("" if none)


class DraftBlock(msgspec.Struct, tag="draft", frozen=True, forbid_unknown_fields=True,
                 omit_defaults=True):
    """One round's draft tree. Node i (1-based) carries tokens[i-1] and hangs off
    parents[i-1] (0 = the root, otherwise an earlier node)."""

    v: int
    round: int
    committed_len: int  # len(C) this tree hangs off
    root: int  # C[-1]
    tokens: bytes  # packed int32, one per node
    parents: bytes  # packed int32, one per node
    digest: bytes = b""  # digest_ids(C)
    t: float = 0.0
    timings: DraftTimings = DraftTimings()
    # packed int32 nodes a suffix match proposed rather than the draft model (per-source
    # acceptance in the replay); the verifier judges every node alike
    suffix: bytes = b""


class VerifyTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    queued_s: float = 0.0  # broker arrival -> picked into a batch
    verify_s: float = 0.0  # the batch's target forward + acceptance walk
    batch_size: int = 1
    batch_tokens: int = 0  # tokens in the batched forward (prefill included)
    kv_hit: bool = True  # whether the worker already held this session's KV


class Verdict(msgspec.Struct, tag="verdict", frozen=True, forbid_unknown_fields=True,
              omit_defaults=True):
    """The outcome of one round. `tokens` are exactly what C grows by (accepted path tokens
    then the next token, cut at EOS or the token limit), so the log alone rebuilds C."""

    v: int
    round: int
    committed_len: int
    accepted: bytes  # packed int32 node indices along the accepted path
    tokens: bytes  # packed int32 tokens committed this round
    next_token: int
    bonus: bool  # next token drawn past the end of the tree (vs. a correction)
    finished: bool
    worker: str = ""
    budget: int = 0  # load hint: suggested tree budget (nodes); 0 = no opinion
    t: float = 0.0
    timings: VerifyTimings = VerifyTimings()
    # with SessionOpened.logprobs = k >= 0: per committed token, the target's log-softmax
    # (raw logits) of that token (packed float64 '<f8': a float64 target's values arrive
    # exact), and its k most likely ids (packed int32) and their log-probabilities (packed
    # float64), k per token in token order (specedge.execution.logprobs)
    logprobs: bytes = b""
    top_ids: bytes = b""
    top_logprobs: bytes = b""
    # prompt tokens whose KV the verifier took from its prefix cache, instead of computing
    # them, when it built this session's KV in this round (its first round, or a rebuild),
    # less those an earlier verdict reported: the sum over a session's verdicts counts each
    # reused prompt token once
    cached_tokens: int = 0
    # the target's number format on the worker that judged this round (specedge/precision.py;
    # "" unknown): what the replay's --check loads the target in to compare bits
    dtype: str = ""


class Rejected(msgspec.Struct, tag="rejected", frozen=True, forbid_unknown_fields=True):
    v: int
    round: int
    code: str  # machine-readable: bad_message | stale | invalid_tree | unknown_session | ...
    reason: str
    worker: str = ""
    t: float = 0.0


class Progress(msgspec.Struct, tag="progress", frozen=True, forbid_unknown_fields=True,
               omit_defaults=True):
    """A verifier holding a session's block tells its edge that it is working on it (a core
    message on specedge.progress.<edge>.<nonce>, never stored): the edge waits as long as
    these keep coming instead of taking a slow verifier for a dead one. Sent when a block is
    taken but gets no verdict in a forward, and every `every_s` while the block is held.

    stage: queued (waits for a forward here), prefilling (the session's KV holds `done` of
    the `total` committed tokens), verifying (in a forward now), waiting_room (the KV pool is
    full), compiling (its grammar)."""

    v: int
    round: int
    stage: str
    every_s: float  # the verifier reports a held block at least this often
    done: int = 0
    total: int = 0
    worker: str = ""
    t: float = 0.0


STAGES = ("queued", "prefilling", "verifying", "waiting_room", "compiling")

Message = SessionOpened | SessionClosed | DraftBlock | Verdict | Rejected | Progress

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class WireError(ValueError):
    """A body that is not a valid message of the current schema."""


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    """Decode and check the schema version; every failure is a WireError with the cause."""
    try:
        msg = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"undecodable message: {exc}") from None
    if msg.v != SCHEMA_VERSION:
        raise WireError(f"schema version {msg.v} is not supported (expected {SCHEMA_VERSION})")
    return msg
