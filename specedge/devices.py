"""Device helpers shared by the model paths and the benchmarks."""

from __future__ import annotations

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work: a timer around an asynchronous launch (CUDA)
    otherwise measures the launch, not the work."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(dev)
