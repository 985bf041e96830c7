"""Checks on every draft block before it may touch the model. A failure is a BlockError with a
machine-readable code; the worker answers it with a Rejected and terminates the message."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import DraftBlock, Sampling, SessionOpened, unpack_ids
from specedge.config import Limits
from specedge.execution import grammar
from specedge.execution.logprobs import MAX_TOP
from specedge.execution.transforms import (
    MAX_BIAS,
    MAX_BIAS_ENTRIES,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
)
from specedge.execution.tree import TreeError, validate_parents
from workers.verifier.state import SessionState


class BlockError(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class CheckedBlock:
    round: int
    tokens: list[int]
    parents: list[int]
    depths: list[int]


def check_size(data: bytes, limits: Limits) -> None:
    """Refuse an oversized body before spending a decode on it."""
    if len(data) > limits.max_message_bytes:
        raise BlockError("too_large", f"message of {len(data)} bytes; the limit is "
                         f"{limits.max_message_bytes}")


def _ids(data: bytes, what: str) -> list[int]:
    try:
        return unpack_ids(data)
    except ValueError as exc:
        raise BlockError("invalid_session", f"{what}: {exc}") from None




def _check_transforms(s: Sampling, vocab_size: int) -> None:
    """min_p, the penalties and logit_bias (written so that NaN fails every comparison)."""
    if not (0.0 <= s.min_p <= 1.0 and -MAX_PENALTY <= s.presence_penalty <= MAX_PENALTY
            and -MAX_PENALTY <= s.frequency_penalty <= MAX_PENALTY
            and 0.0 < s.repetition_penalty <= MAX_REPETITION_PENALTY):
        raise BlockError("invalid_session", f"bad sampling parameters {s}: min_p in [0, 1], "
                         f"presence and frequency penalties in [-{MAX_PENALTY:g}, "
                         f"{MAX_PENALTY:g}], repetition_penalty in "
                         f"(0, {MAX_REPETITION_PENALTY:g}]")
    bias = s.logit_bias
    if len(bias) > MAX_BIAS_ENTRIES:
        raise BlockError("invalid_session", f"logit_bias has {len(bias)} entries; at most "
                         f"{MAX_BIAS_ENTRIES}")
    ids = [i for i, _ in bias]
    if any(not 0 <= i < vocab_size for i in ids) or ids != sorted(set(ids)):
        raise BlockError("invalid_session", "logit_bias: distinct token ids inside the "
                         "vocabulary, in increasing order")
    if not all(-MAX_BIAS <= b <= MAX_BIAS for _, b in bias):
        raise BlockError("invalid_session", f"logit_bias: values in [-{MAX_BIAS:g}, "
                         f"{MAX_BIAS:g}]")


def check_opened(o: SessionOpened, limits: Limits, vocab_size: int, tokenizer: str = "",
                 model: str = "") -> None:
    """Every field of a session opening, before any state is built from it (`tokenizer`: the
    target's fingerprint, "" when unknown; `model`: its name, for the refusal)."""
    prompt = _ids(o.prompt, "prompt")
    if not 1 <= len(prompt) <= limits.max_prompt_tokens:
        raise BlockError("invalid_session", f"prompt has {len(prompt)} tokens; "
                         f"allowed 1..{limits.max_prompt_tokens}")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise BlockError("invalid_session", "prompt token id outside the vocabulary")
    eos = _ids(o.eos_ids, "eos_ids")
    if len(eos) > limits.max_eos_ids or any(not 0 <= t < vocab_size for t in eos):
        raise BlockError("invalid_session", f"eos_ids: at most {limits.max_eos_ids} ids inside "
                         "the vocabulary")
    if limits.max_positions and len(prompt) > limits.max_positions:
        # the prompt alone must fit; generation is bounded per block (check_block), so a
        # session asking for more tokens than fit runs until its tree would leave the context
        raise BlockError("context_length_exceeded", f"prompt has {len(prompt)} tokens; the "
                         f"model has {limits.max_positions} positions")
    if not 1 <= o.max_new_tokens <= limits.max_new_tokens:
        raise BlockError("invalid_session", f"max_new_tokens {o.max_new_tokens} outside "
                         f"1..{limits.max_new_tokens}")
    s = o.sampling
    t_ok = s.temperature == 0.0 or limits.min_temperature <= s.temperature <= limits.max_temperature
    # written so that NaN fails every comparison
    if not (t_ok and 0.0 < s.top_p <= 1.0 and s.top_k >= 0):
        raise BlockError("invalid_session", f"bad sampling parameters {s}: temperature 0 or "
                         f"{limits.min_temperature}..{limits.max_temperature}, top_p in (0, 1], "
                         "top_k >= 0")
    _check_transforms(s, vocab_size)
    if not -1 <= o.logprobs <= MAX_TOP:  # each verdict carries k alternatives per token
        raise BlockError("invalid_session", f"logprobs: -1 (none) or 0..{MAX_TOP} "
                         "alternatives")
    if max(len(o.target), len(o.draft)) > limits.max_model_name_chars:
        raise BlockError("invalid_session", f"model names longer than "
                         f"{limits.max_model_name_chars} characters")
    if o.tokenizer and tokenizer and o.tokenizer != tokenizer:
        raise BlockError("tokenizer_mismatch", f"the draft {o.draft} has another tokenizer "
                         f"({o.tokenizer}) than the target {model or o.target} ({tokenizer}); "
                         "draft and target must share one")
    if o.vocab_size != vocab_size:
        raise BlockError("vocab_mismatch", f"draft vocabulary {o.vocab_size} != target "
                         f"vocabulary {vocab_size}")
    if o.grammar is not None:  # parsed here (cheap); compiled by the engine, cached
        if not eos:
            raise BlockError("invalid_session", "a grammar needs eos_ids to finish on")
        try:
            grammar.check(o.grammar)
        except grammar.GrammarError as exc:
            raise BlockError("invalid_grammar", str(exc)) from None


def check_block(b: DraftBlock, st: SessionState, limits: Limits, vocab_size: int) -> CheckedBlock:
    if st.finished:
        raise BlockError("finished", f"session already finished at round {st.round}")
    if b.round != st.round or b.committed_len != len(st.committed):
        raise BlockError("stale", f"block for round {b.round} at length {b.committed_len}; "
                         f"session is at round {st.round}, length {len(st.committed)}")
    if b.digest and b.digest != st.digest():
        raise BlockError("diverged", "the block's committed sequence differs from the log's")
    if b.root != st.committed[-1]:
        raise BlockError("invalid_tree", f"root {b.root} is not the last committed token")
    try:
        tokens, parents = unpack_ids(b.tokens), unpack_ids(b.parents)
    except ValueError as exc:
        raise BlockError("invalid_tree", str(exc)) from None
    if len(tokens) != len(parents):
        raise BlockError("invalid_tree", f"{len(tokens)} tokens but {len(parents)} parents")
    if len(tokens) > limits.max_nodes:
        raise BlockError("too_large", f"{len(tokens)} nodes; the limit is {limits.max_nodes}")
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
        raise BlockError("invalid_tree", f"token id outside the vocabulary [0, {vocab_size})")
    try:
        depths = validate_parents(parents, limits.max_depth)
    except TreeError as exc:
        raise BlockError("invalid_tree", str(exc)) from None
    # the root sits at position committed_len - 1, a node d below it at committed_len - 1 + d
    last = b.committed_len - 1 + max(depths, default=0)
    if limits.max_positions and last >= limits.max_positions:
        raise BlockError("context_length_exceeded", f"the tree reaches position {last}; the "
                         f"model has {limits.max_positions} positions")
    return CheckedBlock(b.round, tokens, parents, depths)
