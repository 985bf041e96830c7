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


def fingerprint(tok) -> str:
    """`<ids>:<sha256 prefix>` of the vocabulary (token -> id, added tokens included) and the
    special tokens; equal for equal tokenizers whatever their files look like."""
    vocab = tok.get_vocab()
    special = sorted({str(t): vocab.get(str(t), -1)
                      for t in getattr(tok, "all_special_tokens", []) or []}.items())
    body = json.dumps([sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), special],
                      ensure_ascii=False, separators=(",", ":"))
    return f"{len(vocab)}:{hashlib.sha256(body.encode()).hexdigest()[:20]}"


def token_count(tok) -> int:
    """Ids the tokenizer has (one past the largest): what either side may ever emit."""
    vocab = tok.get_vocab()
    return max(len(tok), max(vocab.values(), default=-1) + 1)
