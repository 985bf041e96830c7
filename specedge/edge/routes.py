"""Which partition holds a prefix: the edge's memory of where its sessions ran, so a
conversation's next turn (or a sibling choice) goes to the verifier that has its KV cached.
Only a hint: a partition whose verifier is gone is served by another, without the saving."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from specedge.execution.prefix import block_hashes


class Routes:
    """Block hashes of recent sessions' tokens -> the partition that served them, the least
    recently used forgotten beyond `max_blocks`."""

    def __init__(self, block_size: int = 16, max_blocks: int = 1 << 16):
        self.block_size, self.max_blocks = block_size, max_blocks
        self._m: OrderedDict[bytes, int] = OrderedDict()

    def add(self, tokens: Sequence[int], partition: int) -> None:
        for h in block_hashes(tokens, self.block_size):
            self._m[h] = partition
            self._m.move_to_end(h)
        while len(self._m) > self.max_blocks:
            self._m.popitem(last=False)

    def find(self, tokens: Sequence[int]) -> int | None:
        """The partition of the longest remembered prefix of `tokens` (None: no block known)."""
        for h in reversed(block_hashes(tokens, self.block_size)):
            p = self._m.get(h)
            if p is not None:
                self._m.move_to_end(h)
                return p
        return None

    def __len__(self) -> int:
        return len(self._m)
