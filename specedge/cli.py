"""Command-line pieces shared by the entry points."""

from __future__ import annotations

import argparse
import os

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16}


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default=os.environ.get("SPECEDGE_NATS"),
                   help="broker URL (default: $SPECEDGE_NATS)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="model dtype; bfloat16 uses the CPU's AMX units")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default=os.environ.get("SPECEDGE_LOG", "info"))


def apply_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
