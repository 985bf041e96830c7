"""Weights converted to another number format, remembered on disk: a model loaded in a format
other than its checkpoint's (float32 from the bfloat16 files that `specedge.models fetch`
writes, on a CPU without native bf16) is written once in that format, and later starts map
that copy instead of converting every tensor again (the target's conversion is seconds of
each start on a 2-core machine; a mapped file is read from the page cache, shared by every
process that loads it).

An entry is one directory: the converted weights as safetensors, the model's config files,
and `material.json`, written last, which records what the entry was made from (the
checkpoint's file sizes and times, the format, the torch and transformers versions, this
file's code) and the sizes of the files written. A start uses an entry only where that
material equals its own and the files have those sizes: a rewritten checkpoint, an upgrade, or
a damaged entry means the conversion runs again (and a damaged entry is removed). Entries are
written whole (a temporary directory renamed) or not at all, and never make the cache
directory exceed its bound: the least recently used go first, and nothing is written where the
disk would keep less than a tenth free.

$SPECEDGE_WEIGHT_CACHE names the directory (default: `weights` in the start-up cache of
specedge/startcache.py, off where that is off); `off` turns it off.
$SPECEDGE_WEIGHT_CACHE_GB bounds it (default 20 GiB).

Only checkpoints in safetensors files whose tensor names the loaded model's state dict
reproduces are remembered (a model whose loader renames or fuses tensors is converted at every
start, as before)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

from specedge import startcache

log = structlog.get_logger(__name__)

WEIGHTS = "model.safetensors"
MATERIAL = "material.json"
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DEFAULT_LIMIT_GB = 20.0
FREE_SHARE = 0.1  # never fill the disk past this share left free
EXIT_WAIT_S = 60.0  # an exiting process waits this long for its copies to be written
STALE_TMP_S = 3600.0  # a temporary directory this old, or of a dead writer, is removed

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")

_writers: list[threading.Thread] = []


def root() -> Path | None:
    env = os.environ.get("SPECEDGE_WEIGHT_CACHE", "")
    if env.lower() == "off":
        return None
    if env:
        return Path(env).expanduser()
    base = startcache.cache_dir()
    return None if base is None else base / "weights"


def limit_bytes() -> int:
    try:
        gb = float(os.environ.get("SPECEDGE_WEIGHT_CACHE_GB", DEFAULT_LIMIT_GB))
    except ValueError:
        gb = DEFAULT_LIMIT_GB
    return int(max(0.0, gb) * 2**30)


def header(file: Path) -> dict:
    """A safetensors file's header: {tensor name: {dtype, shape, data_offsets}, ...}."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 2**20:
            raise ValueError(f"{file}: a header of {n} bytes")
        return json.loads(f.read(n))


def checkpoint_dtypes(path: Path) -> dict[str, str] | None:
    """{tensor name: safetensors dtype code} of a directory's checkpoint, or None where it is
    not all safetensors (other weight files, or none)."""
    weights = [f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    if not weights or any(f.suffix != ".safetensors" for f in weights):
        return None
    out: dict[str, str] = {}
    for f in sorted(weights):
        out.update({k: v["dtype"] for k, v in header(f).items() if k != "__metadata__"})
    return out


def converts(path: Path, dtype: torch.dtype) -> bool:
    """Whether loading the checkpoint in `path` as `dtype` converts any of its floating
    tensors (the only case remembered)."""
    code = SAFETENSORS_DTYPES.get(dtype)
    try:
        found = checkpoint_dtypes(path)
    except (OSError, ValueError) as exc:
        log.debug("checkpoint header unreadable", path=str(path), error=str(exc)[:200])
        return False
    return bool(code and found and any(c in FLOAT_CODES and c != code
                                       for c in found.values()))


def material(path: Path, dtype: torch.dtype) -> dict:
    """Everything a converted copy of the checkpoint in `path` depends on."""
    import transformers

    return {"model": str(path.resolve()),
            "files": startcache.files_of(path, lambda f: f.suffix in WEIGHT_SUFFIXES
                                         or f.name in CONFIG_FILES),
            "dtype": str(dtype), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}


def entry_dir(base: Path, m: dict) -> Path:
    return base / hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:32]


def drop(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


def load(path: Path, dtype: torch.dtype, build: Callable[[Path], tuple]):
    """The model of checkpoint `path` in `dtype` from its remembered copy, or None (none
    usable: the caller converts). `build(directory)`: (model, loading info) of
    transformers' from_pretrained(..., output_loading_info=True) on that directory."""
    base = root()
    if base is None or not converts(path, dtype):
        return None
    m = material(path, dtype)
    d = entry_dir(base, m)
    try:
        rec = json.loads((d / MATERIAL).read_text())
        ok = rec["material"] == m and all(
            (d / name).stat().st_size == size for name, size in rec["sizes"].items())
    except FileNotFoundError:
        if d.exists():  # no material.json, or a file gone: a damaged entry
            log.warning("removing a damaged weight cache entry", entry=str(d))
            drop(d)
        return None
    except Exception as exc:
        ok = False
        log.debug("weight cache entry unreadable", entry=str(d), error=str(exc)[:200])
    if not ok:
        log.warning("removing a damaged weight cache entry", entry=str(d))
        drop(d)
        return None
    t0 = time.perf_counter()
    try:
        model, info = build(d)
        bad = {k: sorted(v)[:3] for k, v in info.items() if v}
        if bad:
            raise ValueError(f"loading reported {bad}")
    except Exception as exc:
        log.warning("removing a weight cache entry that did not load", entry=str(d),
                    error=str(exc)[:300])
        drop(d)
        return None
    os.utime(d / MATERIAL)  # its last use, for the eviction order
    model.name_or_path = model.config.name_or_path = str(path)  # the checkpoint (logs, checks)
    log.info("converted weights mapped from the weight cache", model=str(path),
             dtype=str(dtype).removeprefix("torch."), entry=str(d),
             seconds=round(time.perf_counter() - t0, 3))
    return model


def store(path: Path, dtype: torch.dtype, state: dict[str, torch.Tensor]) -> Path | None:
    """Remember `state`, the state dict of a model loaded from checkpoint `path` and converted
    to `dtype`; the entry's directory, or None where nothing was written (nothing converted,
    the cache off, a model whose tensors do not match the checkpoint's names, no room)."""
    base = root()
    if base is None or not converts(path, dtype):
        return None
    names = checkpoint_dtypes(path) or {}
    tensors = {k: state.get(k) for k in sorted(names)}
    unknown = [k for k, t in tensors.items() if t is None or t.dtype not in SAFETENSORS_DTYPES]
    if unknown:
        log.info("weights not remembered: the loaded model renames the checkpoint's tensors",
                 model=str(path), example=unknown[0])
        return None
    m = material(path, dtype)
    d = entry_dir(base, m)
    if d.exists():
        return None
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        base.mkdir(parents=True, exist_ok=True)
        if not make_room(base, size):
            return None
        t0 = time.perf_counter()
        tmp = base / f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
        tmp.mkdir()
        try:
            write_safetensors(tmp / WEIGHTS, tensors)
            for name in CONFIG_FILES:
                if (path / name).is_file():
                    shutil.copyfile(path / name, tmp / name)
            sizes = {f.name: f.stat().st_size for f in tmp.iterdir()}
            (tmp / MATERIAL).write_text(json.dumps({"material": m, "sizes": sizes}))
            os.rename(tmp, d)
        except OSError:
            drop(tmp)  # another process renamed its copy first, or the disk filled
            raise
    except OSError as exc:
        log.info("weights not remembered", model=str(path), error=str(exc)[:200])
        return None
    log.info("converted weights remembered", model=str(path),
             dtype=str(dtype).removeprefix("torch."), entry=str(d), bytes=size,
             seconds=round(time.perf_counter() - t0, 3))
    return d


def store_later(path: Path, dtype: torch.dtype, model) -> None:
    """store() in a thread of its own, of the weights as loaded (the model serves meanwhile:
    the copy only reads them); wait() joins it, and so does the process's exit, for at most
    EXIT_WAIT_S (one cut shorter leaves a temporary directory, which a later store removes)."""
    state = dict(model.state_dict())  # these tensors, even if the model moves to a device
    t = threading.Thread(target=_store_quietly, args=(path, dtype, state),
                         name="weight-cache", daemon=True)
    if not _writers:
        atexit.register(wait, EXIT_WAIT_S)
    _writers.append(t)
    t.start()


def _store_quietly(path: Path, dtype: torch.dtype, state: dict) -> None:
    try:
        store(path, dtype, state)
    except Exception as exc:  # the cache is an optimisation: never a failure of the load
        log.warning("weights not remembered", model=str(path), error=str(exc)[:300])


def wait(timeout_s: float | None = None) -> None:
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while _writers:
        _writers.pop().join(None if end is None else max(0.0, end - time.monotonic()))


def make_room(base: Path, size: int) -> bool:
    """Remove temporary directories left behind and the least recently used entries until
    `size` more bytes fit under the bound; False (nothing to write) where they cannot, or
    where the disk would keep less than FREE_SHARE free."""
    now = time.time()
    entries = []
    for d in base.iterdir():
        if not d.is_dir():
            continue
        if d.name.startswith(".tmp-"):
            if now - d.stat().st_mtime > STALE_TMP_S or not _alive(d.name):
                drop(d)
            continue
        stamp = d / MATERIAL
        used = stamp.stat().st_mtime if stamp.exists() else 0.0
        entries.append((used, d, sum(f.stat().st_size for f in d.iterdir() if f.is_file())))
    limit = limit_bytes()
    if size > limit:
        log.info("weights not remembered: larger than the weight cache's bound",
                 bytes=size, limit=limit)
        return False
    total = sum(s for _, _, s in entries)
    for _, d, s in sorted(entries, key=lambda e: e[0]):
        if total + size <= limit:
            break
        log.info("weight cache entry evicted", entry=str(d), bytes=s)
        drop(d)
        total -= s
    disk = shutil.disk_usage(base)
    if disk.free - size < FREE_SHARE * disk.total:
        log.info("weights not remembered: the disk is nearly full", bytes=size,
                 free=disk.free)
        return False
    return True


def _alive(tmp_name: str) -> bool:
    try:
        os.kill(int(tmp_name.split("-")[1]), 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """`tensors` as one safetensors file, each written straight from its memory (no
    serialised copy of the whole model in between)."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        meta[k] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                   "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(meta, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))
