"""The edge's draft model side: its KV for the committed sequence, growing a draft tree one
forward at a time, and rolling back to a verdict. Runs in the edge's executor thread."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from schemas import Sampling
from specedge.config import TreeShape
from specedge.edge.coalesce import CoalescingRunner
from specedge.execution import PackedRunner, Segment
from specedge.execution.prefix import block_hashes
from specedge.execution.transforms import History, Rows, apply, wanted
from specedge.execution.tree import ancestor_bits, unpack_rows

if TYPE_CHECKING:
    from specedge.execution.grammar import Constraint


@dataclass
class DraftTree:
    root: int
    committed_len: int
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)  # cumulative draft log-prob per node
    forwarded: int = 0  # nodes 1..forwarded have draft KV (a prefix closed under ancestors)
    # the logit transforms its candidates were scored with (trees drafted ahead reuse them)
    sampling: Sampling | None = None
    prompt_len: int = 0
    # structured output: the session's grammar state (synced to C before each use)
    constraint: Constraint | None = None
    # nodes a suffix match proposed (specedge.edge.suffixdraft), not the draft model: they have
    # no draft KV and come after every model node, so `forwarded` is unaffected
    suffix: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tokens)


class TreeBuilder:
    """Best-first tree growth by cumulative draft log-probability. Call step() until done;
    each step is one draft forward, so a caller can stop between steps. With `sampling`
    asking for penalties or bias, candidates are scored on the draft's logits transformed as
    the verifier transforms the target's (history: C and the node's path; `prompt_len`: C's
    prompt part), so the draft proposes what the transformed target will pick."""

    def __init__(self, drafter: Drafter, committed: list[int], shape: TreeShape,
                 sampling: Sampling | None = None, prompt_len: int = 0,
                 constraint: Constraint | None = None, forced: bool = True):
        self.d, self.shape = drafter, shape.check()
        self.committed = committed
        self.tree = DraftTree(root=committed[-1], committed_len=len(committed),
                              sampling=sampling, prompt_len=prompt_len, constraint=constraint)
        # with a grammar: drafts masked as the verifier masks the target, and tokens the
        # grammar forces added without a draft forward (`forced`)
        self._forced = forced and constraint is not None
        self._has_forced_child: set[int] = set()
        self._history = (History.of(committed, prompt_len)
                         if sampling is not None and wanted(sampling) else None)
        self._heap: list[tuple[float, int, int, int, int]] = []  # (-logp, seq, parent, tok, depth)
        self._seq = 0
        self._pending: list[int] = []  # nodes added but not yet forwarded
        self.done = shape.budget == 0  # plain decoding: the root alone, no draft forward
        self.steps = 0

    def _push_children(self, nodes: list[int], logits: torch.Tensor) -> None:
        """Candidates under each of `nodes` (rows of logits), scored by cumulative draft
        log-probability: float32 and one host transfer for all of them (fp64 runs at a
        fraction of the rate on the consumer GPUs edges use)."""
        t = self.tree
        live = [i for i, n in enumerate(nodes) if (t.depths[n - 1] if n else 0) < self.shape.depth
                and n not in self._has_forced_child  # its one allowed child is in the tree
                and not (n and t.constraint is not None and t.tokens[n - 1] in t.constraint.stop)]
        if not live:
            return
        rows = logits if len(live) == len(nodes) else logits[live]
        if self._history is not None:
            rows = apply(rows, [Rows(0, t.sampling, self._history, t.tokens, t.parents,
                                     [nodes[j] for j in live])])
        if t.constraint is not None:
            from specedge.execution.grammar import allowed

            if not t.constraint.sync(self.committed[t.prompt_len:]):
                return  # a guess past the grammar's end (drafted ahead): nothing to draft
            bm = t.constraint.node_bitmask(t.tokens, t.parents, [nodes[j] for j in live])
            rows = rows.masked_fill(~allowed(bm, rows.shape[-1]).to(rows.device),
                                    float("-inf"))
        vals, idx = torch.topk(torch.log_softmax(rows.float(), -1), self.shape.topk)
        for j, v_row, i_row in zip(live, vals.tolist(), idx.tolist(), strict=True):
            node = nodes[j]
            base, depth = (t.logp[node - 1], t.depths[node - 1]) if node else (0.0, 0)
            for v, tok in zip(v_row, i_row, strict=True):
                if v == float("-inf"):  # the grammar allows fewer than topk tokens
                    break
                heapq.heappush(self._heap, (-(base + v), self._seq, node, tok, depth + 1))
                self._seq += 1

    def step(self) -> None:
        """First step: bring the draft KV up to C (recomputing what the last verdict added)
        and read the root's distribution. Later steps: forward the nodes added last, and add
        the next best candidates."""
        if self.done:
            return
        self.steps += 1
        self.d.drafting(True)
        t = self.tree
        if self.steps == 1:
            self._push_children([0], self.d.catch_up(self.committed)[None])
        else:
            self._push_children(self._pending, self.d.forward_nodes(t, self._pending))
            t.forwarded = t.size
            self._pending = []
        room = self.shape.budget - t.size
        while room > 0 and self._heap and len(self._pending) < self.shape.width:
            neg, _, parent, tok, depth = heapq.heappop(self._heap)
            self._add(parent, tok, depth, -neg)
            room -= 1
            if self._forced and room > 0 and depth < self.shape.depth:
                room -= self._add_forced(t.size, min(room, self.shape.depth - depth))
        # Forward the new nodes next step only if more nodes could hang off them.
        expandable = any(t.depths[i - 1] < self.shape.depth for i in self._pending)
        if not self._pending or room <= 0 or not expandable:
            self.done = True
            self.d.drafting(False)

    def _add(self, parent: int, tok: int, depth: int, logp: float) -> None:
        t = self.tree
        t.tokens.append(tok)
        t.parents.append(parent)
        t.depths.append(depth)
        t.logp.append(logp)
        self._pending.append(t.size)

    def _add_forced(self, node: int, limit: int) -> int:
        """Append the chain of tokens the grammar forces after `node` (probability 1 under
        the masked target, so the same log-probability): no draft forward decides them."""
        t = self.tree
        path, n = [], node
        while n:
            path.append(t.tokens[n - 1])
            n = t.parents[n - 1]
        if not t.constraint.sync(self.committed[t.prompt_len:]):
            return 0
        span = t.constraint.forced(path[::-1], limit)
        for tok in span:
            self._has_forced_child.add(node)
            self._add(node, tok, t.depths[node - 1] + 1, t.logp[node - 1])
            node = t.size
        return len(span)

    def run(self) -> DraftTree:
        while not self.done:
            self.step()
        return self.tree


class Drafter:
    """One session's draft model state. The draft KV covers committed[:kv_len]."""

    def __init__(self, runner: PackedRunner | CoalescingRunner):
        self.runner = runner
        self.kv = runner.new_seq()
        self.vocab_size = runner.vocab_size

    def drafting(self, on: bool) -> None:
        """Tell a shared runner whether this drafter is mid-tree (its next forward follows
        this one's host work), so a packed forward waits for it rather than leaving it to
        the next one."""
        if isinstance(self.runner, CoalescingRunner):
            (self.runner.hold if on else self.runner.release)(self.kv)

    @property
    def kv_len(self) -> int:
        return self.kv.length

    def catch_up(self, committed: list[int]) -> torch.Tensor:
        """KV recomputation: forward the committed tokens the draft KV lacks (at least the
        last one, whose logits are the root's distribution)."""
        return self.runner.forward([self.catch_up_segment(committed)])[0][0]

    def catch_up_segment(self, committed: list[int]) -> Segment:
        if self.kv.length >= len(committed):
            self.kv.truncate(len(committed) - 1)
        return Segment.chain(self.kv, committed[self.kv.length:])

    def forward_nodes(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """Forward tree nodes (all ancestors already forwarded, in node order)."""
        return self.runner.forward([self.nodes_segment(tree, nodes)])[0]

    def nodes_segment(self, tree: DraftTree, nodes: list[int]) -> Segment:
        """The segment of forward_nodes, for callers that batch several drafters' forwards.
        Node i's KV lives at committed_len + i - 1, so `nodes` must be the next ones."""
        first = tree.forwarded + 1
        if nodes != list(range(first, first + len(nodes))):
            raise ValueError(f"nodes {nodes} are not the next unforwarded ones ({first}, ...)")
        if self.kv.length != tree.committed_len + tree.forwarded:
            raise ValueError("the draft KV is not at this tree's forwarded nodes")
        base, last = tree.committed_len, first - 1 + len(nodes)
        # the new nodes' ancestor rows over the nodes so far (Python-int bitmasks, one unpack)
        rows = torch.from_numpy(unpack_rows(ancestor_bits(tree.parents[:last])[first - 1 :],
                                            last))
        return Segment.tree_nodes(self.kv, base, rows, [tree.tokens[i - 1] for i in nodes],
                                  [base - 1 + tree.depths[i - 1] for i in nodes])

    def fork(self, tree: DraftTree, path: list[int]) -> Drafter:
        """A drafter whose KV covers C plus the forwarded part of `path` (a root-to-node path
        of `tree`), for drafting ahead on the guess that the verdict accepts that path. It
        shares the committed prefix's blocks with this one (copy on write)."""
        d = Drafter.__new__(Drafter)
        d.runner, d.vocab_size = self.runner, self.vocab_size
        d.kv = self.kv.fork(tree.committed_len, [i - 1 for i in path if i <= tree.forwarded])
        return d

    def rollback(self, tree: DraftTree, accepted: list[int]) -> None:
        """Keep the draft KV of the accepted path (its forwarded prefix), drop the rest."""
        keep = [i - 1 for i in accepted if i <= tree.forwarded]
        self.kv.keep(tree.committed_len, keep)

    def reuse(self, prompt: list[int]) -> int:
        """Map the cached draft KV of the prompt's leading blocks (an earlier turn of this
        conversation, a sibling choice) into this drafter's empty KV: the prefill then starts
        after them. At most len(prompt) - 1 tokens, so the last is always forwarded. Returns
        the tokens reused (0 when the pool keeps no cache)."""
        pool = self.kv.pool
        if not pool.caching or self.kv.length or len(prompt) < 2:
            return 0
        usable = (len(prompt) - 1) // pool.block_size * pool.block_size
        return self.kv.adopt(block_hashes(prompt[:usable], pool.block_size))

    def remember(self, committed: list[int]) -> None:
        """Offer the draft KV's full blocks of `committed` to the pool's cache (they stay
        there after close, until the pool needs the room)."""
        pool = self.kv.pool
        if pool.caching:
            n = min(self.kv.length, len(committed))
            self.kv.publish(block_hashes(committed[:n], pool.block_size))

    def close(self) -> None:
        """Give the KV blocks back to the runner's pool."""
        self.drafting(False)
        self.kv.free()


class LazyDrafter:
    """A Drafter built on first use, in the thread that first asks for the model's work (the
    session's executor). A session whose first round carries the prompt alone needs no draft
    model until its second: on one machine (the demo) the draft's load and check then wait
    until the first token is out, instead of sharing the cores with the verifier's load, check
    and prefill. Until built it holds no KV; `vocab_size` (sent when the session opens) is
    checked against the built runner's."""

    def __init__(self, build: Callable[[], Drafter], vocab_size: int):
        self._build, self._drafter, self.vocab_size = build, None, vocab_size
        self._lock = threading.Lock()

    @property
    def built(self) -> Drafter:
        with self._lock:
            if self._drafter is None:
                d = self._build()
                if d.vocab_size != self.vocab_size:
                    d.close()
                    raise ValueError(f"the draft's runner has {d.vocab_size} token rows, the "
                                     f"session was opened with {self.vocab_size}")
                self._drafter = d
        return self._drafter

    @property
    def kv_len(self) -> int:
        return 0 if self._drafter is None else self._drafter.kv_len

    def drafting(self, on: bool) -> None:
        if self._drafter is not None:
            self._drafter.drafting(on)

    def rollback(self, tree: DraftTree, accepted: list[int]) -> None:
        if self._drafter is not None or tree.size:  # a plain round before it: nothing to undo
            self.built.rollback(tree, accepted)

    def remember(self, committed: list[int]) -> None:
        if self._drafter is not None:
            self._drafter.remember(committed)

    def close(self) -> None:
        if self._drafter is not None:
            self._drafter.close()

    def __getattr__(self, name: str):
        """reuse, catch_up, forward_nodes...: the model's work. Before the build a method is
        looked up on the event loop and called in the draft thread: it builds when called."""
        if self._drafter is not None:
            return getattr(self._drafter, name)

        def call(*args, **kw):
            return getattr(self.built, name)(*args, **kw)

        return call
