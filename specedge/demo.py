"""python -m specedge.demo: the whole stack on this machine. Starts an embedded nats-server, one
verifier process with the target model, and an edge with the draft model; answers a prompt,
streaming; shuts everything down (also on Ctrl-C)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from specedge import broker, logs, subjects
from specedge.cli import DTYPES, add_common
from specedge.edge.__main__ import add_generation_args

log = structlog.get_logger("specedge.demo")


def parse(argv=None) -> argparse.Namespace:
    from specedge.models import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(prog="python -m specedge.demo", description=__doc__)
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    add_common(p)
    p.set_defaults(log_level=os.environ.get("SPECEDGE_LOG", "warning"))  # the answer is the show
    add_generation_args(p)
    p.add_argument("--verifier-threads", type=int, default=None,
                   help="torch threads for the verifier (default: half the cores)")
    return p.parse_args(argv)


async def wait_verifier(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Ready = every partition is leased by a verifier."""
    nc = await broker.connect(url, "demo-probe")
    try:
        js = nc.jetstream()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"the verifier exited with {proc.returncode}")
            if await broker.partitions_served(js) == subjects.PARTITIONS:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the verifier did not become ready")
    finally:
        await nc.close()


async def amain(a: argparse.Namespace, url: str, verifier: subprocess.Popen) -> dict:
    from specedge.edge.__main__ import run_edge
    from specedge.models import load_model, load_tokenizer

    a.model = a.draft
    loop = asyncio.get_running_loop()
    # Load the draft while the verifier process loads the target. One thread: transformers'
    # lazy imports are not safe to race.
    tok, draft = await loop.run_in_executor(None, lambda: (
        load_tokenizer(a.draft), load_model(a.draft, dtype=DTYPES[a.dtype], device=a.device)))
    await wait_verifier(url, verifier)
    log.info("stack ready; answering", prompt=a.prompt[:60])
    return await run_edge(a, url, draft=draft, tokenizer=tok)


def main(argv=None) -> int:
    a = parse(argv)
    logs.configure(a.log_level)
    from specedge.models import resolve

    for ref in (a.target, a.draft):
        resolve(ref)  # a clear error now rather than inside a child process
    cores = os.cpu_count() or 2
    vthreads = a.verifier_threads or max(1, cores // 2)
    # Separate cores for the verifier and the edge, as the deployment would have.
    import torch

    torch.set_num_threads(a.threads or max(1, cores - vthreads))
    state = Path(tempfile.mkdtemp(prefix="specedge-demo-"))
    nats_srv = broker.EmbeddedNats(store_dir=state / "nats").start()
    broker.run_setup(nats_srv.url)
    vlog = open(state / "verifier.log", "wb")  # noqa: SIM115
    env = dict(os.environ, SPECEDGE_LOG=a.log_level)
    verifier = subprocess.Popen(
        [sys.executable, "-m", "workers.verifier", "--nats", nats_srv.url, "--model", a.target,
         "--dtype", a.dtype, "--device", a.device, "--threads", str(vthreads)],
        stdout=vlog, stderr=subprocess.STDOUT, env=env)
    log.info("started", broker=nats_srv.url, verifier_log=str(state / "verifier.log"))
    rc = 0
    try:
        logs.install_uvloop()
        asyncio.run(amain(a, nats_srv.url, verifier))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        rc = 130
    except Exception as exc:
        log.error("demo failed", error=str(exc), verifier_log=str(state / "verifier.log"))
        rc = 1
    finally:
        if verifier.poll() is None:
            verifier.send_signal(signal.SIGTERM)
            try:
                verifier.wait(timeout=30)
            except subprocess.TimeoutExpired:
                verifier.kill()
        vlog.close()
        nats_srv.cleanup()
    return rc


if __name__ == "__main__":
    sys.exit(main())
