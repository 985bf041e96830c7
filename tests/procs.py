"""Real processes for the fault tests: verifier workers started through their CLI, and
nats-server nodes (single or a 3-node cluster from deploy/nats/)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from specedge import broker
from specedge.orphan import tied_to_parent

ROOT = Path(__file__).resolve().parents[1]
FAST_FAILOVER = ["--ack-wait", "2", "--lease-ttl", "2.5", "--max-deliver", "10"]


class ProcWorker:
    """`python -m workers.verifier` as a child process, logging to a file."""

    def __init__(self, url: str, model_dir: str, name: str, log_dir: Path, *extra: str):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(tied_to_parent(
            [sys.executable, "-m", "workers.verifier", "--nats", url, "--model", model_dir,
             "--dtype", "float64", "--name", name, "--threads", "1", "--log-level", "info",
             *FAST_FAILOVER, *extra]),
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(os.environ, SPECEDGE_LOG="info"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def cluster(tmp: Path, n: int = 3) -> list[broker.EmbeddedNats]:
    """A JetStream cluster from deploy/nats/cluster-{a,b,c}.conf, on free loopback ports."""
    names = "abc"[:n]
    cports = [broker.free_port() for _ in names]
    nodes = []
    for i, name in enumerate(names):
        routes = ",".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(cports) if j != i)
        nodes.append(broker.EmbeddedNats(
            store_dir=tmp / f"node-{name}", config_file=str(ROOT / f"deploy/nats/cluster-{name}.conf"),
            extra_args=["--cluster", f"nats://127.0.0.1:{cports[i]}", "--routes", routes,
                        "-m", str(broker.free_port())]))
    for node in nodes:
        node.start()
    return nodes


def urls(nodes) -> str:
    return ",".join(n.url for n in nodes)


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")
