"""What a verifier remembers about a session: a cache of the log, never the authority."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from schemas import DIGEST_SIZE, Sampling, SessionOpened, pack_ids, unpack_ids
from schemas.wire import GrammarSpec
from specedge.execution import KVPool, KVSeq
from specedge.execution.kvlayout import discover
from specedge.execution.prefix import Chain
from specedge.execution.runner import gpu_share_tokens
from specedge.execution.support import check_config


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
    kv: KVSeq | None = None  # target KV for a prefix of C (length kv.length)
    last_verdicts: dict[int, bytes] = field(default_factory=dict)  # round -> encoded verdict
    last_seen: float = field(default_factory=time.monotonic)  # its edge's last block (monotonic)
    interval_s: float | None = None  # EMA of the time between its rounds' blocks
    logprobs: int = -1  # SessionOpened.logprobs: -1 none, k: verdicts carry k alternatives
    # the prefix cache (engine.py): SessionOpened's shared system prompt, the block hashes of
    # C (made by the engine, which knows the salts), the prompt tokens first reused from the
    # cache since the last verdict (that verdict's cached_tokens), and all reported so far:
    # a rebuild that adopts them again reports only what it reuses beyond them, so the sum
    # over a session's verdicts counts each reused prompt token once
    shared_prefix: str = ""
    shared_len: int = 0
    prefix_chain: Chain | None = field(default=None, repr=False)
    cached_tokens: int = 0
    cached_reported: int = 0
    # structured output: SessionOpened.grammar, and the matcher the engine builds from it
    # (specedge.execution.grammar.Constraint; synced to C's generated part before each mask,
    # so a state rebuilt from the log rebuilds its grammar state too)
    grammar: GrammarSpec | None = None
    constraint: object = field(default=None, repr=False)
    _seen_round: int = field(default=-1, repr=False)
    _round_at: float = field(default=0.0, repr=False)  # when _seen_round's block first came
    _digest: bytes = field(default=b"", repr=False)
    _digest_len: int = field(default=-1, repr=False)  # -1: C was replaced, hash it anew
    _hasher: object = field(default=None, repr=False)  # blake2b over C[:_hashed]
    _hashed: int = field(default=0, repr=False)

    @classmethod
    def from_opened(cls, sid: str, o: SessionOpened) -> SessionState:
        prompt = unpack_ids(o.prompt)
        return cls(sid, o.sampling, o.seed, o.max_new_tokens, frozenset(unpack_ids(o.eos_ids)),
                   len(prompt), prompt, logprobs=o.logprobs, shared_prefix=o.shared_prefix,
                   shared_len=o.shared_len, grammar=o.grammar)

    def digest(self) -> bytes:
        """digest_ids(committed), memoised by length and hashed incrementally: C only ever
        grows in place (hashing all of it every round would cost O(length) per block)."""
        n = len(self.committed)
        if self._digest_len == n:
            return self._digest
        if self._digest_len < 0 or self._hasher is None or self._hashed > n:
            self._hasher, self._hashed = hashlib.blake2b(digest_size=DIGEST_SIZE), 0
        self._hasher.update(pack_ids(self.committed[self._hashed :]))
        self._hashed = n
        self._digest, self._digest_len = self._hasher.copy().digest(), n
        return self._digest

    @property
    def generated(self) -> int:
        return len(self.committed) - self.prompt_len

    def saw(self, round_no: int, now: float) -> None:
        """A block of `round_no` arrived at `now`: the edge is alive, and a new round's block
        measures the session's round interval (a redelivery or re-publish does not)."""
        if round_no > self._seen_round:
            if self._seen_round >= 0:
                gap = (now - self._round_at) / (round_no - self._seen_round)
                self.interval_s = gap if self.interval_s is None else (
                    self.interval_s + 0.3 * (gap - self.interval_s))
            self._seen_round, self._round_at = round_no, now
        self.last_seen = now

    def remember(self, round_no: int, encoded: bytes) -> None:
        """Keep the last verdicts so a redelivered block is answered identically."""
        self.last_verdicts[round_no] = encoded
        for r in [r for r in self.last_verdicts if r < round_no - 4]:
            del self.last_verdicts[r]


@dataclass(frozen=True)
class Reclaim:
    """When a verifier forgets a session whose edge went silent (killed, or its link never came
    back): after `rounds` of the session's own round intervals without a block, but never
    sooner than `min_s` (a slow link's pause is not an abandonment) and at the latest after
    `max_s`. A session that comes back later is rebuilt from its log."""

    rounds: float = 50.0
    min_s: float = 30.0
    max_s: float = 600.0

    def after_s(self, st: SessionState) -> float:
        if st.interval_s is None:
            return self.min_s
        return min(self.max_s, max(self.min_s, self.rounds * st.interval_s))


class SessionTable:
    """Sessions by id, least recently used first. Their KV lives in the engine's pool; when a
    batch needs blocks the pool cannot give, the least recently used sessions lose their KV
    (their next block rebuilds it from the log)."""

    def __init__(self, pool: KVPool | None = None, max_sessions: int = 100_000):
        self._s: OrderedDict[str, SessionState] = OrderedDict()
        self.pool = pool
        self.max_sessions = max_sessions
        self.evictions = 0

    def get(self, sid: str) -> SessionState | None:
        st = self._s.get(sid)
        if st is not None:
            self._s.move_to_end(sid)
        return st

    def put(self, st: SessionState) -> None:
        old = self._s.get(st.sid)
        if old is not None and old is not st:
            self._free(old)
        self._s[st.sid] = st
        self._s.move_to_end(st.sid)
        while len(self._s) > self.max_sessions:
            self._free(self._s.popitem(last=False)[1])

    def pop(self, sid: str) -> SessionState | None:
        """Forget a session and hand back its state, KV still held (see `release`)."""
        return self._s.pop(sid, None)

    @staticmethod
    def release(st: SessionState) -> None:
        """Free a forgotten session's KV."""
        SessionTable._free(st)

    def free_kv(self, sid: str) -> None:
        st = self._s.get(sid)
        if st is not None:
            self._free(st)

    @staticmethod
    def _free(st: SessionState) -> None:
        # a closed session may be released from both threads at once; freeing twice is safe
        kv, st.kv = st.kv, None
        if kv is not None:
            kv.free()

    def idle(self, now: float, policy: Reclaim) -> list[SessionState]:
        """Sessions silent for longer than their reclaim bound."""
        return [st for st in self._s.values() if now - st.last_seen > policy.after_s(st)]

    def kv_bytes(self) -> int:
        """Bytes of KV the sessions hold: a block several share (a common prefix adopted from
        the cache, a sibling choice) counts once. Read at scrape time: works on copies."""
        seqs = [st.kv for st in list(self._s.values()) if st.kv is not None]
        if not seqs:
            return 0
        blocks = {blk for kv in seqs for blk in list(kv.blocks)}
        return len(blocks) * seqs[0].pool.block_size * seqs[0].pool.bytes_per_token

    def make_room(self, blocks: int, keep: set[str]) -> bool:
        """Evict least recently used KV (not the sessions in `keep`) until the pool can give
        `blocks` more blocks; False if even evicting every other session is not enough."""
        pool = self.pool
        if pool is None or pool.can_take(blocks):
            return True
        for sid, st in list(self._s.items()):
            if pool.can_take(blocks):
                return True
            if st.kv is not None and sid not in keep:
                self._free(st)
                self.evictions += 1
        return pool.can_take(blocks)

    def __len__(self) -> int:
        return len(self._s)


class Openings:
    """SessionOpened messages seen on the broadcast subject, kept until the session's first
    block: its state then comes from the message instead of a read of its log (one broker
    round trip less before a session's first verdict). The message is the same the log
    holds; a session opened twice with different bodies is left to the log. Bounded in bytes,
    oldest dropped first (a dropped one only costs that log read)."""

    def __init__(self, max_bytes: int = 32 << 20):
        self.max_bytes = max_bytes
        self._m: OrderedDict[str, SessionOpened | None] = OrderedDict()  # None: ambiguous
        self._bytes = 0

    def add(self, sid: str, o: SessionOpened) -> None:
        if sid in self._m:
            if self._m[sid] != o:
                self._drop(sid)
                self._m[sid] = None  # two different openings: only the log can tell
            return
        self._m[sid] = o
        self._bytes += len(o.prompt)
        while self._bytes > self.max_bytes and self._m:
            self._drop(next(iter(self._m)))

    def take(self, sid: str) -> SessionOpened | None:
        o = self._m.get(sid)
        if o is not None:
            self._drop(sid)
        return o

    def discard(self, sid: str) -> None:
        if sid in self._m:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        o = self._m.pop(sid)
        if o is not None:
            self._bytes -= len(o.prompt)

    def __len__(self) -> int:
        return len(self._m)


# With no budget given, a GPU verifier takes this share of the device memory left after the
# weights (like vLLM's gpu_memory_utilization, lower: an edge or a benchmark may share it).
GPU_DEFAULT_FRACTION = 0.5


def kv_budget(model, cfg) -> int | None:
    """The KV pool's size in tokens from a worker config's budget (tokens, bytes, or a
    fraction of free device memory); None: a pool that grows (the CPU default)."""
    if cfg.kv_budget_tokens is not None:
        return cfg.kv_budget_tokens
    check_config(model.config)  # its refusal says more than a failing discovery forward
    if cfg.kv_budget_bytes is not None:  # every layer's real size (kvlayout.py)
        return max(1, cfg.kv_budget_bytes // max(1, discover(model).bytes_per_token))
    on_gpu = next(model.parameters()).device.type == "cuda"
    fraction = cfg.kv_budget_fraction
    if fraction is None and on_gpu:
        fraction = GPU_DEFAULT_FRACTION
    if fraction is None:
        return None
    if not on_gpu:
        raise ValueError("a KV budget as a share of free memory needs a GPU; give tokens or "
                         "bytes on the CPU")
    return gpu_share_tokens(model, fraction)
