"""The start-up checks a model passed, remembered on disk so that a warm machine skips them.

A model's KV layout (kvlayout.discover: one forward) and its packed forward checked against
its own attention (support.probe_model: two more) depend only on the model's files, its
number format, the device, the installed torch and transformers, and this package's
execution code. A model that passed under exactly those is remembered; the next start with
the same ones skips those forwards (the probe's first forward still runs: it finds what each
layer's attention asks for). Any change (a config, a weights file rewritten, another dtype
or device, an upgrade, an edit of specedge/execution) gives another key, so the checks run
again; an entry is used only where the whole key it records equals the one asked for, so a
stale, foreign or corrupt file never stands in for a check. Only passes are remembered:
a refusal happens again every time. Models not loaded from a directory of weight files
(built in memory, in tests) are never remembered.

$SPECEDGE_CHECKS names the directory (default ~/.cache/specedge/checks); `off` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import structlog
import torch

from specedge.execution.kvlayout import KVLayout, LayerKV

log = structlog.get_logger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CONFIG_FILES = ("config.json", "generation_config.json")


def cache_dir() -> Path | None:
    env = os.environ.get("SPECEDGE_CHECKS", "")
    if env.lower() == "off":
        return None
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specedge" / "checks"


@functools.cache
def code_digest() -> str:
    """sha256 of this package's execution code (what the checks exercise)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def files_of(path: Path) -> list[list]:
    """(name, size, mtime ns) of a model directory's weights and configs; empty when it has
    no weights file."""
    out = [[f.name, st.st_size, st.st_mtime_ns] for f in sorted(path.iterdir())
           if (f.suffix in WEIGHT_SUFFIXES or f.name in CONFIG_FILES)
           and (st := f.stat()) is not None]
    return out if any(n.endswith(WEIGHT_SUFFIXES) for n, _, _ in out) else []


def material(model, vocab_size: int) -> dict | None:
    """Everything a model's check results depend on, or None when they cannot be keyed (no
    model directory)."""
    import transformers

    name = getattr(model, "name_or_path", "") or ""
    path = Path(name) if name else None
    if path is None or not path.is_dir():
        return None
    files = files_of(path)
    if not files:
        return None
    param = next(model.parameters())
    device = str(param.device)
    if param.device.type == "cuda":
        device += f" {torch.cuda.get_device_name(param.device)}"
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    return {"model": str(path.resolve()), "files": files,
            "config": hashlib.sha256(config.encode()).hexdigest(), "dtype": str(param.dtype),
            "device": device, "vocab_size": vocab_size, "torch": torch.__version__,
            "transformers": transformers.__version__, "code": code_digest()}


def key_of(m: dict) -> str:
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:32]


def layout_to_json(layout: KVLayout) -> dict:
    return {"layers": layout.layers,
            "shapes": {str(i): [s.heads, s.key_dim, s.value_dim, str(s.dtype).removeprefix(
                "torch.")] for i, s in layout.shapes.items()},
            "shares": {str(i): j for i, j in layout.shares.items()}}


def layout_from_json(d: dict) -> KVLayout:
    return KVLayout(int(d["layers"]),
                    {int(i): LayerKV(int(h), int(k), int(v), getattr(torch, t))
                     for i, (h, k, v, t) in d["shapes"].items()},
                    {int(i): int(j) for i, j in d["shares"].items()})


def lookup(m: dict | None) -> dict | None:
    """The entry of a model that passed under material `m` (see `remember`), or None."""
    root = cache_dir()
    if m is None or root is None:
        return None
    try:
        entry = json.loads((root / f"{key_of(m)}.json").read_text())
        if entry.get("material") != m:  # a foreign or stale file under this name
            return None
        entry["layout"] = layout_from_json(entry["layout"])
        return entry
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt entry: the checks run (and rewrite it)
        log.warning("ignoring an unreadable check cache entry", error=str(exc)[:200])
        return None


def remember(m: dict | None, layout: KVLayout, attention: str, result: dict) -> None:
    """Record that the model of material `m` passed with this KV layout and attention
    backend (written whole or not at all: a temporary file renamed)."""
    root = cache_dir()
    if m is None or root is None:
        return
    entry = {"material": m, "layout": layout_to_json(layout), "attention": attention,
             "result": result}
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=root, suffix=".tmp", delete=False) as f:
            json.dump(entry, f)
        os.replace(f.name, root / f"{key_of(m)}.json")
    except OSError as exc:  # a read-only home: the checks simply run every time
        log.info("check cache not written", error=str(exc)[:200])
