"""Start and stop the measured stack: an embedded broker and a verifier process on its own
cores, loading its target on the given device and dtype. The verifier's counters come back
from its final log line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from specedge import broker
from specedge.demo import wait_verifier
from specedge.orphan import tied_to_parent


def split_cores() -> tuple[list[int], list[int]]:
    """First half of this process's cores for the verifier, the rest for the edges."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    return cores[:half], cores[half:] or cores[:half]


def pin_edge() -> tuple[list[int], list[int]]:
    """Run this (edge) process on the edge cores with as many torch threads; returns
    (verifier cores, edge cores)."""
    import torch

    vcores, ecores = split_cores()
    os.sched_setaffinity(0, ecores)
    torch.set_num_threads(len(ecores))
    return vcores, ecores


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(
            "-" if r[c] is None else f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])
            for c in cols) + " |")
    return "\n".join(out)


@dataclass
class Stack:
    vcores: list[int]
    extra_args: list[str] = field(default_factory=list)
    broker_cores: list[int] | None = None  # default: the cores the verifier does not use
    model: str | None = None  # the verifier's target (default: its own default)
    device: str = "cpu"
    dtype: str = "auto"  # specedge/precision.py
    srv: broker.EmbeddedNats | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return self.srv.url

    def start(self) -> Stack:
        state = Path(tempfile.mkdtemp(prefix="specedge-bench-"))
        others = [c for c in sorted(os.sched_getaffinity(0)) if c not in self.vcores]
        self.srv = broker.EmbeddedNats(store_dir=state / "nats",
                                       cpus=self.broker_cores or others or None).start()
        broker.run_setup(self.srv.url)
        self.log_path = state / "verifier.log"
        with open(self.log_path, "wb") as vlog:
            self.proc = subprocess.Popen(tied_to_parent(
                ["taskset", "-c", ",".join(map(str, self.vcores)), sys.executable, "-m",
                 "workers.verifier", "--nats", self.srv.url, "--threads", str(len(self.vcores)),
                 "--device", self.device, "--dtype", self.dtype,
                 *(["--model", self.model] if self.model else []),
                 "--log-level", "info", *self.extra_args]),
                stdout=vlog, stderr=subprocess.STDOUT, env=dict(os.environ, SPECEDGE_LOG="info"))
        asyncio.run(wait_verifier(self.srv.url, self.proc))
        return self

    def _log_lines(self, marker: str) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if marker in line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def _stats_lines(self) -> list[dict]:
        return self._log_lines('"verifier st')

    def verifier_config(self) -> dict:
        """The model, device and dtype the verifier process says it runs with (its first log
        line), as evidence of what was measured."""
        lines = self._log_lines('"event": "config"')
        c = lines[0] if lines else {}
        return {k: c.get(k) for k in ("model", "device", "dtype", "max_batch")}

    def snapshot(self, timeout: float = 10.0) -> dict:
        """The verifier's counters now (SIGUSR1 makes it log them)."""
        n = len(self._stats_lines())
        self.proc.send_signal(signal.SIGUSR1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self._stats_lines()
            if len(lines) > n:
                return lines[-1]
            time.sleep(0.05)
        raise TimeoutError("the verifier did not report its counters")

    def stop(self) -> dict:
        """Stop the verifier (SIGTERM: drain) and return its final counters."""
        stats: dict = {}
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:  # a drain that hangs must not lose the results
                print(f"bench: the verifier did not drain within 60 s of SIGTERM; killed (its "
                      f"log: {self.log_path})", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
            lines = self._stats_lines()
            stats = lines[-1] if lines else {}
        if self.srv:
            self.srv.cleanup()
        return stats


def delta(after: dict, before: dict) -> dict:
    """Counters accumulated between two snapshots."""
    keys = ("batches", "blocks", "tokens", "busy_s", "batch_s", "rejected", "kv_hits",
            "kv_misses", "prefill_chunks")
    d = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    d["mean_batch"] = d["blocks"] / d["batches"] if d["batches"] else 0.0
    # the control path: time per batch outside the model forward, as a share of the forward
    d["outside_per_batch_ms"] = (1000 * (d["batch_s"] - d["busy_s"]) / d["batches"]
                                 if d["batches"] else 0.0)
    d["outside_x_forward"] = ((d["batch_s"] - d["busy_s"]) / d["busy_s"] if d["busy_s"]
                              else 0.0)
    return d
