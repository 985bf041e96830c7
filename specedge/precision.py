"""The number format the models run in under `--dtype auto` (the default everywhere): the one
this machine computes fastest at the forward sizes speculation runs.

On CUDA: bfloat16 where the GPU computes it natively (Ampere on), else float16. On a CPU,
bfloat16 halves the bytes each forward streams, but only AVX512-BF16 or AMX (x86), or the bf16
extension (Arm), compute it natively; elsewhere each matmul converts to float32 first, and a
tree-sized forward costs about twice float32's and as much per token as a one-token forward
(issue 31), which flattens the cost curve that speculation lives on. So on a CPU both formats
are timed once at start-up, on a matmul pair of the model's own layer shape (up and down
projections) at a tree's size, and the faster is kept; the CPU flags decide when nothing can be
timed, and break a near tie. The probe holds a layer's weights, not a second copy of the model,
and the model is then loaded straight in the chosen format."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
import torch

log = structlog.get_logger(__name__)

AUTO = "auto"
CANDIDATES = ("bfloat16", "float32")  # a CPU's: the halved bytes against the native arithmetic
PROBE_TOKENS = 16  # a draft tree's size (the edge's adaptive max budget), plus the root's token
TIE = 0.10  # timings this close are a tie: the flags decide
# x86 (AVX512-BF16, AMX) and Arm (the BF16 extension) flags of native bfloat16 arithmetic
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class Choice:
    dtype: str  # a key of specedge.cli.DTYPES
    how: str  # given | device | flags | measured
    times_ms: dict[str, float] = field(default_factory=dict)  # per candidate, when measured

    def fields(self) -> dict:
        """For log lines."""
        out = {"dtype": self.dtype, "dtype_how": self.how}
        if self.times_ms:
            out["dtype_probe_ms"] = self.times_ms
        return out


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the OS reports them (x86 `flags`, Arm `Features`); empty
    where there is no such file."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str]) -> bool:
    return bool(flags & NATIVE_BF16_FLAGS)


def by_flags(device_type: str, flags: frozenset[str], cuda_bf16: bool = True) -> str:
    """The choice without timing: a GPU's native half format; a CPU's bfloat16 only where the
    flags say it computes it natively."""
    if device_type == "cuda":
        return "bfloat16" if cuda_bf16 else "float16"
    return "bfloat16" if native_bf16(flags) else "float32"


def choose(times: dict[str, float], fallback: str, tie: float = TIE) -> str:
    """The fastest measured candidate; `fallback` (the flags' choice) when fewer than two were
    measured or when its time is within `tie` of the fastest (noise must not flip the choice
    against what the hardware says)."""
    measured = {k: t for k, t in times.items() if t > 0}
    if len(measured) < 2:
        return fallback
    fastest = min(measured, key=measured.__getitem__)
    if fallback in measured and measured[fallback] <= (1 + tie) * measured[fastest]:
        return fallback
    return fastest


def layer_shape(config: dict) -> tuple[int, int]:
    """(hidden, intermediate) of a model's config (config.json's dict; a multimodal one's
    text_config): the shape of its MLP's projections."""
    cfg = config.get("text_config") or config
    hidden = int(cfg.get("hidden_size") or 1024)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    return hidden, inter


def time_mlps(dtypes: list[str], hidden: int, inter: int, tokens: int = PROBE_TOKENS,
              reps: int = 3) -> dict[str, float]:
    """Seconds of a layer's up and down projections on `tokens` tokens in each dtype (CPU; the
    best of `reps` each, after a warm-up). The candidates take turns, so a neighbour's load
    slows them alike; the weights outsize the caches as the model's do, so each timing
    streams memory as a forward does."""
    g = torch.Generator().manual_seed(0)
    up = torch.randn(inter, hidden, generator=g) * 0.02
    down = torch.randn(hidden, inter, generator=g) * 0.02
    x = torch.randn(tokens, hidden, generator=g)
    args = {d: (x.to(getattr(torch, d)), up.to(getattr(torch, d)), down.to(getattr(torch, d)))
            for d in dtypes}
    del up, down
    best = dict.fromkeys(dtypes, float("inf"))
    linear = torch.nn.functional.linear
    with torch.inference_mode():
        for i in range(reps + 1):
            for d, (xd, ud, dd) in args.items():
                t0 = time.perf_counter()
                linear(linear(xd, ud), dd)
                if i:  # the first round is the warm-up (kernel selection, page faults)
                    best[d] = min(best[d], time.perf_counter() - t0)
    return best


def resolve(name: str, device: str | torch.device, shape: tuple[int, int] | None = None,
            tokens: int = PROBE_TOKENS) -> Choice:
    """The dtype to load a model in: `name` unless it is `auto`; for auto the device's native
    half format on a GPU, and on a CPU the faster of CANDIDATES timed on the model's layer
    `shape` (layer_shape; the flags' choice without one, or if the timing fails)."""
    if name != AUTO:
        return Choice(name, "given")
    from specedge.devices import pick

    dev = torch.device(pick(str(device)))
    if dev.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return _logged(Choice(by_flags("cuda", frozenset(), native), "device"))
    fallback = by_flags(dev.type, cpu_flags())
    if dev.type != "cpu" or shape is None:
        return _logged(Choice(fallback, "flags"))
    hidden, inter = shape
    try:
        times = time_mlps(list(CANDIDATES), hidden, inter, tokens)
    except Exception as exc:  # a build without a kernel for one of them: the flags decide
        log.warning("dtype probe failed; the CPU flags decide", error=str(exc)[:200])
        return _logged(Choice(fallback, "flags"))
    ms = {c: round(t * 1000, 2) for c, t in times.items()}
    return _logged(Choice(choose(ms, fallback), "measured", ms))


def _logged(c: Choice) -> Choice:
    log.info("dtype chosen", threads=torch.get_num_threads(), **c.fields())
    return c
