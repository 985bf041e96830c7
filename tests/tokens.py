"""A tokenizer for the tiny models: one character per id, with a chat template."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def char_tokenizer(rotate: int = 0) -> PreTrainedTokenizerFast:
    """256 ids, one character each (printable ASCII, newline, then Latin Extended), so any
    id sequence the tiny models produce decodes to a distinct string, plus a chat template.
    rotate: another tokenizer of the same size (the characters' ids shifted)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"] + [chr(0x100 + i) for i in range(160)]
    chars = chars[rotate:] + chars[:rotate]
    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=" "))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t)
    tok.chat_template = CHAT_TEMPLATE
    return tok
