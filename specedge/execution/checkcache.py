"""The start-up checks a model passed, remembered (specedge/startcache.py) so that a warm
machine skips them.

A model's KV layout (kvlayout.discover: one forward) and its packed forward checked against
its own attention (support.probe_model: two more) depend only on the model's files, its
number format, the device, the installed torch and transformers, and this package's
execution code. A model that passed under exactly those is remembered; the next start with
the same ones skips those forwards (the probe's first forward still runs: it finds what each
layer's attention asks for, and counts its calls). Any change (a config, a weights file
rewritten, another dtype or device, an upgrade, an edit of specedge/execution) gives other
material, so the checks run again. Only passes are remembered: a refusal happens again every
time. Models not loaded from a directory of weight files (built in memory, in tests) are
never remembered.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch

from specedge import startcache
from specedge.execution.kvlayout import KVLayout, LayerKV

KIND = "check"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
CONFIG_FILES = ("config.json", "generation_config.json")


@functools.cache
def code_digest() -> str:
    """sha256 of this package's execution code (what the checks exercise)."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def material(model, vocab_size: int) -> dict | None:
    """Everything a model's check results depend on, or None when they cannot be keyed (no
    model directory with weight files)."""
    import transformers

    name = getattr(model, "name_or_path", "") or ""
    path = Path(name) if name else None
    if path is None or not path.is_dir():
        return None
    files = startcache.files_of(path, lambda f: f.suffix in WEIGHT_SUFFIXES
                                or f.name in CONFIG_FILES)
    if not any(n.endswith(WEIGHT_SUFFIXES) for n, _, _ in files):
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
    """{layout, attention, result} of a model that passed under material `m`, or None."""
    entry = startcache.get(KIND, m)
    if entry is None:
        return None
    try:
        return dict(entry, layout=layout_from_json(entry["layout"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def remember(m: dict | None, layout: KVLayout, attention: str, result: dict) -> None:
    """Record that the model of material `m` passed with this KV layout and attention
    backend; `result`: the probe's figures."""
    startcache.put(KIND, m, {"layout": layout_to_json(layout), "attention": attention,
                             "result": result})
