"""Chained hashes of a token sequence's full KV blocks: the keys of the pool's prefix cache.

Block i's hash covers its own tokens and, through its parent (block i-1's hash), every token
before it: equal hashes mean equal prefixes, so equal KV. The first block's parent is a hash
of a salt (the tenant), so one tenant's blocks never match another's. Only full blocks are
hashed: a partial block is still being written.

The hash is BLAKE2b-128 keyed with a secret drawn when the process starts: nobody outside
the process can compute a key, so nobody can craft tokens whose blocks collide with another
session's and be served its KV (a fast unkeyed hash, such as the xxh3 used before, lets
whoever predicts the keys aim collisions at them; vLLM moved to SHA-256 after
CVE-2025-25183). No key leaves its process: the verifier's cache, the edge's draft cache and
its routes are each keyed and looked up in one process, so a fresh secret per process loses
nothing but what a restart loses anyway.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

_SECRET = os.urandom(32)  # per process (see above)
_ROOT = b"specedge-prefix\0"
_MIX = b"\0salt\0"


def _h(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16, key=_SECRET).digest()


def root(salt: bytes) -> bytes:
    """The parent of a chain's first block."""
    return _h(_ROOT + salt)


def mix(parent: bytes, salt: bytes) -> bytes:
    """A chain continued under another salt: the blocks after a shared system prompt depend on
    the prompt's blocks and on the tenant."""
    return _h(parent + _MIX + salt)


def block_hashes(tokens: Sequence[int], block_size: int, salt: bytes = b"",
                 parent: bytes | None = None) -> list[bytes]:
    """Hashes of the full blocks of `tokens` (a trailing partial block is ignored), chained
    from `parent`, or from root(salt) when there is none."""
    h = root(salt) if parent is None else parent
    out = []
    for i in range(len(tokens) // block_size):
        blk = tokens[i * block_size : (i + 1) * block_size]
        h = _h(h + struct.pack(f"<{block_size}i", *blk))
        out.append(h)
    return out


class Chain:
    """The block hashes of one growing sequence (a session's committed tokens), extended as it
    grows. The blocks fully inside the first `shared_len` tokens are hashed under
    `shared_salt` (a system prompt shared across tenants); the rest under `salt`."""

    def __init__(self, block_size: int, salt: bytes = b"", shared_salt: bytes = b"",
                 shared_len: int = 0):
        self.block_size = block_size
        self.salt = salt
        self.shared_salt = shared_salt
        self.shared_blocks = shared_len // block_size if shared_salt else 0
        self.hashes: list[bytes] = []

    def update(self, tokens: Sequence[int]) -> list[bytes]:
        """The hashes of `tokens`' full blocks; `tokens` extends what the last call saw."""
        b, n = self.block_size, len(tokens) // self.block_size
        while len(self.hashes) < n:
            k = len(self.hashes)
            if k < self.shared_blocks:  # the shared blocks, in one call
                end = min(n, self.shared_blocks)
                parent = self.hashes[-1] if k else root(self.shared_salt)
            else:
                end = n
                if k == 0:
                    parent = root(self.salt)
                elif k == self.shared_blocks:
                    parent = mix(self.hashes[-1], self.salt)
                else:
                    parent = self.hashes[-1]
            self.hashes += block_hashes(tokens[k * b : end * b], b, parent=parent)
        return self.hashes
