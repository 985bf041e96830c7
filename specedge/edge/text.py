"""Prompt building and incremental detokenization for streaming."""

from __future__ import annotations


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]


def eos_ids(tokenizer, model_config=None, generation_config=None) -> tuple[int, ...]:
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None),
                getattr(model_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    # an id the model cannot emit can never stop it; the verifiers refuse ids outside the vocab
    vocab = getattr(model_config, "vocab_size", None)
    return tuple(sorted(i for i in ids if vocab is None or 0 <= i < vocab))


class Detokenizer:
    """Emit text as tokens arrive, holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        out = text[self.sent:]
        self.sent = len(text)
        return out

    def flush(self) -> str:
        """At the end: whatever was held back (an incomplete sequence stays a U+FFFD)."""
        text = self.text()
        out = text[self.sent:]
        self.sent = len(text)
        return out

    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)
