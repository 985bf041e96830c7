"""Where an answer is copying its prompt from, and the edits it made on the way: the source of
the long drafts of an edit request ("rename x to y", "add type hints", "fix this file").

A plain suffix match (specedge.edge.suffix) loses the thread at every edit: after the answer
writes `total` where the prompt had `acc`, the context's tail matches nothing, and after it the
match is one or two tokens long, too short to trust. An Aligner follows the answer through the
prompt token by token instead: while the answer copies, a pointer into the prompt moves with
it; where the answer departs, the pointer stays and the answer's tokens since are the edit, and
when the answer's tail is found again a little further on, the edit is learned as a
substitution (prompt span -> answer span) that later copies apply on the way. Its drafts:

- copying at p: the prompt from p, the substitutions seen so far applied;
- an edit under way: where it ends is unknown, so a few guesses as branches: a substitution
  already seen (its rest, then the prompt after it), the prompt from p (an insertion) and from
  p + 1 and p + 2 (a token or two replaced).

Pure Python over token ids, no model. Branch weights are heuristics; verification judges every
node, so they cost speed when wrong, never correctness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

GRAM = 3  # tokens of the answer's tail looked up to (re)find its place in the prompt
NEAR = 64  # prompt tokens past the edit's start searched first when the answer rejoins it
MAX_EDIT = 8  # longest prompt or answer span remembered as a substitution
LOST = 48  # an edit this long without rejoining: the answer is writing something else


@dataclass(frozen=True)
class Branch:
    """A guessed continuation: tokens, with how much it is trusted (0..1] and the copy run
    that backs it (tokens matched in a row: the evidence a caller may cap the branch by)."""

    tokens: tuple[int, ...]
    weight: float
    run: int


class Aligner:
    """An answer's alignment to one source (its prompt): feed it the answer's tokens in order,
    ask it for branches. Used by one session at a time."""

    def __init__(self, src: Sequence[int]):
        self.src = list(src)
        self._grams: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(self.src) - GRAM + 1):
            self._grams.setdefault(tuple(self.src[i:i + GRAM]), []).append(i)
        self.out: list[int] = []
        self.p: int | None = None  # copying: the prompt position the answer is at
        self.edit_at = 0  # an edit under way (p is None, lost False): its start in the prompt
        self.edit_from = 0  # ... and in the answer
        self.lost = True  # no place in the prompt (the start, or an edit too long)
        self.run = 0  # answer tokens matched in a row at the current place
        self.subs: dict[tuple[int, ...], tuple[int, ...]] = {}  # prompt span -> answer span
        self._pending: list[tuple[int, int, int, int]] = []  # copying: see _expect

    # -- following the answer

    def feed(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self._step(tok)

    def _step(self, tok: int) -> None:
        self.out.append(tok)
        if self.p is not None:
            exp = self._expect(1)
            if exp and exp[0][0] == tok:
                self.p = exp[0][1]
                self._pending.pop(0)
                self.run += 1
                return
            # departed: the edit starts where the chunk it was writing starts (a substitution
            # half written counts as edited)
            _, _, start, k = exp[0] if exp else (0, 0, self.p, 0)
            self.edit_at, self.edit_from = start, len(self.out) - 1 - k
            self.p = None
            self._pending = []
            self.lost = False
        if self.lost:
            self._find_anywhere()
        else:
            self._rejoin()

    def _expect(self, n: int) -> list[tuple[int, int, int, int]]:
        """The next n tokens a copy from p writes, substitutions applied: (token, prompt
        position after its chunk, the chunk's start, its index in the chunk)."""
        pos = self._pending[-1][1] if self._pending else self.p
        while len(self._pending) < n and pos < len(self.src):
            span, rep = self._sub_at(pos)
            if span:
                self._pending.extend((t, pos + span, pos, k) for k, t in enumerate(rep))
                pos += span
            else:
                self._pending.append((self.src[pos], pos + 1, pos, 0))
                pos += 1
        return self._pending[:n]

    def _sub_at(self, pos: int) -> tuple[int, tuple[int, ...]]:
        """The longest learned substitution whose prompt span starts at pos."""
        best = (0, ())
        for s, rep in self.subs.items():
            if len(s) > best[0] and tuple(self.src[pos:pos + len(s)]) == s:
                best = (len(s), rep)
        return best

    def _copying(self, at: int, run: int) -> None:
        self.p, self.lost, self.run = at, False, run
        self._pending = []

    def _rejoin(self) -> None:
        """An edit under way: does the answer's tail rejoin the prompt a little further on?"""
        edit = tuple(self.out[self.edit_from:])
        # a substitution seen before, written again in full here
        for s, rep in self.subs.items():
            if edit == rep and tuple(self.src[self.edit_at:self.edit_at + len(s)]) == s:
                self._copying(self.edit_at + len(s), self.run + 1)
                return
        if len(edit) >= GRAM:
            tail = tuple(self.out[-GRAM:])
            for i in self._grams.get(tail, ()):
                if self.edit_at <= i <= self.edit_at + NEAR:
                    span = tuple(self.src[self.edit_at:i])
                    wrote = edit[:len(edit) - GRAM]
                    if 0 < len(span) <= MAX_EDIT and 0 < len(wrote) <= MAX_EDIT and span != wrote:
                        self.subs[span] = wrote
                    self._copying(i + GRAM, GRAM)
                    return
        if len(edit) > LOST:
            self.lost = True
            self._find_anywhere()

    def _find_anywhere(self) -> None:
        """No place: the answer's tail anywhere in the prompt (the latest occurrence)."""
        if len(self.out) < GRAM:
            return
        hits = self._grams.get(tuple(self.out[-GRAM:]))
        if hits:
            self._copying(hits[-1] + GRAM, GRAM)

    # -- guessing what comes next

    def branches(self, depth: int) -> list[Branch]:
        if depth <= 0 or self.lost:
            return []
        if self.p is not None:
            toks = tuple(e[0] for e in self._expect(depth))
            return [Branch(toks, 1.0, self.run)] if toks else []
        edit = tuple(self.out[self.edit_from:])
        if len(edit) > MAX_EDIT:  # longer than any edit it guesses the end of
            return []
        fade = 0.5 ** (len(edit) - 1)  # the longer the edit, the less a rejoin is due now
        out: list[Branch] = []
        for s, rep in self.subs.items():  # a known substitution under way
            if (len(rep) > len(edit) and rep[:len(edit)] == edit
                    and tuple(self.src[self.edit_at:self.edit_at + len(s)]) == s):
                rest = rep[len(edit):] + self._copy_from(self.edit_at + len(s), depth)
                out.append(Branch(rest[:depth], 0.9, self.run))  # the same edit again
        for skip, w in ((len(edit), 0.5), (0, 0.3), (1, 0.3), (2, 0.15)):
            toks = self._copy_from(self.edit_at + skip, depth)
            if toks and all(b.tokens[:len(toks)] != toks for b in out):
                out.append(Branch(toks, w * fade, int(self.run * fade)))
        return out

    def _copy_from(self, pos: int, n: int) -> tuple[int, ...]:
        out: list[int] = []
        while len(out) < n and pos < len(self.src):
            span, rep = self._sub_at(pos)
            if span:
                out.extend(rep)
                pos += span
            else:
                out.append(self.src[pos])
                pos += 1
        return tuple(out[:n])
