"""What a verifier remembers about a session: a cache of the log, never the authority."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from schemas import Sampling, SessionOpened, digest_ids, unpack_ids
from specedge.kvstore import SessionKV


@dataclass
class SessionState:
    sid: str
    sampling: Sampling
    seed: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    prompt_len: int
    committed: list[int]  # C: prompt + every committed token
    round: int = 0  # the next round expected
    finished: bool = False
    kv: SessionKV | None = None  # target KV for a prefix of C (length kv.length)
    last_verdicts: dict[int, bytes] = field(default_factory=dict)  # round -> encoded verdict
    _digest: bytes = field(default=b"", repr=False)
    _digest_len: int = field(default=-1, repr=False)

    @classmethod
    def from_opened(cls, sid: str, o: SessionOpened) -> SessionState:
        prompt = unpack_ids(o.prompt)
        return cls(sid, o.sampling, o.seed, o.max_new_tokens, frozenset(unpack_ids(o.eos_ids)),
                   len(prompt), prompt)

    def digest(self) -> bytes:
        """digest_ids(committed), memoised by length: C only ever grows in place."""
        if self._digest_len != len(self.committed):
            self._digest, self._digest_len = digest_ids(self.committed), len(self.committed)
        return self._digest

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len

    def remember(self, round_no: int, encoded: bytes) -> None:
        """Keep the last verdicts so a redelivered block is answered identically."""
        self.last_verdicts[round_no] = encoded
        for r in [r for r in self.last_verdicts if r < round_no - 4]:
            del self.last_verdicts[r]


class SessionTable:
    """Sessions by id, least recently used first; KV memory bounded by a token budget."""

    def __init__(self, kv_budget_tokens: int | None = None, max_sessions: int = 100_000,
                 kv_budget_bytes: int | None = None):
        self._s: OrderedDict[str, SessionState] = OrderedDict()
        self.kv_budget_tokens = kv_budget_tokens
        self.kv_budget_bytes = kv_budget_bytes
        self.max_sessions = max_sessions
        self.evictions = 0

    def get(self, sid: str) -> SessionState | None:
        st = self._s.get(sid)
        if st is not None:
            self._s.move_to_end(sid)
        return st

    def put(self, st: SessionState) -> None:
        self._s[st.sid] = st
        self._s.move_to_end(st.sid)
        while len(self._s) > self.max_sessions:
            self._s.popitem(last=False)

    def drop(self, sid: str) -> None:
        self._s.pop(sid, None)

    def free_kv(self, sid: str) -> None:
        st = self._s.get(sid)
        if st is not None:
            st.kv = None

    def kv_tokens(self) -> int:
        return sum(s.kv.capacity for s in self._s.values() if s.kv is not None)

    def kv_bytes(self) -> int:
        return sum(s.kv.nbytes for s in self._s.values() if s.kv is not None)

    def enforce_budget(self, keep: set[str]) -> None:
        """Evict least recently used KV (not the sessions in `keep`) until within budget.
        Totals are summed once and decremented per eviction: this runs every batch."""
        if self.kv_budget_tokens is None and self.kv_budget_bytes is None:
            return
        tokens, nbytes = self.kv_tokens(), self.kv_bytes()
        for sid, st in list(self._s.items()):
            if ((self.kv_budget_tokens is None or tokens <= self.kv_budget_tokens)
                    and (self.kv_budget_bytes is None or nbytes <= self.kv_budget_bytes)):
                return
            if st.kv is not None and sid not in keep:
                tokens -= st.kv.capacity
                nbytes -= st.kv.nbytes
                st.kv = None
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._s)
