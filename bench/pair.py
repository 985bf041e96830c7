"""The model pair a benchmark runs and where it runs: the flags every benchmark shares
(--target, --draft, --device, --dtype, --synthetic, --draft-agreement) and what they resolve
to. With --synthetic SHAPE the pair is specedge.synthetic's: random target weights of that
shape, and a draft from the target with noise calibrated here, once, to --draft-agreement;
the processes this benchmark starts get the calibrated `draft=N` reference and never
recalibrate."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import structlog
import torch

from specedge import devices, synthetic
from specedge.cli import DTYPES
from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_model, load_tokenizer, pick_dtype

log = structlog.get_logger(__name__)


def add_args(p: argparse.ArgumentParser, *, device: str = "cpu") -> None:
    p.add_argument("--target", default=None,
                   help=f"target model reference (default {DEFAULT_TARGET}, or "
                        f"synthetic:SHAPE with --synthetic)")
    p.add_argument("--draft", default=None,
                   help=f"draft model reference (default {DEFAULT_DRAFT}, or the calibrated "
                        f"synthetic draft with --synthetic)")
    p.add_argument("--device", default=device,
                   help="where the verifier and the edges run the models: cpu, cuda, cuda:N, "
                        "auto (cuda when there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="the models' number format (auto: resolved once, on the target's "
                        "shape, for the verifier and the edges alike: specedge/precision.py)")
    p.add_argument("--synthetic", default=None, metavar="SHAPE", choices=synthetic.SHAPES,
                   help="random weights of this shape instead of the fetched pair "
                        f"({', '.join(synthetic.SHAPES)}; see specedge/synthetic.py)")
    p.add_argument("--draft-agreement", type=float, default=0.8,
                   help="with --synthetic: the draft's greedy agreement with the target")


@dataclass
class Pair:
    target: str  # the reference the verifier process loads
    draft: str  # the reference the edges load (synthetic: with its calibrated noise)
    device: str
    dtype: str
    synthetic: bool = False
    calibration: dict = field(default_factory=dict)  # synthetic: noise, agreement, seconds

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def verifier_args(self) -> list[str]:
        return ["--model", self.target, "--device", self.device, "--dtype", self.dtype]

    def record(self) -> dict:
        """What results.json says about the models and the device that ran them."""
        return devices.describe(self.device, self.dtype) | {
            "target": self.target, "draft": self.draft, "synthetic": self.synthetic,
            **({"calibration": self.calibration} if self.calibration else {})}


def synthetic_pair(shape_or_ref: str, agreement: float, device: str, dtype: str,
                   ) -> tuple[Pair, torch.nn.Module]:
    """A synthetic target and its draft calibrated here; returns the pair and the draft."""
    ref = synthetic.parse(shape_or_ref if synthetic.is_synthetic(shape_or_ref)
                          else synthetic.PREFIX + shape_or_ref).target()
    t0 = time.perf_counter()
    target = synthetic.build(ref, dtype=DTYPES[dtype], device=device)
    draft = synthetic.build(ref, dtype=DTYPES[dtype], device=device)
    cal = synthetic.calibrate(target, draft, agreement, seed=ref.seed)
    del target
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    info = {"requested_agreement": agreement, "noise": cal.noise,
            "agreement": round(cal.agreement, 4), "forwards": cal.forwards,
            "s": round(time.perf_counter() - t0, 2)}
    pair = Pair(str(ref), str(ref.with_noise(cal.noise)), device, dtype, True, info)
    log.info("synthetic pair", target=pair.target, draft=pair.draft, **info)
    return pair, draft


def resolve(a: argparse.Namespace) -> tuple[Pair, torch.nn.Module, object]:
    """The pair the flags name, with its draft loaded on the device and the tokenizer."""
    device = devices.pick(a.device)
    if a.dtype == "auto":  # once here: the verifier process and the edges run the same
        ref = a.target or DEFAULT_TARGET
        if a.synthetic:
            ref = (a.synthetic if synthetic.is_synthetic(a.synthetic)
                   else synthetic.PREFIX + a.synthetic)
        a.dtype = pick_dtype(ref, a.dtype, device).dtype
    if a.synthetic:
        if a.target or a.draft:
            raise SystemExit("--synthetic chooses the pair: leave out --target and --draft")
        pair, draft = synthetic_pair(a.synthetic, a.draft_agreement, device, a.dtype)
    else:
        pair = Pair(a.target or DEFAULT_TARGET, a.draft or DEFAULT_DRAFT, device, a.dtype,
                    synthetic.is_synthetic(a.target or ""))
        draft = load_model(pair.draft, dtype=pair.torch_dtype, device=device)
    return pair, draft, load_tokenizer(pair.draft)
