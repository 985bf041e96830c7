"""Synthetic-weights models: the real config and tokenizer of the Qwen2.5-Coder family with
random weights, for machines that have a GPU but not the weights (benchmarks, `make gpu-check`).
A forward costs what the real model's does; acceptance is made realistic by building the draft
from the target with calibrated noise.

Model references (every `--model`, `--target` and `--draft` flag takes them):

    synthetic:<shape>[:seed=<int>][:draft@<agreement> | :draft=<noise>]

* `shape`: `tiny` (Qwen2 layout, hidden 256, 4 layers, the real vocabulary and tokenizer),
  `0.5b`, `1.5b`, `7b` (the configs in `specedge/assets/qwen2.5-coder/`).
* `seed`: the target's weights (default 0). Every process given the same reference builds
  bit-identical weights on the same kind of device (each tensor from its own seeded generator
  on that device, drawn in float32 and rounded to the dtype; CUDA's generator depends on the
  GPU model, so compare within one machine type).
* `draft@A`: a draft = the target's weights plus Gaussian noise (per tensor, scaled by the
  tensor's std; norms stay exact), with the scale found by bisection (a handful of draft
  forwards) so that the draft's greedy choice equals the target's at a fraction A of the
  positions of the target's own greedy continuations of a few fixed prompts.
* `draft=N`: the same draft with the noise scale N given: what calibration reports, so other
  processes build the draft without calibrating (`python -m specedge.synthetic calibrate`).

A draft has the target's shape: a 0.5B-shaped draft cannot be derived from 1.5B random weights
(there is nothing to agree with), so a synthetic draft costs a target forward. Random
initialisation gives nearly uniform logits, whose greedy argmax would be a near-tie at every
position; the output matrix is drawn so the logits' std is `SHARPEN` (as peaked as a trained
model's), which keeps greedy decoding stable under batching noise. Embeddings are unit-scale
(see EMBED_STD); every other tensor is N(0, 0.02) and norms are ones.

    python -m specedge.synthetic --device cuda calibrate 1.5b --agreement 0.8  # -> draft=X
    python -m specedge.synthetic --device cuda inspect synthetic:1.5b:draft=X
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = structlog.get_logger(__name__)

PREFIX = "synthetic:"
SHAPES = ("tiny", "0.5b", "1.5b", "7b")
ASSETS = "qwen2.5-coder"
SHARPEN = 6.0  # std of the target's logits: greedy margins like a trained model's
INIT_STD = 0.02  # the family's initializer_range, for every other matrix and bias
# Unit-scale embeddings keep the current token visible in the residual stream; at 0.02 the
# shallow shapes' greedy continuations collapse onto a few hub tokens (38 distinct in 288).
EMBED_STD = 1.0
AGREEMENT_TOL = 0.01

# Calibration prompts: a few kinds of text; with random weights any text gives a context.
PROBE_PROMPTS = (
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "Explain in two sentences why the sky is blue during the day and red at sunset.",
    "Translate to German: The train leaves at seven and arrives before noon.",
    "Summarize: The committee met on Tuesday and agreed to postpone the vote until spring.",
    "Q: A farmer has 17 sheep and all but 9 run away. How many are left? A:",
    "SELECT name, count(*) FROM orders JOIN users ON users.id = orders.user_id GROUP BY",
)

_REF = re.compile(r"synthetic:(?P<shape>[^:]+)(?P<opts>(?::[^:]+)*)")


class SyntheticRefError(ValueError):
    """A `synthetic:` reference that does not parse."""


@dataclass(frozen=True)
class SyntheticRef:
    shape: str
    seed: int = 0
    agreement: float | None = None  # draft@A: calibrate to this greedy agreement
    noise: float | None = None  # draft=N: the noise scale, already calibrated

    @property
    def is_draft(self) -> bool:
        return self.agreement is not None or self.noise is not None

    def target(self) -> SyntheticRef:
        return SyntheticRef(self.shape, self.seed)

    def with_noise(self, noise: float) -> SyntheticRef:
        return replace(self, agreement=None, noise=float(f"{noise:.4g}"))

    def __str__(self) -> str:
        s = f"{PREFIX}{self.shape}"
        if self.seed:
            s += f":seed={self.seed}"
        if self.noise is not None:
            s += f":draft={self.noise:.4g}"
        elif self.agreement is not None:
            s += f":draft@{self.agreement:g}"
        return s


def is_synthetic(ref: str | None) -> bool:
    return bool(ref) and ref.strip().lower().startswith(PREFIX)


def parse(ref: str) -> SyntheticRef:
    m = _REF.fullmatch(ref.strip().lower())
    if not m:
        raise SyntheticRefError(f"not a synthetic model reference: {ref!r}")
    shape = m["shape"]
    if shape not in SHAPES:
        raise SyntheticRefError(f"{ref!r}: unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    seed, agreement, noise = 0, None, None
    for opt in filter(None, m["opts"].split(":")):
        try:
            if opt.startswith("seed="):
                seed = int(opt[5:])
            elif opt.startswith("draft@"):
                agreement = float(opt[6:])
            elif opt.startswith("draft="):
                noise = float(opt[6:])
            else:
                raise ValueError
        except ValueError:
            raise SyntheticRefError(
                f"{ref!r}: bad option {opt!r}; use seed=<int>, draft@<agreement> or "
                f"draft=<noise>") from None
    if agreement is not None and noise is not None:
        raise SyntheticRefError(f"{ref!r}: give draft@<agreement> or draft=<noise>, not both")
    if agreement is not None and not 0.0 < agreement <= 1.0:
        raise SyntheticRefError(f"{ref!r}: the agreement must be in (0, 1]")
    if noise is not None and not (noise >= 0.0 and math.isfinite(noise)):
        raise SyntheticRefError(f"{ref!r}: the noise must be a finite number >= 0")
    return SyntheticRef(shape, seed, agreement, noise)


# ---------------------------------------------------------------- assets


def _asset(name: str) -> bytes:
    return (Path(__file__).resolve().parent / "assets" / ASSETS / name).read_bytes()


def config(shape: str) -> PretrainedConfig:
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise SyntheticRefError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    d = json.loads(_asset(f"config-{shape}.json"))
    return AutoConfig.for_model(d.pop("model_type"), **d)


TOKENIZER_FILES = ("tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def tokenizer_dir() -> Path:
    """A directory with the family's tokenizer files (tokenizer.json unpacked from the package
    once, into the model cache, or a temporary directory if that is not writable)."""
    from specedge.modelcache import models_dir

    packed = _asset("tokenizer.json.xz")
    key = hashlib.sha256(packed).hexdigest()[:12]
    for root in (models_dir(), Path(tempfile.gettempdir())):
        d = root / f".synthetic-{ASSETS}-{key}"
        if (d / "tokenizer.json").is_file():
            return d
        try:
            d.mkdir(parents=True, exist_ok=True)
            for name in TOKENIZER_FILES:
                (d / name).write_bytes(_asset(name))
            # write then rename: a concurrent process never reads a half-written file
            tmp = d / f".tokenizer.json.{os.getpid()}"
            tmp.write_bytes(lzma.decompress(packed))
            tmp.rename(d / "tokenizer.json")
            return d
        except OSError as e:
            log.warning("cannot unpack the tokenizer here", dir=str(d), error=str(e))
    raise OSError("no writable directory for the synthetic tokenizer")


def load_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


# ---------------------------------------------------------------- weights


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _randn(shape: torch.Size, key: tuple, device: torch.device) -> torch.Tensor:
    """Standard normal float32 values from a generator seeded by `key`, on `device`: one
    generator per tensor, so the values do not depend on the order tensors are built in."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(_seed(*key))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def empty_model(shape: str, dtype: torch.dtype, device: str | torch.device) -> PreTrainedModel:
    """The architecture with its parameters on the meta device (no memory, no default init)
    and its buffers (rotary frequencies) real, on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = config(shape)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = json.loads(_asset("generation_config.json"))
    model.generation_config.eos_token_id = gen["eos_token_id"]
    model.generation_config.pad_token_id = gen["pad_token_id"]
    for mod in model.modules():  # buffers only: the meta parameters cannot move
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)
    return model


def _materialize(model: PreTrainedModel, fill) -> None:
    """Replace every meta parameter by fill(name, shape) (float32), cast to the model's dtype."""
    import torch

    dtype = model.dtype
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        value = fill(name, p.shape).to(dtype)
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def target_init(name: str, shape: torch.Size, seed: int, hidden: int,
                device: torch.device) -> torch.Tensor:
    """The target's value of one tensor (float32)."""
    import torch

    if _is_norm(name):
        return torch.ones(shape, device=device)
    # lm_head: logits' std = SHARPEN given the final norm's unit-RMS hidden state
    std = {"lm_head.weight": SHARPEN / math.sqrt(hidden),
           "model.embed_tokens.weight": EMBED_STD}.get(name, INIT_STD)
    return _randn(shape, ("target", seed, name), device).mul_(std)


def noised(name: str, value: torch.Tensor, seed: int, noise: float) -> torch.Tensor:
    """The draft's value of one tensor: the target's plus noise x its std (norms stay exact).
    The same direction at every noise scale, so agreement falls smoothly as the scale grows."""
    if _is_norm(name) or noise == 0.0:
        return value
    v = value.float()
    return v + _randn(v.shape, ("draft", seed, name), v.device).mul_(noise * float(v.std()))


def build(ref: str | SyntheticRef, *, dtype: torch.dtype | None = None,
          device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model a reference names, in eval mode on `device`. A `draft@A` reference calibrates
    first (it builds the target too, and logs the `draft=N` reference to reuse)."""
    import torch

    from specedge.devices import synchronize

    r = parse(ref) if isinstance(ref, str) else ref
    dtype = dtype or torch.bfloat16
    device = torch.device(device)
    t0 = time.perf_counter()
    if r.agreement is not None:
        target = build(r.target(), dtype=dtype, device=device)
        draft = build(r.target(), dtype=dtype, device=device)
        cal = calibrate(target, draft, r.agreement, seed=r.seed)
        log.info("synthetic draft calibrated; reuse it as", ref=str(r.with_noise(cal.noise)),
                 agreement=round(cal.agreement, 3), forwards=cal.forwards)
        del target
        return draft
    model = empty_model(r.shape, dtype, device)
    hidden = model.config.hidden_size
    with torch.no_grad():
        # noise on the dtype-rounded target, as calibrate() measured it: bit for bit its draft
        _materialize(model, lambda name, shape: noised(
            name, target_init(name, shape, r.seed, hidden, device).to(dtype), r.seed,
            r.noise or 0.0))
    model.eval()
    synchronize(device)  # the build's time, logged below, is the device's
    log.info("synthetic model built", ref=str(r), dtype=str(dtype).removeprefix("torch."),
             device=str(device), params=sum(p.numel() for p in model.parameters()),
             s=round(time.perf_counter() - t0, 2))
    return model


def set_noise(draft: PreTrainedModel, target: PreTrainedModel, noise: float, seed: int) -> None:
    """Rewrite `draft`'s weights in place as `target`'s plus noise at this scale."""
    import torch

    with torch.no_grad():
        tp = dict(target.named_parameters())
        for name, p in draft.named_parameters():
            p.copy_(noised(name, tp[name], seed, noise))


# ---------------------------------------------------------------- calibration


@dataclass
class Probe:
    """The target's greedy continuations of the probe prompts: the sequences, the positions
    compared and the target's choice there (teacher-forced)."""

    ids: torch.Tensor  # [B, P + G]
    start: int  # first position whose next-token choice is compared (P - 1)
    choice: torch.Tensor  # [B, G] the target's argmax at positions start .. start + G - 1


def probe(target: PreTrainedModel, prompt_tokens: int = 24, new_tokens: int = 24) -> Probe:
    import torch

    tok = load_tokenizer()
    device = target.device
    rows = []
    for text in PROBE_PROMPTS:
        ids = tok(text)["input_ids"]
        rows.append((ids * (prompt_tokens // max(1, len(ids)) + 1))[:prompt_tokens])
    x = torch.tensor(rows, device=device)
    with torch.no_grad():
        out = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              pad_token_id=0)
        choice = _choices(target, out, prompt_tokens - 1, new_tokens)
    return Probe(out, prompt_tokens - 1, choice)


def _choices(model: PreTrainedModel, ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """The model's greedy choice at positions start .. start + n - 1 (logits only there)."""
    keep = ids.shape[1] - start
    logits = model(input_ids=ids, logits_to_keep=keep).logits
    return logits[:, :n].argmax(-1)


def agreement(draft: PreTrainedModel, pr: Probe) -> float:
    """Fraction of the probe's positions where the draft's greedy choice is the target's."""
    import torch

    with torch.no_grad():
        got = _choices(draft, pr.ids, pr.start, pr.choice.shape[1])
    return float((got == pr.choice).float().mean())


@dataclass
class Calibration:
    noise: float
    agreement: float
    forwards: int
    trace: list[tuple[float, float]]  # (noise, agreement) per draft forward


def calibrate(target: PreTrainedModel, draft: PreTrainedModel, want: float, *, seed: int = 0,
              lo: float = 1e-4, hi: float = 1.0, max_forwards: int = 16,
              tol: float = AGREEMENT_TOL, pr: Probe | None = None) -> Calibration:
    """The noise scale at which the draft agrees with the target at a fraction `want` of the
    probe's positions: bisection in log scale (agreement falls as the noise grows). Leaves
    `draft` at the returned (rounded) scale."""
    pr = pr or probe(target)
    trace: list[tuple[float, float]] = []

    def measure(noise: float) -> float:
        set_noise(draft, target, noise, seed)
        a = agreement(draft, pr)
        trace.append((noise, a))
        return a

    while measure(hi) > want and hi < 64:  # find a scale past the requested agreement
        hi *= 4
    best = min(trace, key=lambda t: abs(t[1] - want))
    while len(trace) < max_forwards and abs(best[1] - want) > tol:
        mid = math.sqrt(lo * hi)
        a = measure(mid)
        lo, hi = (mid, hi) if a > want else (lo, mid)
        best = min(trace, key=lambda t: abs(t[1] - want))
    noise = float(f"{best[0]:.4g}")  # what the reference carries
    a = measure(noise)
    return Calibration(noise, a, len(trace), trace)


# ---------------------------------------------------------------- CLI


def _stats(model: PreTrainedModel, target: PreTrainedModel | None) -> dict:
    """Parameters, bytes, the target's greedy margins and, for a draft, its agreement."""
    import torch

    pr = probe(target or model)
    with torch.no_grad():
        logits = (target or model)(input_ids=pr.ids).logits.float()[:, pr.start:]
    top = logits.topk(2, dim=-1)
    margin = (top.values[..., 0] - top.values[..., 1]).flatten()
    p1 = logits.softmax(-1).amax(-1).flatten()
    out = {"params": sum(p.numel() for p in model.parameters()),
           "bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "logit_std": round(float(logits.std(-1).mean()), 3),
           "top1_prob_mean": round(float(p1.mean()), 3),
           "top2_margin_p10": round(float(margin.quantile(0.1)), 4),
           "top2_margin_p50": round(float(margin.median()), 4),
           "distinct_tokens_in_continuations": int(pr.ids[:, pr.start + 1:].unique().numel())}
    if target is not None:
        out["agreement"] = round(agreement(model, pr), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from specedge import logs
    from specedge.cli import DTYPES

    p = argparse.ArgumentParser(prog="python -m specedge.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--log-level", default="warning")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="the draft=N reference for a greedy agreement")
    c.add_argument("shape", help=f"{' | '.join(SHAPES)}, or a synthetic: target reference")
    c.add_argument("--agreement", type=float, default=0.8)
    i = sub.add_parser("inspect", help="size, logit sharpness and (for a draft) agreement")
    i.add_argument("ref")
    a = p.parse_args(argv)
    logs.configure(a.log_level)
    dtype, device = DTYPES[a.dtype], torch.device(a.device)
    if a.cmd == "calibrate":
        r = parse(a.shape if is_synthetic(a.shape) else PREFIX + a.shape).target()
        t0 = time.perf_counter()
        target = build(r, dtype=dtype, device=device)
        draft = build(r, dtype=dtype, device=device)
        cal = calibrate(target, draft, a.agreement, seed=r.seed)
        print(json.dumps({"ref": str(replace(r, noise=cal.noise)), "noise": cal.noise,
                          "agreement": round(cal.agreement, 4), "forwards": cal.forwards,
                          "s": round(time.perf_counter() - t0, 2), "device": str(device),
                          "dtype": a.dtype}))
    else:
        r = parse(a.ref)
        model = build(r, dtype=dtype, device=device)
        target = build(r.target(), dtype=dtype, device=device) if r.is_draft else None
        print(json.dumps({"ref": str(r), "device": str(device), "dtype": a.dtype}
                         | _stats(model, target)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
