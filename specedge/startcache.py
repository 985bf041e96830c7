"""Start-up results remembered on disk, so that a warm machine skips recomputing them: the
model checks of specedge/execution/checkcache.py and the tokenizer identities of
specedge/models.py. Each entry is keyed by the whole `material` it depends on (file sizes and
times, versions, code digests) and records that material: an entry is used only where it
equals the one asked for, so a stale, foreign or corrupt file is never taken for a result.

$SPECEDGE_STARTUP_CACHE names the directory (default ~/.cache/specedge/startup); `off` turns
it off (every result is recomputed)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def cache_dir() -> Path | None:
    env = os.environ.get("SPECEDGE_STARTUP_CACHE", "")
    if env.lower() == "off":
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specedge" / "startup"


def files_of(path: Path, wanted) -> list[list]:
    """(name, size, mtime ns) of the files in directory `path` for which `wanted(path)`."""
    return [[f.name, st.st_size, st.st_mtime_ns] for f in sorted(path.iterdir())
            if wanted(f) and (st := f.stat()) is not None]


def _path(kind: str, material: dict) -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
    return root / f"{kind}-{digest}.json"


def get(kind: str, material: dict | None) -> dict | None:
    """The value remembered for `material`, or None."""
    path = None if material is None else _path(kind, material)
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text())
        return entry["value"] if entry.get("material") == material else None
    except FileNotFoundError:
        return None
    except Exception as exc:  # corrupt: recomputed (and rewritten)
        log.warning("ignoring an unreadable start-up cache entry", path=str(path),
                    error=str(exc)[:200])
        return None


def put(kind: str, material: dict | None, value: dict) -> None:
    """Remember `value` for `material` (written whole or not at all: a file renamed)."""
    path = None if material is None else _path(kind, material)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as f:
            json.dump({"material": material, "value": value}, f)
        os.replace(f.name, path)
    except OSError as exc:  # a read-only home: recomputed every time
        log.info("start-up cache not written", error=str(exc)[:200])
