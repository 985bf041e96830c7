"""Structured output: a grammar (JSON object, JSON schema, EBNF) as a mask on the target's
distribution, exact under speculation.

xgrammar does the parsing and the masks. A grammar is compiled once per distinct spec and
stop-token set (cached), in a worker thread with a time limit. A session's `Constraint` holds
one matcher at its committed state; a draft tree's per-node masks come from one walk of the
tree with accept/rollback from that state (xgrammar's traverse_draft_tree), never a re-parse
from the start. The verifier masks each node's row with them; the edge masks its drafts the
same way and drafts tokens the grammar forces without a draft forward.

A node whose token the grammar refuses gets an all-allowed row: the walk can never reach it
(its parent's masked pick cannot be that token), and an all-masked row would make sampling
divide by zero.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import structlog
import torch

from schemas.wire import GrammarSpec

log = structlog.get_logger(__name__)


class _Lazy:
    """xgrammar, imported at the first grammar: a verifier or edge that never sees one (a GPU
    check machine without the wheel) does not need it."""

    def __getattr__(self, name: str):
        return getattr(importlib.import_module("xgrammar"), name)


xgr = _Lazy()

KINDS = ("json_object", "json_schema", "ebnf")
MAX_SPEC_CHARS = 64 * 1024  # a schema or grammar text longer than this is refused
COMPILE_TIMEOUT_S = 10.0  # a grammar that takes longer to compile is refused
CACHE_ENTRIES = 256  # compiled grammars kept per Grammars (least recently used dropped)


class GrammarError(ValueError):
    """A grammar spec that cannot be used: invalid, unsupported, too large or too slow."""


def _schema(text: str) -> dict:
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise GrammarError(f"the JSON schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise GrammarError("the JSON schema must be an object")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise GrammarError(f"invalid JSON schema: {exc.message}") from None
    return schema


def grammar_of(spec: GrammarSpec) -> xgr.Grammar:
    """The tokenizer-independent grammar of `spec` (a parse: cheap, no token masks yet).
    Raises GrammarError for a bad kind, an oversized text, an invalid or unsupported schema."""
    if spec.kind not in KINDS:
        raise GrammarError(f"grammar kind {spec.kind!r}: one of {', '.join(KINDS)}")
    if len(spec.text) > MAX_SPEC_CHARS:
        raise GrammarError(f"the grammar has {len(spec.text)} characters; at most "
                           f"{MAX_SPEC_CHARS}")
    try:
        if spec.kind == "json_object":  # OpenAI's JSON mode: an object, any members
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                                strict_mode=False)
        if spec.kind == "json_schema":
            # compact separators, no free whitespace: a model cannot loop on blank space
            return xgr.Grammar.from_json_schema(json.dumps(_schema(spec.text)),
                                                any_whitespace=False, strict_mode=True)
        return xgr.Grammar.from_ebnf(spec.text)
    except GrammarError:
        raise
    except Exception as exc:  # xgrammar's own refusal (unsupported keyword, EBNF syntax)
        raise GrammarError(f"unsupported grammar: {str(exc).strip()[:300]}") from None


def check(spec: GrammarSpec) -> None:
    """Refuse a bad spec before any work (both sides run this on a session's opening)."""
    grammar_of(spec)


def spec_key(spec: GrammarSpec) -> str:
    return hashlib.sha256(f"{spec.kind}\0{spec.text}".encode()).hexdigest()


class Grammars:
    """Compiled grammars for one tokenizer (a transformers tokenizer, or a list of each id's
    string), cached by (spec hash, stop tokens). Compiling runs
    on a private thread, so a caller can give up after `timeout_s` while the compile finishes
    (and lands in the cache) in the background; xgrammar cannot stop a compile midway."""

    def __init__(self, tokenizer, vocab_size: int, *, timeout_s: float = COMPILE_TIMEOUT_S,
                 threads: int = 2):
        self.tok, self.vocab_size, self.timeout_s = tokenizer, vocab_size, timeout_s
        self._compilers: dict[tuple[int, ...], xgr.GrammarCompiler] = {}
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], concurrent.futures.Future] = (
            OrderedDict())
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "grammar")

    @classmethod
    def for_model(cls, model, vocab_size: int) -> Grammars | None:
        """From the tokenizer saved with a model loaded from disk; None when it has none."""
        from specedge.models import load_tokenizer

        ref = getattr(model.config, "name_or_path", "") or ""
        if not ref:
            return None
        try:
            return cls(load_tokenizer(ref), vocab_size)
        except Exception as exc:
            log.warning("no tokenizer for grammars", model=ref, error=repr(exc))
            return None

    def _compiler(self, stop: tuple[int, ...]) -> xgr.GrammarCompiler:
        c = self._compilers.get(stop)
        if c is None:
            if isinstance(self.tok, list | tuple):  # a plain vocabulary: one string per id
                info = xgr.TokenizerInfo(list(self.tok), vocab_size=self.vocab_size,
                                         stop_token_ids=list(stop))
            else:
                info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(stop))
            c = self._compilers[stop] = xgr.GrammarCompiler(info, max_threads=1)
        return c

    def _compile(self, spec: GrammarSpec, stop: tuple[int, ...]) -> xgr.CompiledGrammar:
        return self._compiler(stop).compile_grammar(grammar_of(spec))

    def prepare(self, spec: GrammarSpec, stop: Sequence[int]) -> concurrent.futures.Future:
        """The compiled grammar, as a future (started now, or the cached one)."""
        if not stop:
            raise GrammarError("a grammar needs an end-of-sequence token to finish on")
        key = (spec_key(spec), tuple(sorted(set(stop))))
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                return fut
            fut = self._cache[key] = self._pool.submit(self._compile, spec, key[1])
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return fut

    def compile(self, spec: GrammarSpec, stop: Sequence[int],
                timeout_s: float | None = None) -> xgr.CompiledGrammar:
        """Block (a worker thread's caller, never the event loop) until compiled."""
        fut = self.prepare(spec, stop)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return fut.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            raise GrammarError(f"the grammar did not compile within {limit:g} s") from None
        except GrammarError:
            raise
        except Exception as exc:
            raise GrammarError(f"the grammar does not compile: {str(exc)[:300]}") from None

    def constraint(self, spec: GrammarSpec, stop: Sequence[int],
                   timeout_s: float | None = None) -> Constraint:
        return Constraint(self.compile(spec, stop, timeout_s), self.vocab_size)


class Constraint:
    """One session's grammar state: a matcher that has consumed `done` (generated tokens).
    `sync` moves it to any other generated sequence by rolling back to the common prefix and
    accepting the rest, so trees drafted ahead on a guess and a verifier rebuilt from the log
    share one code path."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int):
        self.m = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self.stop = frozenset(compiled.tokenizer_info.stop_token_ids)
        self.done: list[int] = []

    def sync(self, generated: Sequence[int]) -> bool:
        """Move to the state after `generated`; False (the matcher left at the longest prefix
        it accepts) when the grammar refuses it: a guess past the end, or a broken verdict."""
        d, n = self.done, 0
        if len(d) <= len(generated) and d == list(generated[: len(d)]):
            n = len(d)  # the usual case: only new tokens
        else:
            while n < min(len(d), len(generated)) and d[n] == generated[n]:
                n += 1
            self.m.rollback(len(d) - n)
            del d[n:]
        for t in generated[n:]:
            if self.m.is_terminated() or not self.m.accept_token(int(t)):
                return False
            d.append(int(t))
        return True

    def sync_or_raise(self, generated: Sequence[int]) -> None:
        if not self.sync(generated):
            raise GrammarError(f"a committed token breaks the grammar after {len(self.done)} "
                               "tokens")

    def tree_bitmask(self, tokens: Sequence[int], parents: Sequence[int]) -> torch.Tensor:
        """int32 bitmask [len(tokens) + 1, words]: row 0 the root's next token, row i the
        token after node i (1-based), each from the state its path reaches."""
        n = len(tokens)
        first, sib = [-1] * (n + 1), [-1] * (n + 1)
        for i in range(n, 0, -1):  # siblings linked in node order
            p = parents[i - 1]
            sib[i], first[p] = first[p], i
        bm = xgr.allocate_token_bitmask(n + 1, self.vocab_size)  # all allowed
        if self.m.is_terminated():
            return bm
        self.m.traverse_draft_tree(torch.tensor(first), torch.tensor(sib),
                                   torch.tensor([0, *tokens]), bm)
        bm[(bm == 0).all(-1)] = -1  # unreachable nodes: see the module's note
        return bm

    def node_bitmask(self, tokens: Sequence[int], parents: Sequence[int],
                     nodes: Sequence[int]) -> torch.Tensor:
        """Rows of `nodes` only (what the edge needs each draft step): per node, its path
        accepted, the mask filled, the path rolled back."""
        bm = xgr.allocate_token_bitmask(len(nodes), self.vocab_size)
        for r, node in enumerate(nodes):
            path, n = [], node
            while n:
                path.append(tokens[n - 1])
                n = parents[n - 1]
            ok = 0
            for t in reversed(path):
                if self.m.is_terminated() or not self.m.accept_token(int(t)):
                    break
                ok += 1
            if ok == len(path) and not self.m.is_terminated():
                self.m.fill_next_token_bitmask(bm, r)
            if ok:
                self.m.rollback(ok)
        return bm

    def forced(self, path: Sequence[int], limit: int) -> list[int]:
        """Up to `limit` tokens the grammar forces after `path` (from the synced state): a
        token that is the only one allowed (the target picks it whatever its logits; a forced
        stop token is the span's last), or, where the forced text admits several
        tokenizations, xgrammar's own tokenization of it (likely, not certain: verified like
        any draft). The matcher is left as it was."""
        out: list[int] = []
        accepted = 0
        bm = xgr.allocate_token_bitmask(1, self.vocab_size)
        try:
            for t in path:
                if self.m.is_terminated() or not self.m.accept_token(int(t)):
                    return out
                accepted += 1
            while len(out) < limit and not self.m.is_terminated():
                self.m.fill_next_token_bitmask(bm)
                only = single(bm[0], self.vocab_size)
                if only is not None and only in self.stop:  # the end: drafted, nothing after
                    out.append(only)
                    break
                if only is not None and self.m.accept_token(only):
                    accepted += 1
                    out.append(only)
                    continue
                # the forced text may have several tokenizations (a BPE vocabulary): xgrammar's
                # longest-match one is a guess the target verifies, not a certainty
                jump = self.m.find_jump_forward_tokens()[: limit - len(out)]
                took = 0
                for t in jump:
                    if not self.m.accept_token(t):
                        break
                    took += 1
                    out.append(t)
                accepted += took
                if not took:
                    break
            return out
        finally:
            if accepted:
                self.m.rollback(accepted)


_BITS = torch.arange(32, dtype=torch.int32)


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [rows, vocab] from an int32 bitmask [rows, words] (bit j of word w: id 32w + j);
    ids past the bitmask are not allowed."""
    bits = ((bitmask.unsqueeze(-1) >> _BITS) & 1).reshape(bitmask.shape[0], -1).bool()
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]))


def single(row: torch.Tensor, vocab: int) -> int | None:
    """The id a bitmask row allows, if it allows exactly one."""
    nz = torch.nonzero(row).flatten()
    if len(nz) != 1:
        return None
    w = int(nz[0])
    word = int(row[w]) & 0xFFFFFFFF
    if word & (word - 1):
        return None
    t = 32 * w + word.bit_length() - 1
    return t if t < vocab else None


@contextlib.contextmanager
def masked(logits: torch.Tensor, masks: Sequence[tuple[int, torch.Tensor]]
           ) -> Iterator[torch.Tensor]:
    """logits [R, V] with rows start..start + len(bm) - 1 of each (start, bitmask) set to -inf
    where the bitmask disallows, in place: the rows are NOT restored (the verifier reads no
    row after its picks; log-probabilities are copied before). Restoring would cost two more
    passes over every masked row, for nothing."""
    if masks:
        dev, vocab = logits.device, logits.shape[-1]
        if logits.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # xgrammar's kernel reads the bits directly (no unpacked mask in memory)
            full = torch.full((logits.shape[0], masks[0][1].shape[1]), -1, dtype=torch.int32)
            rows = []
            for a, bm in masks:
                full[a : a + len(bm)] = bm
                rows.extend(range(a, a + len(bm)))
            xgr.apply_token_bitmask_inplace(logits, full.to(dev), indices=rows)
        else:  # float64 (the exactness tests' models): unpack, then fill each span in place
            for a, bm in masks:
                logits[a : a + len(bm)].masked_fill_(~allowed(bm, vocab).to(dev),
                                                     float("-inf"))
    yield logits
