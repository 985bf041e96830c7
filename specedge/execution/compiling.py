"""torch.compile under discipline: a persistent cache, counted compiles, and an error instead
of a silent eager fallback.

The compiled FlexAttention kernel is specialised on every shape it sees; the runner keeps
those shapes to a fixed ladder (qblocks.LADDER) and compiles them all at start-up. Three
things keep that true in production:
  - the compiled kernels outlive the process: inductor's caches live under
    $TORCHINDUCTOR_CACHE_DIR, by default ~/.cache/specedge/inductor (not /tmp), so a
    restarted verifier on the same machine and pool size loads them instead of compiling;
  - `compiles()` counts dynamo's compiled graphs, so the runner can log a compile that
    happens after start-up (a shape outside the ladder) and tests can assert there is none;
  - past the recompile limit dynamo would quietly run flex eagerly, which materialises
    scores over the whole pool: around the compiled flex call (`strict`) it raises instead
    (`CompileLimitError`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

RECOMPILE_LIMIT = 64  # distinct shapes of one compiled function (the ladder x layer kinds)
CACHE_DIR = Path.home() / ".cache" / "specedge" / "inductor"


class CompileLimitError(RuntimeError):
    """A compiled kernel met more distinct shapes than the ladder allows."""


def configure() -> None:
    """Set the compile cache and limits (idempotent; before the first compile)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(CACHE_DIR))
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
    ind = torch._inductor.config
    if hasattr(ind, "fx_graph_cache"):
        ind.fx_graph_cache = True


@contextlib.contextmanager
def strict() -> Iterator[None]:
    """Around a call of a ladder-compiled function only: past the recompile limit, raise
    instead of running eagerly. Not process-wide: functions torch compiles for itself (eager
    flex's own wrapper on the CPU) may fall back there as designed."""
    cfg = torch._dynamo.config
    old = getattr(cfg, "fail_on_recompile_limit_hit", None)
    if old is None:
        yield
        return
    cfg.fail_on_recompile_limit_hit = True
    try:
        yield
    finally:
        cfg.fail_on_recompile_limit_hit = old


def compiles() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def limit_error(exc: BaseException) -> CompileLimitError | None:
    """The clear error for dynamo's recompile-limit failure, None for any other error."""
    if "recompile" not in type(exc).__name__.lower() and "recompile_limit" not in str(exc):
        return None
    return CompileLimitError(
        f"FlexAttention was compiled for more than {RECOMPILE_LIMIT} shapes: a forward fell "
        "outside the compiled ladder (qblocks.LADDER). Refusing to fall back to eager flex, "
        f"which would materialise scores over the whole KV pool. ({type(exc).__name__})")
