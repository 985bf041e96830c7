"""Whether a draft and a target speak the same tokens: a fingerprint of the tokenizer.

Two models may pair only when their tokenizers agree on every token's id and on the special
tokens; embedding sizes say nothing (families pad their embeddings differently: Qwen2.5-0.5B
has 151,936 rows, Qwen2.5-7B 152,064, one tokenizer of 151,665 ids). The fingerprint is
published in the fleet's limits and sent in every session's open message, so a mismatch is
refused before any work, naming both models.
"""

from __future__ import annotations

import hashlib
import json
import weakref

# tokenizer -> (its length and special tokens, fingerprint, id count): get_vocab builds a dict
# of every token on each call (half a second for a 150k vocabulary)
_known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def identity(tok) -> tuple[str, int]:
    """(fingerprint, token_count) of a tokenizer, computed once per tokenizer object (again
    if tokens are added to it or its special tokens change)."""
    stamp = _stamp(tok)
    try:
        known = _known.get(tok)
    except TypeError:  # not weakly referable
        known = None
    if known is None or known[0] != stamp:
        known = (stamp, *_identity(tok))
        try:
            _known[tok] = known
        except TypeError:
            pass
    return known[1], known[2]


def remember(tok, fp: str, count: int) -> None:
    """`tok`'s identity, known from its files (specedge.models.tokenizer_identity)."""
    try:
        _known[tok] = (_stamp(tok), fp, count)
    except TypeError:  # not weakly referable: computed when asked
        pass


def _stamp(tok) -> tuple:
    return len(tok), tuple(map(str, getattr(tok, "all_special_tokens", []) or []))


def fingerprint(tok) -> str:
    """`<ids>:<sha256 prefix>` of the vocabulary (token -> id, added tokens included) and the
    special tokens; equal for equal tokenizers whatever their files look like."""
    return identity(tok)[0]


def token_count(tok) -> int:
    """Ids the tokenizer has (one past the largest): what either side may ever emit."""
    return identity(tok)[1]


def _identity(tok) -> tuple[str, int]:
    vocab = tok.get_vocab()
    special = sorted({str(t): vocab.get(str(t), -1)
                      for t in getattr(tok, "all_special_tokens", []) or []}.items())
    body = json.dumps([sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), special],
                      ensure_ascii=False, separators=(",", ":"))
    count = max(len(tok), max(vocab.values(), default=-1) + 1)
    return f"{len(vocab)}:{hashlib.sha256(body.encode()).hexdigest()[:20]}", count
