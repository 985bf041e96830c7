"""A suffix corpus: text a model-free edge's drafts may match besides the session's own tokens
and its tenant's history. The built-in one holds the default target's own answers to public
code-editing requests (specedge/edge/data/code_answers.json, made by bench/corpusbuild.py):
the phrases an instruct model wraps its code in ("Here is the function with type hints:",
"```python", "This function now ...") repeat from answer to answer, and a session's own prompt
never holds them. A draft model writes them itself: merged drafts do not use a corpus. Public
text, read-only and shared by every tenant: no tenant's requests ever enter it (those stay in
their own SuffixStore history). Another target phrases its answers otherwise: build its own
with bench/corpusbuild.py.

A file is JSON, {"texts": [str, ...]} (other keys are notes), or plain text (one document).
It is tokenized with the edge's tokenizer when the edge starts, once per process."""

from __future__ import annotations

import argparse
import json
import threading
from importlib import resources
from pathlib import Path

import structlog

from specedge.edge.suffix import SuffixIndex

log = structlog.get_logger()

BUILTIN = "builtin"
OFF = "off"
MAX_TOKENS = 1 << 18  # a phrase book, not a dataset (each token costs 8 index entries)

# (ref, id(tokenizer)) -> (the tokenizer, held so that its id is not reused; the index)
_cache: dict[tuple[str, int], tuple[object, SuffixIndex]] = {}
_lock = threading.Lock()


class CorpusError(ValueError):
    """A corpus file that cannot be used (missing, not JSON texts, too large)."""


def texts(ref: str) -> list[str]:
    """The documents of a corpus reference: `builtin`, or a file's path."""
    if ref == BUILTIN:
        raw = resources.files("specedge.edge").joinpath("data/code_answers.json").read_text(
            encoding="utf-8")
        return _parse(raw, "the built-in corpus", json_file=True)
    path = Path(ref).expanduser()
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"suffix corpus {ref}: cannot read it ({exc})") from None
    return _parse(raw, f"suffix corpus {ref}", json_file=path.suffix == ".json")


def _parse(raw: str, what: str, json_file: bool) -> list[str]:
    if not json_file:
        return [raw] if raw.strip() else []
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{what}: not JSON ({exc})") from None
    found = doc.get("texts") if isinstance(doc, dict) else None
    if not isinstance(found, list) or not all(isinstance(t, str) for t in found):
        raise CorpusError(f'{what}: expected {{"texts": [string, ...]}}')
    return [t for t in found if t.strip()]


def load(ref: str | None, tokenizer) -> SuffixIndex | None:
    """The corpus as a read-only SuffixIndex in `tokenizer`'s ids (built once per reference and
    tokenizer object); None for `off`. Sessions only read it, from any thread."""
    if not ref or ref == OFF:
        return None
    key = (ref, id(tokenizer))
    with _lock:
        if key in _cache:
            return _cache[key][1]
        docs = texts(ref)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []
        n = sum(map(len, ids))
        if n > MAX_TOKENS:
            raise CorpusError(f"suffix corpus {ref}: {n} tokens, more than {MAX_TOKENS}")
        index = SuffixIndex()
        for d in ids:
            index.add(d)
        log.info("suffix corpus loaded", corpus=ref, documents=len(ids), tokens=n)
        _cache[key] = (tokenizer, index)
        return index


def corpus_ref(value: str) -> str:
    """--suffix-corpus: builtin, off, or a file that reads as a corpus (checked here, so that a
    bad one is a usage error before any model loads)."""
    v = value.strip()
    if v.lower() in (BUILTIN, OFF):
        return v.lower()
    try:
        texts(v)
    except CorpusError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return v
