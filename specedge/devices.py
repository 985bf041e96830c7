"""Device helpers shared by the model paths and the benchmarks."""

from __future__ import annotations

import platform

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work: a timer around an asynchronous launch (CUDA)
    otherwise measures the launch, not the work."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(dev)


def pick(device: str) -> str:
    """`auto` -> cuda when a GPU is usable, else cpu; anything else is checked: asking for CUDA
    on a machine without one fails here rather than deep inside a model load."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA "
                           f"device")
    return device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """What runs the models: the GPU's name for a CUDA device, the CPU's model otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def describe(device: torch.device | str, dtype: torch.dtype | str) -> dict:
    """The device record of a benchmark's results.json."""
    dev = torch.device(device)
    out = {"device": str(dev), "device_name": device_name(dev),
           "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        out["capability"] = f"{props.major}.{props.minor}"
    return out
