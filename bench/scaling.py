"""python -m bench.scaling: the verifier's control path. Many synthetic sessions (random
draft trees, no draft model) against workers running a tiny random target, so the measure is
the broker, batching, validation and bookkeeping rather than the model. Reports verdicts per
second and tokens per second with 1 and 2 workers. Writes results.json and table.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from schemas import (
    SCHEMA_VERSION,
    DraftBlock,
    Sampling,
    SessionOpened,
    Verdict,
    decode,
    digest_ids,
    encode,
    pack_ids,
    unpack_ids,
)
from specedge import broker, logs, subjects
from specedge.orphan import tied_to_parent


def tiny_target_dir(vocab: int = 512) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    d = tempfile.mkdtemp(prefix="specedge-tiny-")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


async def synthetic_session(nc, js, sid: str, rounds: int, nodes: int, vocab: int,
                            done: list) -> None:
    rng = random.Random(sid)
    committed = [rng.randrange(vocab) for _ in range(rng.randint(8, 64))]
    got: asyncio.Queue = asyncio.Queue()

    async def on_msg(m):
        got.put_nowait(decode(m.data))

    sub = await nc.subscribe(subjects.verdict(sid), cb=on_msg)
    await js.publish(subjects.session(sid), encode(SessionOpened(
        v=SCHEMA_VERSION, prompt=pack_ids(committed), sampling=Sampling(), seed=0,
        max_new_tokens=4096, eos_ids=b"", target="tiny", draft="synthetic", vocab_size=vocab)))
    for r in range(rounds):
        parents = [rng.randrange(i) for i in range(1, nodes + 1)]
        block = DraftBlock(v=SCHEMA_VERSION, round=r, committed_len=len(committed),
                           root=committed[-1], tokens=pack_ids([rng.randrange(vocab)
                                                                for _ in range(nodes)]),
                           parents=pack_ids(parents), digest=digest_ids(committed))
        await js.publish(subjects.draft(sid), encode(block),
                         headers={"Nats-Msg-Id": subjects.msg_id(sid, r, "draft")})
        v = await asyncio.wait_for(got.get(), 60)
        assert isinstance(v, Verdict), v
        committed += unpack_ids(v.tokens)
        done.append((time.perf_counter(), len(unpack_ids(v.tokens))))
    await sub.unsubscribe()


async def load(url: str, sessions: int, rounds: int, nodes: int, vocab: int) -> dict:
    nc = await broker.connect(url, "bench-synthetic")
    js = nc.jetstream()
    done: list = []
    bar = tqdm(total=sessions * rounds, desc="verdicts", file=sys.stderr, leave=False)

    async def tick():
        while True:
            bar.n = len(done)
            bar.refresh()
            await asyncio.sleep(0.5)

    t = asyncio.create_task(tick())
    t0 = time.perf_counter()
    await asyncio.gather(*(synthetic_session(nc, js, f"syn{i}.{int(t0)}", rounds, nodes, vocab,
                                             done) for i in range(sessions)))
    t.cancel()
    bar.close()
    await nc.close()
    # steady window: drop the first and last 10% of verdicts (ramp-up and tail)
    ts = sorted(x for x, _ in done)
    lo, hi = ts[len(ts) // 10], ts[-len(ts) // 10 - 1]
    n_window = sum(1 for x in ts if lo <= x <= hi)
    toks = sum(k for x, k in done if lo <= x <= hi)
    return {"verdicts": len(done), "wall_s": time.perf_counter() - t0,
            "verdicts_per_s": n_window / (hi - lo), "tokens_per_s": toks / (hi - lo)}


def main(argv=None) -> int:
    import subprocess

    from bench.machine import machine
    from bench.stack import Stack, delta
    from specedge import devices
    from specedge.cli import DTYPES

    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__)
    p.add_argument("--sessions", type=int, default=64)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--out", default="bench/results/scaling")
    p.add_argument("--device", default="cpu", help="where the workers run the tiny target")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)])
    a = p.parse_args(argv)
    a.device = devices.pick(a.device)
    logs.configure("warning")
    vocab = 512
    model = tiny_target_dir(vocab)
    if a.dtype == "auto":  # once: every worker runs the same (specedge/precision.py)
        from specedge.models import pick_dtype

        a.dtype = pick_dtype(model, a.dtype, a.device).dtype
    rows = []
    for n in a.workers:
        stack = Stack(vcores=sorted(os.sched_getaffinity(0)), model=model, device=a.device,
                      dtype=a.dtype, extra_args=["--max-batch", str(a.max_batch),
                                                 "--name", "w0"])
        stack.start()
        extra = []
        try:
            for i in range(1, n):
                extra.append(subprocess.Popen(tied_to_parent(
                    [sys.executable, "-m", "workers.verifier", "--nats", stack.url, "--model",
                     model, "--threads", "1", "--max-batch", str(a.max_batch), "--name", f"w{i}",
                     "--device", a.device, "--dtype", a.dtype, "--log-level", "warning"])))
            asyncio.run(_wait_members(stack.url, n))
            before = stack.snapshot()
            res = asyncio.run(load(stack.url, a.sessions, a.rounds, a.nodes, vocab))
            v = delta(stack.snapshot(), before)  # worker w0's control path
            res |= {"w0_batches": v["batches"], "w0_mean_batch": round(v["mean_batch"], 2),
                    "w0_forward_ms": round(1000 * v["busy_s"] / max(1, v["batches"]), 2),
                    "w0_outside_ms": round(v["outside_per_batch_ms"], 2),
                    "w0_outside_x_forward": round(v["outside_x_forward"], 2)}
        finally:
            for proc in extra:
                proc.terminate()
                proc.wait(30)
            stack.stop()
        rows.append({"workers": n, "sessions": a.sessions, "nodes": a.nodes} | res)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(a.device, a.dtype), "settings": vars(a), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = ["| workers | sessions | tree nodes | verdicts/s | tokens/s | w0 blocks/batch | "
          "w0 forward ms | w0 outside ms | outside x forward |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['workers']} | {r['sessions']} | {r['nodes']} | {r['verdicts_per_s']:.0f} | "
           f"{r['tokens_per_s']:.0f} | {r['w0_mean_batch']} | {r['w0_forward_ms']} | "
           f"{r['w0_outside_ms']} | {r['w0_outside_x_forward']} |" for r in rows]
    (out / "table.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


async def _wait_members(url: str, n: int) -> None:
    from workers.verifier.leases import wait_balanced

    await wait_balanced(url, {f"w{i}" for i in range(n)})


if __name__ == "__main__":
    sys.exit(main())
